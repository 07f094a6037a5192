"""Tests of avs_jax.metrics against the reference fixtures and definitions."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avs_jax import metrics

GOLDEN = os.path.join(os.path.dirname(__file__), 'data', 'golden')
RTOL = 1e-4  # README "Tolerances": scalars within 1e-4 relative.
SCENARIOS = ['random', 'near_target', 'all_negative', 'all_positive']


def _metrics_npz():
  return np.load(os.path.join(GOLDEN, 'metrics.npz'))


# ----------------------------------------------------------------------------
# Golden fixtures.


@pytest.mark.parametrize('scenario', SCENARIOS)
def test_golden_metrics_scenarios(scenario):
  d = _metrics_npz()
  logits, target = d[f'{scenario}/logits'], d['target']
  assert (target.reshape(5, -1).sum(1) == 0).sum() == 2  # two empty GTs
  np.testing.assert_allclose(
      metrics.mask_iou(logits, target), d[f'{scenario}/miou'], rtol=RTOL
  )
  np.testing.assert_allclose(
      metrics.f_score(logits, target), d[f'{scenario}/fscore'], rtol=RTOL
  )
  # The same 5 frames as one clip through the accumulator.
  acc = metrics.merge_metrics(
      None, metrics.clip_metrics(logits[None], target[None])
  )
  summary = metrics.summarize(acc)
  np.testing.assert_allclose(summary['miou'], d[f'{scenario}/miou'], rtol=RTOL)
  np.testing.assert_allclose(
      summary['fscore'], d[f'{scenario}/fscore'], rtol=RTOL
  )


@pytest.mark.parametrize(
    'name', ['avs_resnet50_224.npz', 'avs_pvt_v2_b5_224.npz']
)
def test_golden_per_clip(name):
  d = np.load(os.path.join(GOLDEN, name))
  n, _, h, w = d['logits'].shape
  logits, masks = d['logits'][:, 0], d['masks'][:, 0]  # [B*5, H, W]
  np.testing.assert_allclose(
      metrics.mask_iou(logits, masks), d['miou_per_clip'][0], rtol=RTOL
  )
  np.testing.assert_allclose(
      metrics.f_score(logits, masks), d['fscore_per_clip'][0], rtol=RTOL
  )
  b = n // 5
  out = jax.jit(metrics.clip_metrics)(
      logits.reshape(b, 5, h, w), masks.reshape(b, 5, h, w), jnp.ones(b, bool)
  )
  summary = metrics.summarize(metrics.merge_metrics(None, out))
  np.testing.assert_allclose(
      summary['miou'], d['miou_per_clip'].mean(), rtol=RTOL
  )
  np.testing.assert_allclose(
      summary['fscore'], d['fscore_per_clip'].mean(), rtol=RTOL
  )
  assert summary['num_clips'] == b


# ----------------------------------------------------------------------------
# Definitions.


def np_sigmoid32(x):
  return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def np_f_curves(logits, target, thresholds):
  """Direct thresholding, one threshold at a time, as the definition."""
  p = np_sigmoid32(logits)
  curves, valid = [], []
  for k in range(len(p)):
    y = target[k].astype(np.float64)
    valid.append(y.sum() > 0)
    f = []
    for th in thresholds:
      pred = (p[k] >= th).astype(np.float64)
      tp = (pred * y).sum()
      prec, rec = tp / (pred.sum() + 1e-20), tp / (y.sum() + 1e-20)
      den = 0.3 * prec + rec
      f.append(1.3 * prec * rec / den if den > 0 else 0.0)
    curves.append(f)
  return np.array(curves), np.array(valid)


def test_mask_iou_hand_computed():
  big = 20.0
  logits = np.array(
      [
          [[big, -big], [-big, -big]],  # pred 1 px
          [[big, -big], [-big, -big]],  # pred 1 px, empty GT
          [[-big, -big], [-big, -big]],
      ],  # pred none, empty GT
      np.float32,
  )
  target = np.array(
      [[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 0]]], np.float32
  )
  per_frame = metrics.mask_iou_per_frame(logits, target)
  # 1/2; empty GT scores its true-negative fraction: 3/4 and 4/4.
  np.testing.assert_allclose(per_frame, [0.5, 0.75, 1.0], rtol=1e-6)
  np.testing.assert_allclose(
      metrics.mask_iou(logits, target), 2.25 / 3, rtol=1e-6
  )


def test_f_score_matches_direct_thresholding():
  rng = np.random.default_rng(0)
  logits = (4.0 * rng.standard_normal((4, 12, 12))).astype(np.float32)
  logits[0, :3] = 40.0  # sigmoid saturates to 1.0 in float32
  target = (rng.random((4, 12, 12)) > 0.7).astype(np.float32)
  target[2] = 0.0
  ref_curves, ref_valid = np_f_curves(
      logits, target, metrics.reference_thresholds()
  )
  curves, valid = metrics.f_score_curves(logits, target)
  np.testing.assert_array_equal(valid, ref_valid)
  np.testing.assert_allclose(curves, ref_curves, rtol=1e-5, atol=1e-7)
  f, v = metrics.f_score_per_frame(logits, target)
  np.testing.assert_allclose(f, ref_curves.max(1), rtol=1e-5)
  np.testing.assert_array_equal(v, ref_valid)
  np.testing.assert_allclose(
      metrics.f_score(logits, target),
      ref_curves[ref_valid].mean(0).max(),
      rtol=1e-5,
  )


def test_f_score_last_threshold_counts_saturated_pixels():
  # GT pixels have logit 40 (sigmoid == 1.0 in float32), the rest 10
  # (sigmoid < 1): only the last threshold, 1.0, separates them, and F = 1
  # there. A threshold grid ending below 1.0 or a strict '>' would miss it.
  target = np.zeros((1, 4, 4), np.float32)
  target[0, :2] = 1.0
  logits = np.where(target > 0, 40.0, 10.0).astype(np.float32)
  assert np_sigmoid32(np.float32(40.0)) == 1.0
  assert metrics.reference_thresholds()[-1] == 1.0
  curves, _ = metrics.f_score_curves(logits, target)
  np.testing.assert_allclose(curves[0, -1], 1.0, rtol=1e-6)
  np.testing.assert_allclose(
      curves[0, -2], 1.3 * 0.5 / (0.3 * 0.5 + 1.0), rtol=1e-6
  )
  np.testing.assert_allclose(metrics.f_score(logits, target), 1.0, rtol=1e-6)


def test_f_score_no_valid_frame_is_zero():
  logits = (
      np.random.default_rng(0).standard_normal((5, 16, 16)).astype(np.float32)
  )
  target = np.zeros((5, 16, 16), np.float32)
  assert float(metrics.f_score(logits, target)) == 0.0
  f, valid = metrics.f_score_per_frame(logits, target)
  assert not np.any(valid) and np.all(np.asarray(f) == 0)


def test_reference_thresholds_match_torch():
  torch = pytest.importorskip('torch')
  np.testing.assert_array_equal(
      metrics.reference_thresholds(), torch.linspace(0, 1 - 1e-10, 255).numpy()
  )


def test_f_score_memory_is_linear_in_pixels():
  n, h, w = 4, 224, 224
  jaxpr = jax.make_jaxpr(metrics.clip_metrics)(
      jnp.zeros((1, n, h, w)), jnp.zeros((1, n, h, w)), jnp.ones((1,), bool)
  )
  sizes = [
      int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns for v in eqn.outvars
  ]
  assert max(sizes) < 4 * n * h * w  # nothing like [255, N, H, W]


# ----------------------------------------------------------------------------
# Grouping and accumulation.


def test_per_frame_metrics_independent_of_grouping():
  d = _metrics_npz()
  logits, target = d['random/logits'], d['target']
  groups = [[0, 1], [2, 3, 4]]
  f_all, v_all = metrics.f_score_per_frame(logits, target)
  iou_all = metrics.mask_iou_per_frame(logits, target)
  f_grouped = np.concatenate(
      [metrics.f_score_per_frame(logits[g], target[g])[0] for g in groups]
  )
  iou_grouped = np.concatenate(
      [metrics.mask_iou_per_frame(logits[g], target[g]) for g in groups]
  )
  f_single = np.concatenate(
      [metrics.f_score_per_frame(logits[[i]], target[[i]])[0] for i in range(5)]
  )
  np.testing.assert_allclose(f_grouped, f_all, rtol=1e-6)
  np.testing.assert_allclose(f_single, f_all, rtol=1e-6)
  np.testing.assert_allclose(iou_grouped, iou_all, rtol=1e-6)
  valid = np.asarray(v_all)
  ref_all = float(metrics.f_score(logits, target))
  assert np.mean(np.asarray(f_all)[valid]) >= ref_all - 1e-7


def test_reference_f_depends_on_grouping():
  # Frame A is perfect at thresholds in (0.05, 0.27], frame B in (0.73, 0.95]:
  # each alone scores F = 1; together no single threshold suits both.
  gt = np.zeros((2, 4, 4), np.float32)
  gt[:, :2] = 1.0
  logits = np.stack(
      [np.where(gt[0] > 0, -1.0, -3.0), np.where(gt[1] > 0, 3.0, 1.0)]
  ).astype(np.float32)
  per_frame, _ = metrics.f_score_per_frame(logits, gt)
  np.testing.assert_allclose(per_frame, [1.0, 1.0], rtol=1e-6)
  for i in range(2):
    np.testing.assert_allclose(
        metrics.f_score(logits[[i]], gt[[i]]), 1.0, rtol=1e-6
    )
  together = float(metrics.f_score(logits, gt))
  # Best shared threshold: one frame perfect, the other predicts everything
  # (P = 1/2, R = 1, F = 0.65 / 1.15).
  np.testing.assert_allclose(together, (1.0 + 0.65 / 1.15) / 2, rtol=1e-6)


def _clips(seed, b, t=5, hw=16):
  rng = np.random.default_rng(seed)
  logits = (3.0 * rng.standard_normal((b, t, hw, hw))).astype(np.float32)
  masks = (rng.random((b, t, hw, hw)) > 0.7).astype(np.float32)
  masks[0, 1] = 0.0  # an empty-GT frame
  if b > 1:
    masks[1] = 0.0  # a clip with no object at all: reference F = 0
  return logits, masks


def test_clip_metrics_is_mean_over_clips_of_reference():
  logits, masks = _clips(0, 2)
  summary = metrics.summarize(
      metrics.merge_metrics(
          None, metrics.clip_metrics(logits, masks, jnp.ones(2, bool))
      )
  )
  miou = np.mean(
      [float(metrics.mask_iou(logits[i], masks[i])) for i in range(2)]
  )
  fscore = np.mean(
      [float(metrics.f_score(logits[i], masks[i])) for i in range(2)]
  )
  np.testing.assert_allclose(summary['miou'], miou, rtol=1e-6)
  np.testing.assert_allclose(summary['fscore'], fscore, rtol=1e-6)
  iou = np.concatenate(
      [metrics.mask_iou_per_frame(logits[i], masks[i]) for i in range(2)]
  )
  f, v = (
      np.concatenate(x)
      for x in zip(
          *[metrics.f_score_per_frame(logits[i], masks[i]) for i in range(2)]
      )
  )
  assert v.sum() == 4  # clip 0 has one empty frame, clip 1 only empty ones
  np.testing.assert_allclose(summary['miou_per_frame'], iou.mean(), rtol=1e-6)
  np.testing.assert_allclose(
      summary['fscore_per_frame'], f[v].mean(), rtol=1e-6
  )
  assert summary['num_clips'] == 2


def test_clip_metrics_batch_size_and_padding_independent():
  logits, masks = _clips(1, 5)
  fn = metrics.clip_metrics
  # One clip per batch (the reference test loop).
  acc = None
  for i in range(5):
    acc = metrics.merge_metrics(
        acc, fn(logits[i : i + 1], masks[i : i + 1], jnp.ones(1, bool))
    )
  one_by_one = metrics.summarize(acc)
  # Batches of 2 clips; the last batch padded with a garbage clip.
  rng = np.random.default_rng(9)
  pad_l = (10 * rng.standard_normal((1,) + logits.shape[1:])).astype(np.float32)
  pad_m = (rng.random((1,) + masks.shape[1:]) > 0.2).astype(np.float32)
  acc = None
  for s in range(0, 5, 2):
    l, m = logits[s : s + 2], masks[s : s + 2]
    valid = np.ones(2, bool)
    if len(l) < 2:
      l, m = np.concatenate([l, pad_l]), np.concatenate([m, pad_m])
      valid[1] = False
    acc = metrics.merge_metrics(acc, fn(l, m, valid))
  batched = metrics.summarize(acc)
  assert batched['num_clips'] == one_by_one['num_clips'] == 5
  for k in ('miou', 'fscore', 'miou_per_frame', 'fscore_per_frame'):
    np.testing.assert_allclose(batched[k], one_by_one[k], rtol=1e-6, err_msg=k)
  # The padding clip would change the result if it were counted.
  with_pad = metrics.summarize(
      metrics.merge_metrics(acc, fn(pad_l, pad_m, np.ones(1, bool)))
  )
  assert abs(with_pad['miou'] - batched['miou']) > 1e-3


def test_summarize_empty():
  out = metrics.clip_metrics(
      jnp.zeros((1, 5, 16, 16)),
      jnp.zeros((1, 5, 16, 16)),
      jnp.zeros((1,), bool),
  )
  s = metrics.summarize(metrics.merge_metrics(None, out))
  assert s == {
      'miou': 0.0,
      'fscore': 0.0,
      'miou_per_frame': 0.0,
      'fscore_per_frame': 0.0,
      'num_clips': 0,
  }
