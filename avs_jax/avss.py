"""AVSS (AVSBench-semantic): constants, the class palette, checkpoints.

The reference's semantic setting (`avs_scripts/avss` of OpenNLPLab/AVSBench):
71 classes (index 0 the background), 10-frame clips (v1s/v1m clips of 5
frames are padded with a frame mask), label PNGs whose colours are the
palette below. Model, loss and metrics live with the others
(`models.AVSModel(num_classes=71, align_bias=False, tpavi_group=5)`,
`losses.avss_loss`, `metrics.avss_clip_metrics`).

Checkpoints: the official AVSS checkpoint (`torch.save(model.module.
state_dict())` of its `Pred_endecoder`) has the key layout of the S4/MS3
ones except that `tpavi_b*.align_channel` has no bias and `output_conv.4` has
71 output channels; `torch_to_flax` / `flax_to_torch` here infer those from
the keys and go through the generic mapping.
"""

from typing import Any, Dict, Mapping, Optional

import ml_collections
import numpy as np

from avs_jax import torch_weights as _tw
from avs_jax.data import records as _records

NUM_CLASSES = 71
FRAMES_PER_CLIP = 10
BACKGROUND = 0
SUBSETS = ('v1s', 'v1m', 'v2')


def temporal_masks(subset: str):
  """(frame mask, annotated-frame mask), each [10] float32, of a subset.

  The reference dataloader: v1s clips have 5 frames and only the first is
  annotated; v1m 5 frames, all annotated; v2 10 frames, all annotated.
  """
  if subset == 'v1s':
    return (
        np.array([1] * 5 + [0] * 5, np.float32),
        np.array([1] + [0] * 9, np.float32),
    )
  if subset == 'v1m':
    m = np.array([1] * 5 + [0] * 5, np.float32)
    return m, m.copy()
  if subset == 'v2':
    return np.ones(10, np.float32), np.ones(10, np.float32)
  raise ValueError(
      f'unknown AVSBench-semantic subset {subset!r}; expected '
      f'one of {SUBSETS}'
  )


def names_from_label2idx(path):
  """Class names by index from an AVSBench-semantic `label2idx.json`."""
  import json  # pylint: disable=g-import-not-at-top

  with open(path) as f:
    table = json.load(f)
  if not isinstance(table, dict) or sorted(table.values()) != list(
      range(len(table))
  ):
    raise ValueError(f'{path}: expected {{name: index}} with indices 0..K-1')
  return [n for n, _ in sorted(table.items(), key=lambda kv: kv[1])]


def class_names(data_config, num_classes=NUM_CLASSES):
  """The class names of a config: `data.label2idx` (a label2idx.json) if
  set, else the prepared dataset's `class_names.json`, else `class_<i>`."""
  path = data_config.get('label2idx', '')
  if path:
    return names_from_label2idx(path)
  try:
    names = _records.class_names(data_config.dir, 'avss')
  except _records.DataError:  # no dataset here (e.g. predict only)
    names = None
  return names or [f'class_{i}' for i in range(num_classes)]


def palette(num_classes: int = NUM_CLASSES) -> np.ndarray:
  """[num_classes, 3] uint8 RGB colour of each class (the reference's
  `get_v2_pallete`: the PASCAL-VOC bit-interleaved palette)."""
  pal = np.zeros((num_classes, 3), np.int64)
  for j in range(num_classes):
    lab, i = j, 0
    while lab > 0:
      for ch in range(3):
        pal[j, ch] |= ((lab >> ch) & 1) << (7 - i)
      i += 1
      lab >>= 3
  return pal.astype(np.uint8)


