"""Training losses of AVS (Zhou et al., ECCV 2022): BCE and the AVM losses.

Layout: ``logits`` and ``masks`` are ``[B, T, H, W]``; visual maps are
``[B, T, h, w, C]`` and audio features ``[B, T, C]`` (the reference flattens
B*T and uses NCHW; frames are ordered clip-major in both).

Total loss (reference ``IouSemanticAwareLoss``)::

  loss = bce + avm_weight * avm

* ``bce``: ``nn.BCELoss`` on ``sigmoid(logits)``, averaged over pixels and the
  supervised frames: the first frame of each clip for ``setting='s4'``
  (reference ``F1_IoU_BCELoss``), every frame for ``'ms3'``
  (``F5_IoU_BCELoss``).
* ``avm``: mean over ``avm_stages`` of a per-stage audio-visual matching loss,
  either Loss_AVM_AV (reference ``A_MaskedV_SimmLoss``, the default) or
  Loss_AVM_VV (``closer_loss``, ``avm_closer=True``). See ``avm_loss``.

The option defaults are the reference MS3 recipe (``train.sh``: KL, average
mask pooling, no feature normalisation, no thresholding, AVM-AV) except
``avm_weight`` / ``avm_stages``, which default to "off" like the reference's
argparse defaults; the MS3 recipe is ``avm_weight=0.5, avm_stages=(0, 1, 2, 3)``.
The S4 recipe uses no AVM loss. (The S4 folder of the reference has its own,
unused-by-its-recipe AVM variant with a cosine loss; it is not implemented.)

Numerics: BCE is computed from logits with ``log_sigmoid`` and the log clamped
at -100 like ``torch.nn.BCELoss``. It equals the reference up to float32
rounding except where the reference's float32 ``sigmoid`` saturates to exactly
0 or 1 (``|logit|`` above ~16.6 on the wrong side of the label), where torch
reads ``log(0) -> -100`` and this returns the exact ``-|logit|`` (clamped at
-100). Likewise KL uses ``log_softmax`` where the reference takes
``log(softmax(.))``; they agree unless a softmax entry underflows.
"""

from typing import Any, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_LOG_CLAMP = -100.0  # torch.nn.BCELoss clamps log(p), log(1-p) at -100.


# ----------------------------------------------------------------------------
# Adaptive pooling (exact PyTorch bins).


def _adaptive_bins(
    in_size: int, out_size: int
) -> Tuple[np.ndarray, np.ndarray]:
  """Static gather indices [out, L] and validity [out, L] of PyTorch's bins.

  Bin i covers ``[floor(i * in / out), ceil((i + 1) * in / out))``.
  """
  i = np.arange(out_size)
  start = (i * in_size) // out_size
  end = -((-(i + 1) * in_size) // out_size)  # ceil division
  length = int((end - start).max())
  offs = np.arange(length)
  idx = start[:, None] + offs[None, :]
  valid = idx < end[:, None]
  idx = np.where(valid, idx, start[:, None])  # pad with an in-bin index
  return idx, valid


def _adaptive_pool_axis(
    x: Array, axis: int, out_size: int, reduce: str
) -> Array:
  in_size = x.shape[axis]
  axis = axis % x.ndim
  if in_size == out_size:
    return x
  if in_size % out_size == 0:  # plain non-overlapping windows
    k = in_size // out_size
    x = x.reshape(x.shape[:axis] + (out_size, k) + x.shape[axis + 1 :])
    return x.mean(axis + 1) if reduce == 'avg' else x.max(axis + 1)
  idx, valid = _adaptive_bins(in_size, out_size)
  g = jnp.take(x, jnp.asarray(idx.reshape(-1)), axis=axis)
  g = g.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1 :])
  shape = (1,) * axis + valid.shape + (1,) * (x.ndim - axis - 1)
  valid = valid.reshape(shape)
  if reduce == 'avg':
    count = valid.sum(axis + 1)
    return jnp.where(valid, g, 0).sum(axis + 1) / count.astype(g.dtype)
  return g.max(axis + 1)  # padding repeats an in-bin element: max unchanged


def adaptive_pool2d(
    x: Array, output_size: Tuple[int, int], reduce: str = 'avg'
) -> Array:
  """``nn.AdaptiveAvgPool2d`` / ``AdaptiveMaxPool2d`` over the last two axes.

  Args:
    x: [..., H, W].
    output_size: (h, w).
    reduce: 'avg' or 'max'.

  Returns:
    [..., h, w]. Bins are PyTorch's (rectangular, so pooling is separable).
  """
  if reduce not in ('avg', 'max'):
    raise ValueError(f'reduce must be "avg" or "max", got {reduce!r}')
  h, w = output_size
  x = _adaptive_pool_axis(x, -2, h, reduce)
  return _adaptive_pool_axis(x, -1, w, reduce)


