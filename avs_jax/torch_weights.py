"""PyTorch state dicts: reading checkpoint files, and their keys <-> Flax variables.

Naming convention: Flax modules mirror the PyTorch module path, with list
indices folded into the name (`resnet.layer1.0.conv1.weight` lives at
`params/resnet/layer1_0/conv1/kernel`). Leaves: conv weights `[O, I, *k]`
become `kernel [*k, I, O]`, linear weights are transposed, norm weights
become `scale`, BatchNorm running statistics go to `batch_stats/{mean,var}`.

Accepted sources (`torch_to_flax` tells them apart by their keys):
  * official AVS checkpoints, ResNet-50 or PVT-v2 (with or without
    DataParallel's `module.` prefix) -> full model variables;
  * torchvision's ImageNet ResNet-50 (`resnet50-19c8e357.pth`) and
    `pvt_v2_b5.pth` -> variables of the encoder subtree only;
  * VGGish (`vggish-10086976.pth`, + `vggish_pca_params-970ea276.pth`) via
    `vggish_torch_to_flax`.
Files may be `.pth`/`.pt`/`.tar` (needs torch), `.npz` or `.safetensors`.

Training reads ImageNet backbones and VGGish through this module; the command
line over it is `python -m avs_jax.convert`.
"""

import json
import os
import re
import struct
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from avs_jax.models import build_model
from avs_jax.models import build_vggish

Params = Dict[str, Any]

# The reference ResNet's second branch: in every checkpoint, never used.
_UNUSED_RESNET = ('resnet.layer3_2.', 'resnet.layer4_2.')
_RESNET_BRANCHES = (
    ('resnet.layer3_1.', 'resnet.layer3_2.'),
    ('resnet.layer4_1.', 'resnet.layer4_2.'),
)


class ConversionError(ValueError):
  """A checkpoint does not fit the model: names the offending keys."""


# --------------------------------------------------------------------------
# Reading state dicts.


def _to_numpy(v):
  if isinstance(v, np.ndarray):
    return v
  if hasattr(v, 'detach'):  # torch.Tensor
    return (
        v.detach().cpu().float().numpy()
        if v.is_floating_point()
        else v.detach().cpu().numpy()
    )
  return np.asarray(v)


def _read_safetensors(path) -> Dict[str, np.ndarray]:
  """Minimal reader of the safetensors format (no extra dependency)."""
  dtypes = {
      'F32': np.float32,
      'F16': np.float16,
      'F64': np.float64,
      'I64': np.int64,
      'I32': np.int32,
      'U8': np.uint8,
      'I8': np.int8,
      'BOOL': np.bool_,
  }
  with open(path, 'rb') as f:
    (n,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(n))
    data = f.read()
  out = {}
  for k, meta in header.items():
    if k == '__metadata__':
      continue
    if meta['dtype'] == 'BF16':
      raw = np.frombuffer(
          data,
          np.uint16,
          offset=meta['data_offsets'][0],
          count=int(np.prod(meta['shape'])),
      )
      arr = (raw.astype(np.uint32) << 16).view(np.float32)
    elif meta['dtype'] in dtypes:
      start, end = meta['data_offsets']
      arr = np.frombuffer(data[start:end], dtypes[meta['dtype']])
    else:
      raise ConversionError(
          f'{path}: unsupported dtype {meta["dtype"]} ' f'for {k}'
      )
    out[k] = arr.reshape(meta['shape']).copy()
  return out


def _torch_load(path):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'reading {path} needs PyTorch (`pip install torch`, CPU build is '
        'enough); or save the state dict as .npz/.safetensors first'
    ) from e
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception:  # pylint: disable=broad-except
    # The VGGish PCA file pickles NumPy arrays, which weights_only refuses.
    return torch.load(path, map_location='cpu', weights_only=False)


