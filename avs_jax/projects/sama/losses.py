"""SAMA-AVS's losses (`models/sam.py:66-91`, `:176-185`, `:329-337`).

`loss` selects: `bce` (BCE with logits, mean over pixels), `bbce` (balanced
BCE: `w_neg * BCE(pos_weight = neg / pos)`, counts over the whole batch),
`iou` (BCE + the soft IoU loss, the reference's default). Logits and masks
`[B, T, H, W]`, every frame counted (the reference's loaders give one frame
per clip in training).
"""

import jax
import jax.numpy as jnp

LOSSES = ('bce', 'bbce', 'iou')


def _bce_terms(logits, masks, pos_weight=1.0):
  """Per-pixel `-(w y log s(x) + (1 - y) log(1 - s(x)))`, as PyTorch."""
  return pos_weight * masks * jax.nn.softplus(-logits) + (
      1 - masks
  ) * jax.nn.softplus(logits)


def bce(logits, masks):
  return jnp.mean(_bce_terms(logits, masks))


def bbce(logits, masks):
  pos = jnp.sum(masks) + 1e-10
  neg = jnp.sum(1.0 - masks)
  return pos / (pos + neg) * jnp.mean(_bce_terms(logits, masks, neg / pos))


def iou(logits, masks):
  """Mean over frames of `1 - sum(p g) / (sum(p + g) - sum(p g))`."""
  p = jax.nn.sigmoid(logits)
  inter = jnp.sum(p * masks, axis=(-2, -1))
  union = jnp.sum(p + masks, axis=(-2, -1)) - inter
  return jnp.mean(1 - inter / union)


def sama_loss(logits, masks, loss='iou'):
  """The reference's `backward_G` loss for `loss` in LOSSES."""
  masks = masks.astype(logits.dtype)
  if loss == 'bce':
    return bce(logits, masks)
  if loss == 'bbce':
    return bbce(logits, masks)
  if loss == 'iou':
    return bce(logits, masks) + iou(logits, masks)
  raise ValueError(f'loss must be one of {LOSSES}, got {loss!r}')