# ----------------------------------------------------------------------------
# Building blocks.


def bce_with_logits(logits: Array, targets: Array) -> Array:
  """Per-element ``nn.BCELoss(reduction='none')(sigmoid(logits), targets)``."""
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  log_p = jnp.maximum(jax.nn.log_sigmoid(logits), _LOG_CLAMP)
  log_1mp = jnp.maximum(jax.nn.log_sigmoid(-logits), _LOG_CLAMP)
  return -(targets * log_p + (1.0 - targets) * log_1mp)


def _l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """``F.normalize(x, dim=-1)``: x / max(||x||, eps), finite gradient at 0."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _safe_norm(x: Array) -> Array:
  sq = jnp.sum(x * x, axis=-1)
  safe = jnp.where(sq > 0, sq, 1.0)
  return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def _pairwise_distance(x1: Array, x2: Array, eps: float = 1e-6) -> Array:
  """``F.pairwise_distance(x1, x2, p=2)``: ||x1 - x2 + eps|| over the last axis."""
  return _safe_norm(x1 - x2 + eps)


def _kl_sum(input_logits: Array, target_logits: Array) -> Array:
  """``F.kl_div(log(softmax(input)), softmax(target), reduction='sum')``."""
  log_q = jax.nn.log_softmax(input_logits, axis=-1)
  log_p = jax.nn.log_softmax(target_logits, axis=-1)
  p = jnp.exp(log_p)
  return jnp.sum(p * (log_p - log_q))


def _distance_loss(a: Array, b: Array, kind: str) -> Array:
  """Loss between per-frame features a (target) and b (input), both [N, C]."""
  if kind == 'euclidean':
    return jnp.mean(_pairwise_distance(a, b))
  return _kl_sum(b, a)  # kl_div(log softmax(b), softmax(a), 'sum')


def _pooled_mask(logits: Array, hw: Tuple[int, int], pooling: str) -> Array:
  """sigmoid(adaptive_pool(logits)): [B, T, H, W] -> [B, T, h, w, 1]."""
  m = adaptive_pool2d(logits.astype(jnp.float32), hw, pooling)
  return jax.nn.sigmoid(m)[..., None]


def avm_av_stage(
    logits: Array,
    v_map: Array,
    a_fea: Array,
    *,
    loss: str = 'kl',
    threshold: bool = False,
    norm: bool = False,
    pooling: str = 'avg',
) -> Array:
  """One stage of Loss_AVM_AV (reference ``A_MaskedV_SimmLoss``).

  Args:
    logits: [B, T, H, W] mask logits.
    v_map: [B, T, h, w, C] visual map.
    a_fea: [B, T, C] audio feature.
    loss: 'kl' (``kl_div(log softmax(v), softmax(a), reduction='sum')``, a sum
      over every frame and channel) or 'euclidean' (mean over frames of
      ``pairwise_distance(a, v)``).
    threshold: binarise the pooled mask (> 0.5, no gradient) and average the
      masked map over the mask's pixels (sum / (count + 1e-6)) instead of over
      all h*w pixels.
    norm: L2-normalise audio and masked visual features first.
    pooling: 'avg' or 'max' adaptive pooling of the logits to (h, w).

  Returns:
    Scalar loss.
  """
  b, t, h, w, c = v_map.shape
  mask = _pooled_mask(logits, (h, w), pooling)
  v_map = v_map.astype(jnp.float32)
  if threshold:
    mask = (mask > 0.5).astype(jnp.float32)
    count = mask.sum(axis=(2, 3))  # [B, T, 1]
    v = (v_map * mask).sum(axis=(2, 3)) / (count + 1e-6)
  else:
    v = (v_map * mask).mean(axis=(2, 3))  # [B, T, C]
  a = a_fea.astype(jnp.float32)
  if norm:
    a, v = _l2_normalize(a), _l2_normalize(v)
  return _distance_loss(a.reshape(b * t, c), v.reshape(b * t, c), loss)


def avm_vv_stage(
    logits: Array,
    v_map: Array,
    a_fea: Array,
    *,
    loss: str = 'kl',
    norm: bool = False,
    pooling: str = 'avg',
) -> Array:
  """One stage of Loss_AVM_VV (reference ``closer_loss``).

  Each frame's masked visual feature is pulled towards that of the frame whose
  audio feature is nearest (L2, over all B*T frames of the batch, itself
  excluded by adding 10 to the diagonal, argmin over axis 0 as the reference).
  The pairing is not differentiated; the partner's feature is (no stop-grad,
  as in the reference).

  Args: as ``avm_av_stage`` (no ``threshold``). ``norm`` normalises the audio
  features used for pairing and the masked visual features.

  Returns:
    Scalar loss.
  """
  b, t, h, w, c = v_map.shape
  mask = _pooled_mask(logits, (h, w), pooling)
  a = a_fea.astype(jnp.float32).reshape(b * t, c)
  if norm:
    a = _l2_normalize(a)
  dist = _safe_norm(a[:, None, :] - a[None, :, :])  # torch.cdist(a, a, p=2)
  dist = dist + 10.0 * jnp.eye(b * t, dtype=dist.dtype)
  idx = jnp.argmin(dist, axis=0)
  v = (v_map.astype(jnp.float32) * mask).mean(axis=(2, 3)).reshape(b * t, c)
  if norm:
    v = _l2_normalize(v)
  return _distance_loss(v[idx], v, loss)


# ----------------------------------------------------------------------------
# Full loss.


def bce_loss(
    logits: Array,
    masks: Array,
    *,
    setting: str,
    labelled: Optional[Array] = None,
) -> Array:
  """Mean BCE over the supervised frames.

  Args:
    logits: [B, T, H, W].
    masks: [B, T, H, W] in {0, 1}; for 's4' [B, 1, H, W] is accepted too.
    setting: 's4' (first frame of each clip only) or 'ms3' (all frames).
    labelled: optional [B, T] (or [B] for 's4') per-frame weights, e.g. 0 for
      padding clips or unannotated frames. The loss is the weighted mean of the
      per-frame mean BCE (equal to the plain mean when all weights are 1),
      and 0 when all weights are 0.

  Returns:
    Scalar.
  """
  if setting == 's4':
    logits, masks = logits[:, :1], masks[:, :1]
    if labelled is not None and labelled.ndim == 2:
      labelled = labelled[:, :1]
  elif setting != 'ms3':
    raise ValueError(f'setting must be "s4" or "ms3", got {setting!r}')
  per_pixel = bce_with_logits(logits, masks)
  if labelled is None:
    return per_pixel.mean()
  per_frame = per_pixel.mean(axis=(-2, -1))  # [B, T']
  wgt = jnp.broadcast_to(
      labelled.reshape(labelled.shape[0], -1).astype(jnp.float32),
      per_frame.shape,
  )
  total = wgt.sum()
  return jnp.where(
      total > 0, (wgt * per_frame).sum() / jnp.where(total > 0, total, 1.0), 0.0
  )


def _check_avm_options(avm_loss, avm_pooling, avm_closer, avm_threshold):
  """ValueError for an AVM option the reference does not have."""
  if avm_loss not in ('kl', 'euclidean'):
    raise ValueError(f'avm_loss must be "kl" or "euclidean", got {avm_loss!r}')
  if avm_pooling not in ('avg', 'max'):
    raise ValueError(f'avm_pooling must be "avg" or "max", got {avm_pooling!r}')
  if avm_closer and avm_threshold:
    raise ValueError(
        'avm_threshold does not apply to avm_closer (the '
        'reference closer_loss has no thresholding).'
    )


def _avm_inputs(outputs, stages):
  """`(visual_maps, audio_features)` of the model outputs, checked for
  `stages`."""
  v_maps, a_feas = outputs.get('visual_maps'), outputs.get('audio_features')
  if v_maps is None or a_feas is None or any(a_feas[s] is None for s in stages):
    raise ValueError(
        'avm_stages needs outputs["visual_maps"] and outputs["audio_features"]'
        ' of those stages (TPAVI audio-visual blocks there; audio_features is'
        ' None when the model has none).'
    )
  return v_maps, a_feas


def avs_loss(
    outputs: Mapping[str, Any],
    masks: Array,
    *,
    setting: str,
    avm_weight: float = 0.0,
    avm_stages: Sequence[int] = (),
    avm_loss: str = 'kl',
    avm_closer: bool = False,
    avm_threshold: bool = False,
    avm_norm: bool = False,
    avm_pooling: str = 'avg',
    labelled: Optional[Array] = None,
) -> Tuple[Array, dict]:
  """AVS training loss: ``bce + avm_weight * avm``.

  Args:
    outputs: model outputs: 'logits' [B, T, H, W]; with ``avm_stages`` also
      'visual_maps' (sequence of [B, T, h, w, C]) and 'audio_features'
      (sequence of [B, T, C]).
    masks: [B, T, H, W] ground truth in {0, 1} ([B, 1, H, W] ok for 's4').
    setting: 's4' (BCE on each clip's first frame) or 'ms3' (all frames).
    avm_weight: lambda_1 of the reference (MS3 recipe: 0.5).
    avm_stages: stages the AVM loss is averaged over (MS3 recipe: (0, 1, 2, 3));
      empty: no AVM loss (``aux['avm'] = 0``). With stages and weight 0 the AVM
      loss is still computed and logged.
    avm_loss: 'kl' (reference ``--kl_flag``, default) or 'euclidean'
      (``--euclidean_flag``).
    avm_closer: use Loss_AVM_VV (``--closer_flag``) instead of Loss_AVM_AV.
    avm_threshold: binarise the downsampled mask (``--threshold_flag``);
      AVM-AV only.
    avm_norm: L2-normalise features (``--norm_fea_flag``).
    avm_pooling: 'avg' or 'max' mask downsampling (``--mask_pooling_type``).
    labelled: optional per-frame BCE weights, see ``bce_loss``. The AVM loss
      needs no labels and uses every frame, as in the reference.

  Returns:
    (loss, aux) with scalar ``loss`` and ``aux = {'bce': ..., 'avm': ...}``.
  """
  # long: one argument and one branch per loss option of the reference.
  _check_avm_options(avm_loss, avm_pooling, avm_closer, avm_threshold)
  logits = outputs['logits']
  bce = bce_loss(logits, masks, setting=setting, labelled=labelled)

  stages = tuple(avm_stages)
  if stages:
    v_maps, a_feas = _avm_inputs(outputs, stages)
    per_stage = []
    for s in stages:
      if avm_closer:
        per_stage.append(
            avm_vv_stage(
                logits,
                v_maps[s],
                a_feas[s],
                loss=avm_loss,
                norm=avm_norm,
                pooling=avm_pooling,
            )
        )
      else:
        per_stage.append(
            avm_av_stage(
                logits,
                v_maps[s],
                a_feas[s],
                loss=avm_loss,
                threshold=avm_threshold,
                norm=avm_norm,
                pooling=avm_pooling,
            )
        )
    avm = sum(per_stage) / len(per_stage)
  else:
    avm = jnp.zeros((), jnp.float32)
  loss = bce + avm_weight * avm
  return loss, {'bce': bce, 'avm': avm}


# ----------------------------------------------------------------------------
# AVSS (AVSBench-semantic): the reference's `avs_scripts/avss/loss.py`.
#
# Layout: ``logits`` [B, T, H, W, K] (K classes, 0 = background), ``labels``
# [B, T, H, W] int class indices, ``gt_mask`` [B, T]: 1 for annotated frames
# (reference ``gt_temporal_mask_flag``: v1s clips only their first frame, v1m
# their 5 frames, v2 all 10; padded frames 0). Frame-level terms are weighted
# means ``sum(l * gt_mask) / sum(gt_mask)`` as the reference (0 here when the
# mask is all zero, where the reference divides by zero).


def _masked_frame_mean(per_frame: Array, gt_mask: Array) -> Array:
  wgt = jnp.broadcast_to(gt_mask.astype(jnp.float32), per_frame.shape)
  total = wgt.sum()
  return jnp.where(
      total > 0, (wgt * per_frame).sum() / jnp.where(total > 0, total, 1.0), 0.0
  )


def avss_ce_loss(logits: Array, labels: Array, gt_mask: Array) -> Array:
  """Reference ``F10_IoU_BCELoss``: per-frame mean pixel cross-entropy,
  weighted by ``gt_mask``. logits [B, T, H, W, K], labels [B, T, H, W]."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(
      logp, labels[..., None].astype(jnp.int32), axis=-1
  )[..., 0]
  return _masked_frame_mean(nll.mean(axis=(-2, -1)), gt_mask)