def load_state_dict(path) -> Dict[str, np.ndarray]:
  """A PyTorch-style state dict `{key: array}` from .pth/.pt/.tar/.npz/.safetensors."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such checkpoint file')
  ext = os.path.splitext(path)[1].lower()
  if ext == '.npz':
    with np.load(path) as z:
      sd = {k: z[k] for k in z.files}
  elif ext == '.safetensors':
    sd = _read_safetensors(path)
  else:
    sd = _torch_load(path)
  for wrapper in ('state_dict', 'model', 'model_state_dict'):
    if (
        isinstance(sd, Mapping)
        and wrapper in sd
        and isinstance(sd[wrapper], Mapping)
    ):
      sd = sd[wrapper]
  if not isinstance(sd, Mapping):
    raise ConversionError(f'{path}: expected a state dict, got {type(sd)}')
  return {k: _to_numpy(v) for k, v in sd.items()}


# --------------------------------------------------------------------------
# Generic name and layout mapping.


def _split_key(key: str) -> Tuple[Tuple[str, ...], str]:
  """`a.b.0.c.weight` -> (('a', 'b_0', 'c'), 'weight')."""
  *mods, leaf = key.split('.')
  path = []
  for m in mods:
    if m.isdigit() and path:
      path[-1] = f'{path[-1]}_{m}'
    else:
      path.append(m)
  return tuple(path), leaf


def _join_path(path: Tuple[str, ...]) -> str:
  """Inverse of the module part of `_split_key`: ('a', 'b_0') -> 'a.b.0'."""
  return '.'.join(re.sub(r'^(.+)_(\d+)$', r'\1.\2', p) for p in path)


def _flatten(tree, prefix=()) -> Dict[Tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[Tuple[str, ...], Any]) -> Params:
  out: Params = {}
  for path, v in flat.items():
    d = out
    for p in path[:-1]:
      d = d.setdefault(p, {})
    d[path[-1]] = v
  return out


def _torch_to_flax_leaf(w: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel':
    if w.ndim >= 3:
      return np.transpose(w, tuple(range(2, w.ndim)) + (1, 0))
    if w.ndim == 2:
      return w.T
  return w


def _flax_to_torch_leaf(w: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel':
    if w.ndim >= 3:
      return np.transpose(
          w, (w.ndim - 1, w.ndim - 2) + tuple(range(w.ndim - 2))
      )
    if w.ndim == 2:
      return w.T
  return w


def _map_state_dict(
    sd: Mapping[str, np.ndarray],
    target: Mapping[Tuple[str, ...], Any],
    source: str,
) -> Params:
  """Maps torch keys onto the flattened `target` tree (shapes checked)."""
  flat, unexpected, mismatched = {}, [], []
  for key, w in sd.items():
    path, leaf = _split_key(key)
    if leaf == 'num_batches_tracked':
      continue
    if leaf == 'running_mean':
      dest = ('batch_stats',) + path + ('mean',)
    elif leaf == 'running_var':
      dest = ('batch_stats',) + path + ('var',)
    elif leaf == 'bias':
      dest = ('params',) + path + ('bias',)
    elif leaf == 'weight':
      dest = ('params',) + path + ('kernel',)
      if dest not in target:
        dest = ('params',) + path + ('scale',)
    else:
      dest = ('params',) + path + (leaf,)
    if dest not in target:
      unexpected.append(key)
      continue
    value = _torch_to_flax_leaf(np.asarray(w), dest[-1])
    want = tuple(target[dest].shape)
    if value.shape != want:
      mismatched.append(
          f'{key}: checkpoint {tuple(w.shape)} -> '
          f'{value.shape}, model wants {want}'
      )
      continue
    flat[dest] = value.astype(np.float32)
  missing = [_torch_key(p) for p in target if p not in flat]
  problems = []
  if missing:
    problems.append(
        f'missing keys ({len(missing)}): '
        + ', '.join(missing[:20])
        + (' ...' if len(missing) > 20 else '')
    )
  if unexpected:
    problems.append(
        f'unexpected keys ({len(unexpected)}): '
        + ', '.join(unexpected[:20])
        + (' ...' if len(unexpected) > 20 else '')
    )
  if mismatched:
    problems.append('shape mismatches: ' + '; '.join(mismatched[:20]))
  if problems:
    raise ConversionError(
        f'{source} does not fit the model:\n  ' + '\n  '.join(problems)
    )
  return _unflatten(flat)


def _torch_key(dest: Tuple[str, ...]) -> str:
  collection, *path, leaf = dest
  if collection == 'batch_stats':
    leaf = {'mean': 'running_mean', 'var': 'running_var'}[leaf]
  else:
    leaf = {'kernel': 'weight', 'scale': 'weight'}.get(leaf, leaf)
  return f'{_join_path(tuple(path))}.{leaf}'


def variables_to_torch(
    variables: Mapping[str, Any], add_num_batches_tracked=True
) -> Dict[str, np.ndarray]:
  """Any of our Flax variable trees -> a PyTorch-layout state dict."""
  out = {}
  for dest, v in _flatten(dict(variables)).items():
    if dest[0] not in ('params', 'batch_stats'):
      continue
    out[_torch_key(dest)] = _flax_to_torch_leaf(
        np.asarray(v, np.float32), dest[-1]
    )
    if (
        add_num_batches_tracked
        and dest[0] == 'batch_stats'
        and dest[-1] == 'mean'
    ):
      out[_torch_key(dest)[: -len('running_mean')] + 'num_batches_tracked'] = (
          np.zeros((), np.int64)
      )
  return out


# --------------------------------------------------------------------------
# The AVS model.


def model_shapes(model_config) -> Dict[Tuple[str, ...], Any]:
  """Flattened `{path: ShapeDtypeStruct}` of the model's variables."""
  model = build_model(model_config)
  frames = jax.ShapeDtypeStruct((1, 1, 64, 64, 3), jnp.float32)
  audio = jax.ShapeDtypeStruct((1, 1, 128), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), frames, audio)
  return _flatten(jax.tree_util.tree_map(lambda x: x, dict(shapes)))


