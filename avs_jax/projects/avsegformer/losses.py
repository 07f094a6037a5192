"""AVSegFormer's training losses (reference `scripts/{s4,ms3,avss}/loss.py`).

`IouSemanticAwareLoss`: `iou_weight * iou + mix_weight * mix`, where
  * iou: the mask loss on the logits, 'dice' (the S4/MS3 configs) or 'bce';
    S4 supervises each clip's first frame only, MS3 every frame, AVSS every
    labelled frame with per-pixel cross-entropy over the classes;
  * mix: the same loss applied to the channel mean of `mask_feature`
    (`[B, T, H/4, W/4, 256]`), bilinearly resized (align_corners=False) to
    the masks' size; for AVSS a dice loss against `labels > 0`.
The reference weights (configs): iou 1.0, mix 0.1.
"""

from typing import Any, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from avs_jax.losses import bce_with_logits
from avs_jax.models.layers import resize_bilinear

Array = Any


def _f32(x):
  """At least float32 (bf16 -> f32; f64 stays f64)."""
  return jnp.asarray(x).astype(
      jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)
  )


def dice_loss(
    logits: Array, masks: Array, weights: Optional[Array] = None
) -> Array:
  """`1 - 2 sum(p g) / (sum(p^2) + sum(g^2) + 0.002)` per frame, p = sigmoid.

  logits, masks: `[..., H, W]`; weights: optional `[...]` per-frame weights
  (the mean is then `sum(w * loss) / sum(w)`, as the AVSS reference).
  """
  p = jax.nn.sigmoid(_f32(logits))
  g = masks.astype(p.dtype)
  a = jnp.sum(p * g, (-2, -1))
  b = jnp.sum(p * p, (-2, -1)) + 0.001
  c = jnp.sum(g * g, (-2, -1)) + 0.001
  loss = 1 - 2 * a / (b + c)
  if weights is None:
    return loss.mean()
  return _weighted_mean(loss, weights)


def bce_loss(logits: Array, masks: Array) -> Array:
  """`nn.BCELoss()(sigmoid(logits), masks)`: the mean over every pixel."""
  return bce_with_logits(logits, masks).mean()


def cross_entropy_loss(logits: Array, labels: Array, weights: Array) -> Array:
  """AVSS: per-pixel CE over classes, mean over pixels, weighted frame mean.

  logits `[B, T, H, W, K]`, labels int `[B, T, H, W]`, weights `[B, T]`.
  """
  logp = jax.nn.log_softmax(_f32(logits), -1)
  ce = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), -1)[
      ..., 0
  ]
  return _weighted_mean(ce.mean((-2, -1)), weights)


def _weighted_mean(per_frame, weights):
  w = weights.astype(per_frame.dtype)
  return jnp.sum(per_frame * w) / jnp.sum(w)


def _mix_map(mask_feature: Array, size) -> Array:
  """Channel mean of `[B, T, h, w, C]`, resized to `size`: `[B, T, H, W]`."""
  m = jnp.mean(_f32(mask_feature), -1, keepdims=True)
  return resize_bilinear(m, size, align_corners=False)[..., 0]


def avsegformer_loss(
    outputs: Mapping[str, Array],
    masks: Array,
    *,
    setting: str,
    loss_type: str = 'dice',
    iou_weight: float = 1.0,
    mix_weight: float = 0.1,
    labelled: Optional[Array] = None,
) -> Tuple[Array, dict]:
  """The reference `IouSemanticAwareLoss` of each setting.

  Args:
    outputs: the model's dict: `logits` (`[B, T, H, W]`, or `[B, T, H, W, K]`
      for AVSS) and `mask_feature` `[B, T, h, w, C]`.
    masks: `[B, T, H, W]`: {0, 1} for 's4'/'ms3' ('s4' reads frame 0 of each
      clip; `[B, 1, H, W]` is accepted), int class indices for 'avss'.
    setting: 's4', 'ms3' or 'avss'.
    loss_type: 'dice' (the released configs) or 'bce'; S4/MS3 only.
    iou_weight, mix_weight: the config's `weight_dict`.
    labelled: AVSS only: `[B, T]` `gt_temporal_mask_flag` (1 for frames with
      a ground truth); required there.

  Returns:
    `(loss, {'iou': unweighted iou loss, 'mix': unweighted mix loss})`.
  """
  logits, feature = outputs['logits'], outputs['mask_feature']
  if setting in ('s4', 'ms3'):
    if loss_type not in ('dice', 'bce'):
      raise ValueError(f"loss_type must be 'dice' or 'bce', got {loss_type!r}")
    fn = dice_loss if loss_type == 'dice' else bce_loss
    if setting == 's4':
      logits, feature, masks = logits[:, :1], feature[:, :1], masks[:, :1]
    iou = fn(logits, masks)
    mix = fn(_mix_map(feature, masks.shape[-2:]), masks)
  elif setting == 'avss':
    if labelled is None:
      raise ValueError(
          "setting 'avss' needs labelled [B, T] " '(gt_temporal_mask_flag)'
      )
    iou = cross_entropy_loss(logits, masks, labelled)
    mix = dice_loss(
        _mix_map(feature, masks.shape[-2:]),
        (masks > 0).astype(jnp.int32),
        labelled,
    )
  else:
    raise ValueError(f"setting must be 's4', 'ms3' or 'avss', got {setting!r}")
  return iou_weight * iou + mix_weight * mix, {'iou': iou, 'mix': mix}