def avss_avm_stage(
    fg: Array,
    v_map: Array,
    a_fea: Array,
    gt_mask: Array,
    *,
    loss: str = 'kl',
    norm: bool = False,
    threshold: bool = False,
    pooling: str = 'avg',
    closer: bool = False,
) -> Array:
  """One stage of the AVSS AVM loss (``A_MaskedV_SimmLoss`` / ``closer_loss``).

  Args:
    fg: [B, T, H, W] float foreground mask (argmax of the logits is not the
      background class; not differentiable, as in the reference).
    v_map: [B, T, h, w, C]; a_fea: [B, T, C]; gt_mask: [B, T].
    loss, norm, threshold, pooling: as ``avm_av_stage`` (but no sigmoid: the
      pooled mask is the adaptive pool of ``fg``).
    closer: Loss_AVM_VV. Each frame's partner is the frame of nearest audio
      feature among all B*T (diagonal + 10, argmin over axis 0). With 'kl'
      the reference compares the masked visual feature with the AUDIO
      feature, not the partner's visual feature (as its code does); with
      'euclidean' it uses the partner's masked visual feature.

  Returns:
    Scalar: per-frame losses weighted by ``gt_mask``.
  """
  b, t, h, w, c = v_map.shape
  mask = adaptive_pool2d(fg.astype(jnp.float32), (h, w), pooling)[..., None]
  v_map = v_map.astype(jnp.float32)
  a = a_fea.astype(jnp.float32).reshape(b * t, c)
  if threshold and not closer:
    mask = (mask > 0.5).astype(jnp.float32)
    count = mask.sum(axis=(2, 3))
    v = (v_map * mask).sum(axis=(2, 3)) / (count + 1e-6)
  else:
    v = (v_map * mask).mean(axis=(2, 3))
  v = v.reshape(b * t, c)
  if closer:
    if norm:
      a = _l2_normalize(a)
    dist = _safe_norm(a[:, None, :] - a[None, :, :])
    dist = dist + 10.0 * jnp.eye(b * t, dtype=dist.dtype)
    idx = jnp.argmin(dist, axis=0)
    if norm:
      v = _l2_normalize(v)
    target = v[idx] if loss == 'euclidean' else a
  else:
    if norm:
      a, v = _l2_normalize(a), _l2_normalize(v)
    target = a
  if loss == 'euclidean':
    per_frame = _pairwise_distance(target, v)
  else:
    log_q = jax.nn.log_softmax(v, axis=-1)
    log_p = jax.nn.log_softmax(target, axis=-1)
    per_frame = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return _masked_frame_mean(per_frame.reshape(b, t), gt_mask)


