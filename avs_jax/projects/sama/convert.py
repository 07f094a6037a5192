"""SAM's released checkpoints and SAMA-AVS state dicts -> Flax (and back).

Two sources, both PyTorch state dicts:

* SAM's released checkpoints (`sam_vit_{b,l,h}_*.pth`, the state dict of
  segment-anything's `Sam`): `image_encoder.*`, `prompt_encoder.*`,
  `mask_decoder.*`. `sam_to_flax` puts `image_encoder.*` and
  `mask_decoder.*` into initialised SAMA params. As in the reference
  (`load_state_dict(sam_checkpoint, strict=False)`, `train_avs.py:176-177`),
  `prompt_encoder.*` is not used: SAMA's `no_mask_embed` and `pe_layer` are
  its own (randomly initialised) and the audio prompt generator is new.
* The reference's trained SAMA-AVS state dict (`model_epoch_best.pth`, of
  `models/sam.py:SAM`): every key maps (`sama_to_flax`); its frozen VGGish
  `audio_encoder.audio_backbone.*` goes to our VGGish (`vggish_variables`).

Keys map by name with the project's generic rules (`a.b.0.c.weight` ->
`a/b_0/c/kernel`, Linear/conv kernels transposed), plus: the three
embeddings' `weight` <-> `embedding`, and the transposed convolutions
(`mask_decoder.output_upscaling.{0,3}.weight`, PyTorch `[in, out, 2, 2]`)
<-> `kernel [2, 2, in, out]`. Missing, unexpected and mis-shaped keys are
named in the `ConversionError`, under the checkpoint's own names.
"""

import functools
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from avs_jax import torch_weights as tw

ConversionError = tw.ConversionError
load_state_dict = tw.load_state_dict

_EMBEDDINGS = (
    'mask_decoder.iou_token.',
    'mask_decoder.mask_tokens.',
    'no_mask_embed.',
)
_CONV_T = (
    'mask_decoder.output_upscaling.0.weight',
    'mask_decoder.output_upscaling.3.weight',
)
_VGGISH = 'audio_encoder.audio_backbone.'
_SAM_ONLY = 'prompt_encoder.'
# Ours only (not in SAM's checkpoints): kept from the initialised params.
_NEW = ('image_encoder.prompt_generator.', 'no_mask_embed.', 'pe_layer.')  # fmt: skip


def _ours_key(key: str) -> str:
  for e in _EMBEDDINGS:
    if key == e + 'weight':
      return e + 'embedding'
  return key


def _reference_key(key: str) -> str:
  for e in _EMBEDDINGS:
    if key == e + 'embedding':
      return e + 'weight'
  return key


def _to_ours(key: str, w):
  if key in _CONV_T:  # [in, out, kh, kw] -> [out, in, kh, kw]: generic rule
    w = np.transpose(w, (1, 0, 2, 3))
  return _ours_key(key), w


def _to_reference(key: str, w):
  key = _reference_key(key)
  if key in _CONV_T:
    w = np.transpose(w, (1, 0, 2, 3))
  return key, w


def model_shapes(model_config) -> Dict[Tuple[str, ...], Any]:
  """Flattened `{path: ShapeDtypeStruct}` of SAMA's variables."""
  from avs_jax.projects.sama import model as sama  # pylint: disable=g-import-not-at-top

  return dict(_shapes(sama.build_model(model_config)))


@functools.lru_cache(maxsize=8)
def _shapes(model):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  s = model.image_size
  frames = jax.ShapeDtypeStruct((1, 1, s, s, 3), jnp.float32)
  audio = jax.ShapeDtypeStruct((1, 1, 128), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), frames, audio)
  return tuple(tw._flatten(dict(shapes)).items())  # pylint: disable=protected-access


def _map(sd, target, source):
  """`tw._map_state_dict` with our renames; errors name the reference keys."""
  ours = dict(_to_ours(k, np.asarray(tw._to_numpy(v))) for k, v in sd.items())  # pylint: disable=protected-access
  try:
    return tw._map_state_dict(ours, target, source)  # pylint: disable=protected-access
  except ConversionError as e:
    msg = str(e)
    for emb in _EMBEDDINGS:
      msg = msg.replace(emb + 'embedding', emb + 'weight')
    for key in _CONV_T:  # the shape as in the checkpoint, not pre-permuted
      msg = re.sub(
          re.escape(key) + r': checkpoint \((\d+), (\d+),',
          lambda m: f'{m.group(0).split(":")[0]}: checkpoint '
          f'({m.group(2)}, {m.group(1)},',
          msg,
      )
    raise ConversionError(msg) from None