def strip_module_prefix(sd):
  if sd and all(k.startswith('module.') for k in sd):
    return {k[len('module.') :]: v for k, v in sd.items()}
  return dict(sd)


def checkpoint_kind(sd: Mapping[str, Any]) -> str:
  """'avs', 'torchvision_resnet50' or 'pvt_v2' from a state dict's keys."""
  keys = set(sd)
  if any(k.startswith(('resnet.', 'encoder_backbone.')) for k in keys):
    return 'avs'
  if 'layer1.0.conv1.weight' in keys and 'conv1.weight' in keys:
    return 'torchvision_resnet50'
  if 'patch_embed1.proj.weight' in keys:
    return 'pvt_v2'
  raise ConversionError(
      'unrecognised checkpoint: expected an AVS checkpoint (keys resnet.* or '
      'encoder_backbone.*), torchvision ResNet-50 (conv1.*, layer1.*) or '
      f'PVT-v2 (patch_embed1.*); first keys: {sorted(keys)[:5]}'
  )


def _backbone_to_avs_keys(sd, kind):
  out = {}
  for k, v in sd.items():
    if kind == 'torchvision_resnet50':
      if k.startswith('fc.'):
        continue
      k = re.sub(r'^layer([34])\.', r'layer\1_1.', k)
      out['resnet.' + k] = v
    else:
      if k.startswith('head.'):
        continue
      out['encoder_backbone.' + k] = v
  return out


def torch_to_flax(state_dict: Mapping[str, Any], model_config) -> Params:
  """PyTorch state dict -> Flax variables `{'params', 'batch_stats'}`.

  A full AVS checkpoint gives the whole model; an ImageNet backbone checkpoint
  (torchvision ResNet-50, PVT-v2) gives only the encoder subtree (`resnet` or
  `encoder_backbone`), to merge with `merge_variables`. Raises
  `ConversionError` naming missing/unexpected keys and shape mismatches.
  """
  sd = {k: _to_numpy(v) for k, v in strip_module_prefix(state_dict).items()}
  kind = checkpoint_kind(sd)
  target = model_shapes(model_config)
  if kind == 'avs':
    sd = {k: v for k, v in sd.items() if not k.startswith(_UNUSED_RESNET)}
    return _map_state_dict(sd, target, 'AVS checkpoint')
  sd = _backbone_to_avs_keys(sd, kind)
  encoder = 'resnet' if kind == 'torchvision_resnet50' else 'encoder_backbone'
  if model_config.backbone.startswith('pvt') != (encoder == 'encoder_backbone'):
    raise ConversionError(
        f'a {kind} checkpoint does not fit backbone '
        f'{model_config.backbone!r}'
    )
  target = {p: s for p, s in target.items() if p[1] == encoder}
  return _map_state_dict(sd, target, f'{kind} checkpoint')