def avss_loss(
    outputs: Mapping[str, Any],
    labels: Array,
    gt_mask: Array,
    *,
    avm_weight: float = 0.0,
    avm_stages: Sequence[int] = (),
    avm_loss: str = 'kl',
    avm_closer: bool = False,
    avm_threshold: bool = False,
    avm_norm: bool = False,
    avm_pooling: str = 'avg',
) -> Tuple[Array, dict]:
  """AVSS training loss (reference ``IouSemanticAwareLoss`` of ``avss``).

  ``loss = ce + avm_weight * avm``; the reference recipe (``train.sh``) is
  ``avm_weight=0.5, avm_stages=(0, 1, 2, 3)``, KL, average pooling, no
  normalisation or thresholding.

  Args:
    outputs: model outputs: 'logits' [B, T, H, W, K]; with ``avm_stages``
      also 'visual_maps' and 'audio_features'.
    labels: [B, T, H, W] int class indices.
    gt_mask: [B, T] annotated-frame weights.
    others: as ``avs_loss``.

  Returns:
    (loss, {'ce': ..., 'avm': ...}).
  """
  _check_avm_options(avm_loss, avm_pooling, avm_closer, avm_threshold)
  logits = outputs['logits']
  if logits.ndim != 5:
    raise ValueError(f'AVSS logits must be [B, T, H, W, K], got {logits.shape}')
  ce = avss_ce_loss(logits, labels, gt_mask)
  stages = tuple(avm_stages)
  if stages:
    v_maps, a_feas = _avm_inputs(outputs, stages)
    fg = jax.lax.stop_gradient(
        (jnp.argmax(logits, axis=-1) != 0).astype(jnp.float32)
    )
    avm = sum(
        avss_avm_stage(
            fg,
            v_maps[s],
            a_feas[s],
            gt_mask,
            loss=avm_loss,
            norm=avm_norm,
            threshold=avm_threshold,
            pooling=avm_pooling,
            closer=avm_closer,
        )
        for s in stages
    ) / len(stages)
  else:
    avm = jnp.zeros((), jnp.float32)
  return ce + avm_weight * avm, {'ce': ce, 'avm': avm}