def split_vggish(state_dict: Mapping[str, Any]):
  """`(model_sd, vggish_sd)`: the `audio_encoder.audio_backbone.*` keys,
  unprefixed, split off."""
  sd = tw.strip_module_prefix(state_dict)
  vggish = {
      k[len(_VGGISH) :]: v for k, v in sd.items() if k.startswith(_VGGISH)
  }
  return {k: v for k, v in sd.items() if not k.startswith(_VGGISH)}, vggish


def sama_to_flax(state_dict: Mapping[str, Any], model_config) -> Dict:
  """The reference's SAMA-AVS state dict -> `{'params': ...}` (every key)."""
  sd, _ = split_vggish(state_dict)
  if any(k.startswith(_SAM_ONLY) for k in sd):
    raise ConversionError(
        'this is a SAM checkpoint (it has prompt_encoder.* keys), not a '
        'SAMA-AVS state dict: use sam_to_flax'
    )
  return _map(sd, model_shapes(model_config), 'SAMA-AVS state dict')


def sam_to_flax(
    state_dict: Mapping[str, Any], model_config, params: Mapping[str, Any]
) -> Dict:
  """SAM's released checkpoint into `params` (SAMA's initialised params):
  `image_encoder.*` (but the prompt generator) and `mask_decoder.*` are
  replaced, the rest is kept. `prompt_encoder.*` is not used (see the module
  docstring). Returns `{'params': ...}`."""
  sd = tw.strip_module_prefix(state_dict)
  if any(k.startswith(_NEW) for k in sd):
    raise ConversionError(
        'this looks like a SAMA-AVS state dict (it has '
        f'{next(k for k in sd if k.startswith(_NEW))}), not a SAM checkpoint: '
        'use sama_to_flax'
    )
  sd = {k: v for k, v in sd.items() if not k.startswith(_SAM_ONLY)}
  new = tuple(tuple(k.rstrip('.').replace('.', '/').split('/')) for k in _NEW)
  target = {
      p: s
      for p, s in model_shapes(model_config).items()
      if not any(p[1 : 1 + len(n)] == n for n in new)
  }
  loaded = tw._flatten(_map(sd, target, 'SAM checkpoint'))  # pylint: disable=protected-access
  flat = tw._flatten({'params': dict(params)})  # pylint: disable=protected-access
  flat.update(loaded)
  return tw._unflatten(flat)  # pylint: disable=protected-access


def vggish_variables(state_dict: Mapping[str, Any]) -> Optional[Dict]:
  """The state dict's frozen VGGish as our VGGish variables (None if absent)."""
  _, vggish = split_vggish(state_dict)
  return tw.vggish_torch_to_flax(vggish) if vggish else None


def flax_to_torch(
    variables: Mapping[str, Any], vggish: Optional[Mapping[str, Any]] = None
) -> Dict[str, np.ndarray]:
  """Flax variables -> the reference SAMA-AVS state dict layout (with
  `audio_encoder.audio_backbone.*` from our VGGish variables if given)."""
  sd = dict(
      _to_reference(k, v)
      for k, v in tw.variables_to_torch({'params': variables['params']}).items()
  )
  if vggish is not None:
    for k, v in tw.vggish_flax_to_torch({'params': vggish['params']}).items():
      sd[_VGGISH + k] = v
  return sd


def expected_state_dict_shapes(model_config) -> Dict[str, Tuple[int, ...]]:
  """`{reference key: shape}` of the SAMA-AVS state dict (VGGish aside) that
  `model_config`'s model converts to (no weights are made: zero-stride
  arrays go through `flax_to_torch`)."""
  flat = {
      p[1:]: np.broadcast_to(np.float32(0), s.shape)
      for p, s in model_shapes(model_config).items()
  }
  params = tw._unflatten(flat)  # pylint: disable=protected-access
  return {
      k: tuple(v.shape) for k, v in flax_to_torch({'params': params}).items()
  }
