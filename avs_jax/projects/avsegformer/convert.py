"""AVSegFormer's released PyTorch checkpoints <-> Flax variables.

The released `.pth` files (ResNet-50 and PVT-v2-b5, S4 / MS3 / AVSS) are the
state dict of the reference `AVSegFormer` module: `backbone.*` (the ResNet
with its unused second branch `layer3_2`/`layer4_2`, or PVT-v2),
`vggish.*` (the frozen VGGish, not part of our model: split off and
converted by `vggish_variables`), `audio_proj.*` and `head.*`. Keys map by
name onto `avs_jax.projects.avsegformer.model` with the generic rules of the
project's PyTorch mapping, plus three renames:

  head.in_proj.{i}.{j}.*               <-> params/head/in_proj_{i}_{j}/*
  head.learnable_query.weight          <-> params/head/learnable_query/embedding
  head.query_generator.query.weight    <-> .../query_generator/query/embedding

Command line: `python -m avs_jax.convert` with an AVSegFormer config
(`--config=configs/avsegformer_s4.py:resnet50 --src=... --out=...`,
`--to_torch [--vggish=...]` back).
"""

import functools
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from avs_jax import torch_weights as tw

ConversionError = tw.ConversionError
load_state_dict = tw.load_state_dict

_RESNET_BRANCHES = (
    ('backbone.layer3_1.', 'backbone.layer3_2.'),
    ('backbone.layer4_1.', 'backbone.layer4_2.'),
)
_UNUSED = tuple(dst for _, dst in _RESNET_BRANCHES)
_EMBEDDINGS = ('head.learnable_query.', 'head.query_generator.query.')


strip_module_prefix = tw.strip_module_prefix


def _to_ours(key: str) -> str:
  key = re.sub(r'^head\.in_proj\.(\d+)\.', r'head.in_proj_\1.', key)
  for e in _EMBEDDINGS:
    if key == e + 'weight':
      return e + 'embedding'
  return key


def _to_reference(key: str) -> str:
  key = re.sub(r'^head\.in_proj_(\d+)\.', r'head.in_proj.\1.', key)
  for e in _EMBEDDINGS:
    if key == e + 'embedding':
      return e + 'weight'
  return key


def model_shapes(model_config) -> Dict[Tuple[str, ...], Any]:
  """Flattened `{path: ShapeDtypeStruct}` of AVSegFormer's variables."""
  from avs_jax.projects.avsegformer import model as avsegformer  # pylint: disable=g-import-not-at-top

  return dict(_shapes(avsegformer.build_model(model_config)))


@functools.lru_cache(maxsize=8)
def _shapes(model):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  frames = jax.ShapeDtypeStruct((1, 1, 64, 64, 3), jnp.float32)
  audio = jax.ShapeDtypeStruct((1, 1, 128), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), frames, audio)
  return tuple(tw._flatten(dict(shapes)).items())  # pylint: disable=protected-access


def split_vggish(state_dict: Mapping[str, Any]):
  """`(model_sd, vggish_sd)`: the checkpoint's `vggish.*` keys, unprefixed."""
  sd = strip_module_prefix(state_dict)
  vggish = {
      k[len('vggish.') :]: v for k, v in sd.items() if k.startswith('vggish.')
  }
  rest = {k: v for k, v in sd.items() if not k.startswith('vggish.')}
  return rest, vggish


def _check_kind(sd, model_config):
  keys = set(sd)
  if not any(k.startswith('head.') for k in keys) or not any(
      k.startswith('backbone.') for k in keys
  ):
    hint = ''
    if any(k.startswith(('resnet.', 'encoder_backbone.')) for k in keys):
      hint = (
          ' (this looks like an AVS/TPAVI checkpoint: use '
          'avs_jax.convert with configs/s4.py or configs/ms3.py)'
      )
    raise ConversionError(
        'not an AVSegFormer checkpoint: expected keys backbone.* and head.*'
        f'{hint}; first keys: {sorted(keys)[:5]}'
    )
  is_pvt = any(k.startswith('backbone.patch_embed1.') for k in keys)
  if is_pvt != model_config.backbone.startswith('pvt'):
    raise ConversionError(
        f'the checkpoint has a {"PVT-v2" if is_pvt else "ResNet"} backbone, '
        f'the config asks for {model_config.backbone!r}'
    )


def torch_to_flax(state_dict: Mapping[str, Any], model_config) -> Dict:
  """Released AVSegFormer state dict -> `{'params', 'batch_stats'}`.

  `vggish.*` keys are ignored here (see `vggish_variables`); the ResNet's
  unused second branch is dropped. Raises `ConversionError` naming missing
  and unexpected keys and shape mismatches.
  """
  sd, _ = split_vggish(state_dict)
  sd = {k: tw._to_numpy(v) for k, v in sd.items()}  # pylint: disable=protected-access
  _check_kind(sd, model_config)
  sd = {_to_ours(k): v for k, v in sd.items() if not k.startswith(_UNUSED)}
  try:
    return tw._map_state_dict(  # pylint: disable=protected-access
        sd, model_shapes(model_config), 'AVSegFormer checkpoint'
    )
  except ConversionError as e:  # name the keys as the checkpoint does
    msg = re.sub(r'head\.in_proj_(\d+)\.', r'head.in_proj.\1.', str(e))
    msg = re.sub(
        r'(learnable_query|query_generator\.query)\.embedding',
        r'\1.weight',
        msg,
    )
    raise ConversionError(msg) from None


def vggish_variables(state_dict: Mapping[str, Any]) -> Optional[Dict]:
  """The checkpoint's frozen VGGish as our VGGish variables (None if absent)."""
  _, vggish = split_vggish(state_dict)
  if not vggish:
    return None
  return tw.vggish_torch_to_flax(vggish)


def flax_to_torch(
    variables: Mapping[str, Any],
    model_config,
    vggish: Optional[Mapping[str, Any]] = None,
) -> Dict[str, np.ndarray]:
  """Flax variables -> the reference's state dict layout.

  The ResNet's unused second branch is filled with a copy of the first (as
  its ImageNet initialisation does). With `vggish` (our VGGish variables)
  the `vggish.*` keys are added, and the result loads strictly into the
  reference `AVSegFormer`; without, every other key is there.
  """
  sd = {
      _to_reference(k): v
      for k, v in tw.variables_to_torch(
          {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}
      ).items()
  }
  if not model_config.backbone.startswith('pvt'):
    for src, dst in _RESNET_BRANCHES:
      for k in [k for k in sd if k.startswith(src)]:
        sd[dst + k[len(src) :]] = np.array(sd[k], copy=True)
  if vggish is not None:
    for k, v in tw.vggish_flax_to_torch({'params': vggish['params']}).items():
      sd['vggish.' + k] = v
  return sd