def backbone_variables(state_dict, backbone, name='backbone') -> Params:
  """An ImageNet checkpoint (torchvision ResNet-50, PVT-v2) -> the encoder's
  variables under `name` (AVSegFormer's encoder is `backbone`), from the
  same key mapping and checks as the AVS model's encoder."""
  sd = strip_module_prefix(state_dict)
  if checkpoint_kind(sd) == 'avs':
    raise ConversionError(
        'an AVS model checkpoint is not an ImageNet backbone checkpoint'
    )
  encoder_only = ml_collections.ConfigDict(
      dict(
          backbone=backbone,
          channels=16,
          tpavi_stages=(),
          tpavi_mode='dot',
          tpavi_vv=False,
          tpavi_va=False,
      )
  )
  enc = torch_to_flax(sd, encoder_only)
  return {col: {name: next(iter(t.values()))} for col, t in enc.items()}


def flax_to_torch(
    variables: Mapping[str, Any], model_config
) -> Dict[str, np.ndarray]:
  """Flax variables -> a state dict the reference `Pred_endecoder` loads strictly.

  The ResNet's unused second branch (`layer3_2`, `layer4_2`) is filled with a
  copy of the first, as the reference's ImageNet initialisation does.
  """
  sd = variables_to_torch(variables)
  if model_config.backbone == 'resnet50':
    for src, dst in _RESNET_BRANCHES:
      for k in [k for k in sd if k.startswith(src)]:
        sd[dst + k[len(src) :]] = sd[k].copy()
  return sd


def merge_variables(
    base: Mapping[str, Any], update: Mapping[str, Any]
) -> Params:
  """`base` with every leaf present in `update` replaced (same shapes)."""
  flat = _flatten(dict(base))
  for path, v in _flatten(dict(update)).items():
    if path not in flat:
      raise ConversionError(f'{"/".join(path)} is not in the model')
    if tuple(np.shape(flat[path])) != tuple(np.shape(v)):
      raise ConversionError(
          f'{"/".join(path)}: shape {np.shape(v)}, model '
          f'wants {np.shape(flat[path])}'
      )
    flat[path] = v
  return _unflatten(flat)


# --------------------------------------------------------------------------
# VGGish.


def vggish_torch_to_flax(
    state_dict: Mapping[str, Any],
    pca_state_dict: Optional[Mapping[str, Any]] = None,
) -> Params:
  """torchvggish state dict (+ PCA params) -> `{'params'[, 'pca']}`."""
  sd = {k: _to_numpy(v) for k, v in strip_module_prefix(state_dict).items()}
  # torchvggish's hub file may carry the PCA params inside the same dict.
  pca_keys = ('pca_eigen_vectors', 'pca_means')
  if pca_state_dict is None and all(k in sd for k in pca_keys):
    pca_state_dict = {k: sd[k] for k in pca_keys}
  sd = {k: v for k, v in sd.items() if k not in pca_keys}
  shapes = jax.eval_shape(
      build_vggish().init,
      jax.random.key(0),
      jax.ShapeDtypeStruct((1, 96, 64), jnp.float32),
  )
  target = {p: s for p, s in _flatten(dict(shapes)).items() if p[0] == 'params'}
  variables = _map_state_dict(sd, target, 'VGGish checkpoint')
  if pca_state_dict is not None:
    pca = {
        k.replace('pproc.', ''): _to_numpy(v) for k, v in pca_state_dict.items()
    }
    missing = [k for k in pca_keys if k not in pca]
    if missing:
      raise ConversionError(f'VGGish PCA params: missing keys {missing}')
    eig = np.asarray(pca['pca_eigen_vectors'], np.float32)
    means = np.asarray(pca['pca_means'], np.float32).reshape(-1)
    if eig.shape != (128, 128) or means.shape != (128,):
      raise ConversionError(
          f'VGGish PCA params: eigen_vectors {eig.shape} '
          f'(want (128, 128)), means {means.shape} (want '
          '(128,))'
      )
    variables['pca'] = {'eigen_vectors': eig, 'means': means}
  return variables


def vggish_flax_to_torch(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Inverse of `vggish_torch_to_flax` (PCA under torchvggish's names)."""
  sd = variables_to_torch({'params': variables['params']})
  if 'pca' in variables:
    sd['pca_eigen_vectors'] = np.asarray(variables['pca']['eigen_vectors'])
    sd['pca_means'] = np.asarray(variables['pca']['means']).reshape(-1, 1)
  return sd
