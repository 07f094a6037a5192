"""AVSBench metrics: J (mask IoU) and F-score, reference and per-frame.

Reference definitions (``utils/utility.py`` of the official code), on logits
``[N, H, W]`` and binary targets ``[N, H, W]``:

* J, ``mask_iou``: prediction ``sigmoid(logit) > 0.5``; per frame
  ``inter / (union + 1e-7)``, except a frame with an empty ground truth scores
  its true-negative fraction; averaged over the N frames. J is a plain mean of
  per-frame scores, so it does not depend on how frames are batched.
* F, ``f_score`` (``Eval_Fmeasure``): ``p = sigmoid(logit)``; 255 thresholds
  ``linspace(0, 1 - 1e-10, 255)`` in float32 (the end point rounds to 1.0, so
  the last threshold only counts pixels whose sigmoid saturated to 1.0); for
  each frame with a non-empty ground truth a curve
  ``F_k = 1.3 P_k R_k / (0.3 P_k + R_k)`` (beta^2 = 0.3, 1e-20 added to the
  denominators of P and R, NaN -> 0); frames with an empty ground truth are
  skipped; the curves are averaged over frames and the score is the **maximum
  of the mean curve** (0 if no frame has a non-empty ground truth).

Why the reference F depends on grouping, side by side::

  reference   F(group) = max_k mean_{i in group} F_i,k      (one threshold
                                                             per group)
  per-frame   F_i      = max_k F_i,k                         (one threshold
              F        = mean_{i valid} F_i                   per frame)

The max of an average is not the average of maxes: with a group of frames the
reference picks one best threshold shared by the whole group, so the same
frames give a different F when evaluated 5 at a time (the reference test loop:
one clip per batch), 20 at a time, or all at once; ``mean F_i >= F(group)``
always. J has no such issue. The per-frame variants
(``mask_iou_per_frame``, ``f_score_per_frame``) give every frame its own score
(its own best threshold for F, plus a validity flag: frames with an empty
ground truth have no F) so results are independent of batch size and grouping.

Dataset-level numbers. The reference test loop evaluates one clip (5 frames)
per batch and averages the per-clip J and F over clips. ``clip_metrics``
reproduces exactly that for any eval batch size (each clip is scored on its
own frames; padding clips are masked out by ``valid``) and also accumulates
the per-frame variants. Use it as::

  acc = None
  for batch in eval_batches:
    acc = merge_metrics(acc, jitted_clip_metrics(logits, masks, valid))
  summarize(acc)  # {'miou', 'fscore', 'miou_per_frame', 'fscore_per_frame',
                  #  'num_clips'}

where 'miou' / 'fscore' are the reference's numbers, 'miou_per_frame' is the
mean over all frames of the per-frame IoU and 'fscore_per_frame' the mean over
frames with a non-empty ground truth of the per-frame max F.

F is computed without materialising ``[255, N, H, W]``: each pixel's sigmoid is
bucketed by ``searchsorted`` into the threshold grid and per-frame histograms
(all pixels, and ground-truth pixels) are reverse-cumsummed into the counts
``#{p >= t_k}`` and ``#{p >= t_k, gt = 1}`` for all k. This uses O(N H W)
memory and gives the same (exact integer) counts as thresholding 255 times.
"""

import functools
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

NUM_THRESHOLDS = 255
BETA2 = 0.3