def color_to_label(
    rgb: np.ndarray, pal: Optional[np.ndarray] = None, strict: bool = False
) -> np.ndarray:
  """[H, W, 3] colour label image -> [H, W] int32 class indices.

  As the reference (`color_mask_to_label`), a colour that is not in the
  palette becomes class 0; `strict=True` raises instead, naming the colours.
  """
  pal = palette() if pal is None else pal
  rgb = np.asarray(rgb)
  if rgb.ndim != 3 or rgb.shape[-1] != 3:
    raise ValueError(f'a colour label must be [H, W, 3], got {rgb.shape}')
  code = (
      lambda x: (x[..., 0].astype(np.int64) << 16)
      | (x[..., 1].astype(np.int64) << 8)
      | x[..., 2].astype(np.int64)
  )
  keys = code(pal)
  order = np.argsort(keys)
  c = code(rgb)
  pos = np.clip(np.searchsorted(keys[order], c), 0, len(keys) - 1)
  hit = keys[order][pos] == c
  if strict and not hit.all():
    bad = np.unique(rgb[~hit].reshape(-1, 3), axis=0)[:5]
    raise ValueError(
        f'{int((~hit).sum())} pixels have colours outside the '
        f'{len(pal)}-class palette, e.g. {bad.tolist()}'
    )
  return np.where(hit, order[pos], BACKGROUND).astype(np.int32)


def label_to_color(label: np.ndarray, pal: Optional[np.ndarray] = None):
  """[H, W] class indices -> [H, W, 3] uint8 colours (the label PNGs')."""
  pal = palette() if pal is None else pal
  return pal[np.asarray(label)]


def model_config_from_state_dict(sd: Mapping[str, Any]):
  """The `model` config section that an AVS/AVSS state dict fits.

  Backbone from the encoder keys, classes from `output_conv.4.weight`,
  TPAVI stages from `tpavi_b*`, `align_bias` from `align_channel.bias`;
  `tpavi_group=5` when the head has more than one class (the reference's
  AVSS code). Raises ValueError naming what is missing.
  """
  sd = _tw.strip_module_prefix(sd)
  if 'output_conv.4.weight' not in sd:
    raise ValueError(
        'not an AVS/AVSS checkpoint: no output_conv.4.weight '
        f'(first keys: {sorted(sd)[:5]})'
    )
  if any(k.startswith('resnet.') for k in sd):
    backbone = 'resnet50'
  elif any(k.startswith('encoder_backbone.') for k in sd):
    depth3 = len(
        {
            k.split('.')[2]
            for k in sd
            if k.startswith('encoder_backbone.block3.')
        }
    )
    backbone = {
        2: 'pvt_v2_b0',
        4: 'pvt_v2_b1',
        6: 'pvt_v2_b2',
        18: 'pvt_v2_b3',
        27: 'pvt_v2_b4',
        40: 'pvt_v2_b5',
    }.get(depth3)
    if backbone is None:
      raise ValueError(f'unknown PVT-v2 depth: {depth3} blocks in stage 3')
  else:
    raise ValueError('no encoder keys (resnet.* or encoder_backbone.*)')
  stages = sorted(
      int(k[len('tpavi_b')]) - 1
      for k in sd
      if k.startswith('tpavi_b') and k.endswith('.g.weight')
  )
  num_classes = int(np.shape(sd['output_conv.4.weight'])[0])
  return ml_collections.ConfigDict(
      dict(
          backbone=backbone,
          channels=int(np.shape(sd['conv1.conv2d_list.0.weight'])[0]),
          head_channels=int(np.shape(sd['output_conv.0.weight'])[0]),
          tpavi_stages=tuple(stages),
          tpavi_mode='dot',
          tpavi_vv=False,
          tpavi_va=True,
          num_classes=num_classes,
          align_bias=any(k.endswith('align_channel.bias') for k in sd),
          tpavi_group=5 if num_classes > 1 else 0,
      )
  )


def torch_to_flax(state_dict: Mapping[str, Any], model_config=None):
  """An official AVSS checkpoint -> Flax variables (`{'params',
  'batch_stats'}`). `model_config` defaults to the one the keys imply; a
  given one must fit (the generic converter names missing/unexpected keys)."""
  if model_config is None:
    model_config = model_config_from_state_dict(state_dict)
  return _tw.torch_to_flax(state_dict, model_config)


def flax_to_torch(
    variables: Mapping[str, Any], model_config
) -> Dict[str, np.ndarray]:
  """Flax variables -> a state dict the reference AVSS `Pred_endecoder`
  loads with `strict=True`."""
  return _tw.flax_to_torch(variables, model_config)