def reference_thresholds(num: int = NUM_THRESHOLDS) -> np.ndarray:
  """``torch.linspace(0, 1 - 1e-10, num)`` in float32, as torch's CPU kernel.

  The end point is cast to float32 first (1 - 1e-10 -> 1.0); the step is
  computed in float32; the first half is ``start + step * i`` and the second
  ``end - step * (num - 1 - i)``, each one fused multiply-add (rounded once).
  Other devices may differ in the last bit of interior thresholds, which only
  matters for a sigmoid value exactly equal to one.
  """
  start = np.float32(0.0)
  end = np.float32(1.0 - 1e-10)  # == 1.0 in float32
  step = (end - start) / np.float32(num - 1)
  i = np.arange(num, dtype=np.float64)
  lo = np.float64(start) + np.float64(step) * i
  hi = np.float64(end) - np.float64(step) * (num - 1 - i)
  return np.where(i < num // 2, lo, hi).astype(np.float32)


# ----------------------------------------------------------------------------
# J.


@functools.partial(jax.jit, static_argnames=('eps',))
def mask_iou_per_frame(
    logits: Array, target: Array, eps: float = 1e-7
) -> Array:
  """Per-frame J of the reference ``mask_iou``: [N, H, W] x 2 -> [N]."""
  pred = (jax.nn.sigmoid(logits.astype(jnp.float32)) > 0.5).astype(jnp.float32)
  target = target.astype(jnp.float32)
  num_pixels = target.shape[-1] * target.shape[-2]
  empty = target.sum(axis=(-2, -1)) == 0
  inter = (pred * target).sum(axis=(-2, -1))
  union = jnp.maximum(pred, target).sum(axis=(-2, -1))
  inter_neg = ((1.0 - target) * (1.0 - pred)).sum(axis=(-2, -1))
  inter = jnp.where(empty, inter_neg, inter)
  union = jnp.where(empty, jnp.float32(num_pixels), union)
  return inter / (union + eps)


@functools.partial(jax.jit, static_argnames=('eps',))
def mask_iou(logits: Array, target: Array, eps: float = 1e-7) -> Array:
  """Reference ``mask_iou``: mean over the N frames of ``mask_iou_per_frame``."""
  return mask_iou_per_frame(logits, target, eps).mean()


# ----------------------------------------------------------------------------
# F.


@functools.partial(jax.jit, static_argnames=('num_thresholds', 'beta2'))
def f_score_curves(
    logits: Array,
    target: Array,
    num_thresholds: int = NUM_THRESHOLDS,
    beta2: float = BETA2,
) -> Tuple[Array, Array]:
  """Per-frame F curves of ``Eval_Fmeasure``.

  Args:
    logits: [N, H, W].
    target: [N, H, W] in {0, 1}.

  Returns:
    curves: [N, num_thresholds] float32 (NaN -> 0, as the reference).
    valid: [N] bool, frames with a non-empty ground truth (the only ones the
      reference scores).
  """
  n = logits.shape[0]
  prob = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(n, -1)
  gt = target.astype(jnp.float32).reshape(n, -1)
  th = jnp.asarray(reference_thresholds(num_thresholds))
  # bucket b = #{k : t_k <= p}; pixel counts at threshold k iff b > k.
  bucket = jnp.searchsorted(th, prob, side='right').astype(jnp.int32)
  seg = bucket + (num_thresholds + 1) * jnp.arange(n, dtype=jnp.int32)[:, None]
  seg = seg.reshape(-1)
  nseg = n * (num_thresholds + 1)
  hist = jax.ops.segment_sum(jnp.ones_like(gt).reshape(-1), seg, nseg)
  hist_tp = jax.ops.segment_sum(gt.reshape(-1), seg, nseg)

  def counts(h):  # [N, K+1] histogram -> [N, K] counts of b > k
    h = h.reshape(n, num_thresholds + 1)
    return jnp.cumsum(h[:, ::-1], axis=1)[:, ::-1][:, 1:]

  pred_pos, tp = counts(hist), counts(hist_tp)
  gt_pos = gt.sum(axis=1, keepdims=True)
  prec = tp / (pred_pos + 1e-20)
  recall = tp / (gt_pos + 1e-20)
  f = (1.0 + beta2) * prec * recall / (beta2 * prec + recall)
  f = jnp.where(jnp.isnan(f), 0.0, f)
  valid = gt_pos[:, 0] > 0
  return f, valid


def _grouped_f(curves: Array, valid: Array) -> Array:
  """max_k of the mean over valid frames of curves [..., N, K] -> [...]."""
  w = valid.astype(curves.dtype)
  num = w.sum(axis=-1)
  mean = (curves * w[..., None]).sum(axis=-2) / jnp.maximum(num, 1.0)[..., None]
  return jnp.where(num > 0, mean.max(axis=-1), 0.0)


@functools.partial(jax.jit, static_argnames=('num_thresholds', 'beta2'))
def f_score(
    logits: Array,
    target: Array,
    num_thresholds: int = NUM_THRESHOLDS,
    beta2: float = BETA2,
) -> Array:
  """Reference ``Eval_Fmeasure`` of one batch of frames [N, H, W] -> scalar."""
  curves, valid = f_score_curves(logits, target, num_thresholds, beta2)
  return _grouped_f(curves, valid)


@functools.partial(jax.jit, static_argnames=('num_thresholds', 'beta2'))
def f_score_per_frame(
    logits: Array,
    target: Array,
    num_thresholds: int = NUM_THRESHOLDS,
    beta2: float = BETA2,
) -> Tuple[Array, Array]:
  """Per-frame F: each frame's own max over thresholds.

  Returns:
    f: [N] (0 for frames with an empty ground truth).
    valid: [N] bool, frames with a non-empty ground truth; F averages over
      these only.
  """
  curves, valid = f_score_curves(logits, target, num_thresholds, beta2)
  return curves.max(axis=-1), valid


# ----------------------------------------------------------------------------
# Dataset-level accumulation.


@jax.jit
def clip_metrics(
    logits: Array, masks: Array, valid: Optional[Array] = None
) -> Dict[str, Array]:
  """Sums and counts for one eval batch of clips (jittable).

  Args:
    logits: [B, T, H, W].
    masks: [B, T, H, W] in {0, 1}.
    valid: [B] bool; False for padding clips, which contribute nothing.
      None: all valid.

  Returns:
    dict of scalars: 'miou_sum', 'fscore_sum' (sums over valid clips of the
    reference per-clip J and F), 'num_clips', 'iou_frame_sum', 'num_frames',
    'fscore_frame_sum', 'num_fscore_frames' (per-frame variants).
  """
  b, t = logits.shape[:2]
  flat_logits = logits.reshape((b * t,) + logits.shape[2:])
  flat_masks = masks.reshape((b * t,) + masks.shape[2:])
  if valid is None:
    valid = jnp.ones((b,), bool)
  valid = valid.astype(bool)
  clip_w = valid.astype(jnp.float32)
  frame_w = jnp.repeat(clip_w, t)

  iou = mask_iou_per_frame(flat_logits, flat_masks)  # [B*T]
  curves, f_valid = f_score_curves(flat_logits, flat_masks)
  f_frame = curves.max(axis=-1)
  f_w = frame_w * f_valid.astype(jnp.float32)

  clip_iou = iou.reshape(b, t).mean(axis=1)
  clip_f = _grouped_f(curves.reshape(b, t, -1), f_valid.reshape(b, t))
  return {
      'miou_sum': jnp.sum(clip_w * clip_iou),
      'fscore_sum': jnp.sum(clip_w * clip_f),
      'num_clips': jnp.sum(valid.astype(jnp.int32)),
      'iou_frame_sum': jnp.sum(frame_w * iou),
      'num_frames': jnp.sum(frame_w).astype(jnp.int32),
      'fscore_frame_sum': jnp.sum(f_w * f_frame),
      'num_fscore_frames': jnp.sum(f_w).astype(jnp.int32),
  }


def merge_metrics(
    acc: Optional[Mapping[str, Any]], new: Mapping[str, Any]
) -> Dict[str, np.ndarray]:
  """Adds two ``clip_metrics`` results on the host (float64 / int64).

  ``acc=None`` starts an accumulation. Fetches ``new`` from the device.
  """
  new = {k: np.asarray(jax.device_get(v)) for k, v in new.items()}
  new = {
      k: v.astype(
          np.int64 if np.issubdtype(v.dtype, np.integer) else np.float64
      )
      for k, v in new.items()
  }
  if acc is None:
    return new
  return {k: np.asarray(acc[k]) + new[k] for k in new}


def summarize(acc: Mapping[str, Any]) -> Dict[str, Any]:
  """Final numbers from accumulated ``clip_metrics`` (Python floats / int)."""
  acc = {k: np.asarray(jax.device_get(v)) for k, v in acc.items()}

  def ratio(num, den):
    den = int(acc[den])
    return float(acc[num]) / den if den else 0.0

  return {
      'miou': ratio('miou_sum', 'num_clips'),
      'fscore': ratio('fscore_sum', 'num_clips'),
      'miou_per_frame': ratio('iou_frame_sum', 'num_frames'),
      'fscore_per_frame': ratio('fscore_frame_sum', 'num_fscore_frames'),
      'num_clips': int(acc['num_clips']),
  }


# ----------------------------------------------------------------------------
# AVSS (AVSBench-semantic): the reference's `avss/utils/compute_color_metrics.py`
# (`calc_color_miou_fscore`) and the aggregation of its `test.py`.
#
# Per frame and class c (prediction ``argmax softmax(logits)``, all pixels,
# background included): TP, TP + FP, TP + FN counts; ``iou = TP / (union +
# 2.2e-16)`` (0 when the class is absent from both); the class is "seen" in
# the frame when its union is non-empty; ``F = 1.3 P R / (0.3 P + R)`` with
# NaN -> 0 (so 0 when the class is absent from the prediction or the ground
# truth). Over the dataset: ``iou_sum[c]``, ``fscore_sum[c]`` and
# ``class_count[c]`` (frames where c is seen) are summed over all frames,
# padded frames of 5-frame clips included (the model's masked output is 0
# there: predicted background, as the zero-padded label). Then (test.py)
# ``miou_c = iou_sum / class_count`` (0 for classes never seen) and
# ``miou = mean over ALL K classes`` -- classes never seen count as 0, so the
# number depends on which classes a split contains; likewise F. test.py's
# ``_noBg`` numbers drop the LAST class (index K-1), not the background
# (index 0 in AVSBench-semantic's palette); reported here as ``miou_noBg`` /
# ``fscore_noBg`` for comparison with published numbers, next to
# ``miou_fg`` / ``fscore_fg`` that drop class 0. ``miou_present`` is test.py's
# running print: the mean over seen classes only.
#
# (At its current head the official test.py unpacks 3 values from
# ``calc_color_miou_fscore``, which returns 4, and stops with a ValueError;
# the numbers here are what it computes with the first three, as its
# train.py validation loop does identically.)

AVSS_EPS = 2.220446049250313e-16


def avss_frame_stats(logits: Array, labels: Array) -> Dict[str, Array]:
  """Per-frame, per-class reference statistics (jittable).

  Args:
    logits: [N, H, W, K].
    labels: [N, H, W] int in [0, K).

  Returns:
    'iou' [N, K], 'fscore' [N, K], 'seen' [N, K] (float 0/1: union > 0) and
    'frame_miou' [N] (the reference's per-frame ``sum(iou) / #(iou != 0)``,
    NaN when no class overlaps).
  """
  k = logits.shape[-1]
  pred = jnp.argmax(
      jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1
  )
  labels = labels.astype(pred.dtype)
  # Class k marks "no intersection"; counted in an extra bin, then dropped.
  count = jax.vmap(lambda x: jnp.bincount(x.reshape(-1), length=k + 1)[:k])
  area_pred = count(pred).astype(jnp.float32)
  area_lab = count(labels).astype(jnp.float32)
  area_inter = count(jnp.where(pred == labels, pred, k)).astype(jnp.float32)
  union = area_pred + area_lab - area_inter
  iou = area_inter / (union + AVSS_EPS)
  precision = area_inter / area_pred
  recall = area_inter / area_lab
  f = (1 + BETA2) * precision * recall / (BETA2 * precision + recall)
  f = jnp.where(jnp.isnan(f), 0.0, f)
  frame_miou = iou.sum(-1) / (iou != 0).sum(-1).astype(jnp.float32)
  return {
      'iou': iou,
      'fscore': f,
      'seen': (union > 0).astype(jnp.float32),
      'frame_miou': frame_miou,
  }


@jax.jit
def avss_clip_metrics(
    logits: Array, labels: Array, valid: Optional[Array] = None
) -> Dict[str, Array]:
  """Per-class sums for one eval batch of AVSS clips (jittable).

  Args:
    logits: [B, T, H, W, K].
    labels: [B, T, H, W] int.
    valid: [B] bool; False for padding clips (contribute nothing).

  Returns:
    'iou_sum', 'fscore_sum', 'class_count' (each [K]) and 'num_clips'; merge
    with ``merge_metrics`` and finish with ``avss_summarize``.
  """
  b, t = logits.shape[:2]
  s = avss_frame_stats(
      logits.reshape((b * t,) + logits.shape[2:]),
      labels.reshape((b * t,) + labels.shape[2:]),
  )
  if valid is None:
    valid = jnp.ones((b,), bool)
  w = jnp.repeat(valid.astype(jnp.float32), t)[:, None]
  return {
      'iou_sum': (w * s['iou']).sum(0),
      'fscore_sum': (w * s['fscore']).sum(0),
      'class_count': (w * s['seen']).sum(0),
      'num_clips': jnp.sum(valid.astype(jnp.int32)),
  }


def avss_summarize(
    acc: Mapping[str, Any], class_names: Optional[Any] = None
) -> Dict[str, Any]:
  """The reference test.py numbers from accumulated ``avss_clip_metrics``.

  Returns 'miou', 'fscore' (means over all K classes, unseen = 0),
  'miou_noBg', 'fscore_noBg' (test.py: the last class dropped), 'miou_fg',
  'fscore_fg' (class 0, the background, dropped; unseen still 0),
  'miou_present', 'fscore_present' (means over seen classes),
  'num_classes_seen', 'num_clips' and 'per_class': a list of
  ``{'index', 'name', 'miou', 'fscore', 'frames'}`` (name from
  ``class_names``, a sequence indexed by class, if given).
  """
  acc = {k: np.asarray(jax.device_get(v), np.float64) for k, v in acc.items()}
  count = acc['class_count']
  seen = count > 0
  safe = np.where(seen, count, 1.0)
  miou_c = np.where(seen, acc['iou_sum'] / safe, 0.0)
  f_c = np.where(seen, acc['fscore_sum'] / safe, 0.0)
  n_seen = int(seen.sum())
  present = lambda x: float(x[seen].mean()) if n_seen else 0.0
  per_class = [
      {
          'index': i,
          'name': str(class_names[i]) if class_names is not None else str(i),
          'miou': float(miou_c[i]),
          'fscore': float(f_c[i]),
          'frames': int(count[i]),
      }
      for i in range(len(count))
  ]
  return {
      'miou': float(miou_c.mean()),
      'fscore': float(f_c.mean()),
      'miou_noBg': float(miou_c[:-1].mean()),
      'fscore_noBg': float(f_c[:-1].mean()),
      'miou_fg': float(miou_c[1:].mean()),
      'fscore_fg': float(f_c[1:].mean()),
      'miou_present': present(miou_c),
      'fscore_present': present(f_c),
      'num_classes_seen': n_seen,
      'num_clips': int(acc.get('num_clips', 0)),
      'per_class': per_class,
  }
