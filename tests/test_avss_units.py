"""AVSS pieces not covered by the golden parity tests: config, errors, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avs_jax import avss
from avs_jax import losses
from avs_jax import metrics
from avs_jax.models import build_model
from configs import avss as avss_config


def tiny_model(**kw):
  c = avss_config.get_config('resnet_tiny').model
  c.channels, c.head_channels = 16, 8
  c.update(kw)
  return build_model(c)


def test_config_builds_the_avss_model():
  c = avss_config.get_config()
  assert c.model.backbone == 'pvt_v2_b5' and c.model.num_classes == 71
  assert not c.model.align_bias and c.model.tpavi_group == 5
  assert tuple(c.loss.avm_stages) == (0, 1, 2, 3) and c.loss.avm_weight == 0.5
  shapes = jax.eval_shape(
      build_model(avss_config.get_config('resnet50').model).init,
      jax.random.key(0),
      jnp.zeros((1, 10, 64, 64, 3)),
      jnp.zeros((1, 10, 128)),
  )
  p = shapes['params']
  assert p['output_conv_4']['kernel'].shape == (1, 1, 32, 71)
  assert 'bias' not in p['tpavi_b1']['align_channel']


def test_tpavi_groups_of_five_frames():
  """A 10-frame clip is two independent 5-frame TPAVI groups: changing the
  second half leaves the first half's output unchanged (one 10-frame group
  would mix them)."""
  model = tiny_model(tpavi_stages=(3,))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 10, 32, 32, 3)).astype(np.float32)
  a = rng.standard_normal((1, 10, 128)).astype(np.float32)
  v = model.init(jax.random.key(0), x, a)
  # Non-zero W_z BatchNorm scale so that TPAVI is not the identity + norm.
  v = jax.tree_util.tree_map_with_path(
      lambda p, w: jnp.ones_like(w)
      if 'W_z_1' in str(p) and 'scale' in str(p)
      else w,
      v,
  )
  out = model.apply(v, x, a)['logits']
  x2, a2 = x.copy(), a.copy()
  x2[:, 5:] *= -1
  a2[:, 5:] *= 3
  out2 = model.apply(v, x2, a2)['logits']
  np.testing.assert_allclose(out2[:, :5], out[:, :5], atol=1e-5)
  whole = tiny_model(tpavi_stages=(3,), tpavi_group=0)
  o, o2 = whole.apply(v, x, a)['logits'], whole.apply(v, x2, a2)['logits']
  assert np.abs(np.asarray(o2[:, :5] - o[:, :5])).max() > 1e-4


def test_bad_inputs_raise_clear_errors():
  model = tiny_model()
  x = jnp.zeros((1, 10, 32, 32, 3))
  a = jnp.zeros((1, 10, 128))
  with pytest.raises(ValueError, match='frame_mask must be'):
    jax.eval_shape(
        model.init, jax.random.key(0), x, a, frame_mask=jnp.ones((1, 5))
    )
  with pytest.raises(ValueError, match='multiple of tpavi_group'):
    jax.eval_shape(model.init, jax.random.key(0), x[:, :7], a[:, :7])
  with pytest.raises(ValueError, match=r'\[B, T, H, W, K\]'):
    losses.avss_loss(
        {'logits': jnp.zeros((1, 10, 8, 8))},
        jnp.zeros((1, 10, 8, 8), jnp.int32),
        jnp.ones((1, 10)),
    )
  with pytest.raises(ValueError, match='not an AVS/AVSS checkpoint'):
    avss.model_config_from_state_dict({'fc.weight': np.zeros((2, 2))})
  with pytest.raises(ValueError, match='unknown AVSBench-semantic subset'):
    avss.temporal_masks('v3')


def test_temporal_masks_of_the_subsets():
  vid, gt = avss.temporal_masks('v1s')
  assert vid.tolist() == [1] * 5 + [0] * 5 and gt.tolist() == [1] + [0] * 9
  vid, gt = avss.temporal_masks('v1m')
  assert vid.tolist() == gt.tolist() == [1] * 5 + [0] * 5
  vid, gt = avss.temporal_masks('v2')
  assert vid.tolist() == gt.tolist() == [1] * 10


def test_ce_loss_weights_frames_and_handles_no_annotation():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((1, 10, 4, 4, 5)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, (1, 10, 4, 4)))
  nll = -np.asarray(jax.nn.log_softmax(logits))
  per = np.take_along_axis(nll, np.asarray(labels)[..., None], -1)[..., 0]
  per_frame = per.mean(axis=(2, 3))[0]
  gt = np.array([[1.0] + [0.0] * 9])
  np.testing.assert_allclose(
      losses.avss_ce_loss(logits, labels, gt), per_frame[0], rtol=1e-6
  )
  assert float(losses.avss_ce_loss(logits, labels, np.zeros((1, 10)))) == 0


def test_summary_per_class_table_with_names():
  k = 4
  logits = np.zeros((1, 2, 2, 2, k), np.float32)
  logits[..., 2] = 1  # predicts class 2 everywhere
  labels = np.full((1, 2, 2, 2), 2)
  labels[0, 0, 0, 0] = 0
  acc = metrics.merge_metrics(None, metrics.avss_clip_metrics(logits, labels))
  r = metrics.avss_summarize(acc, ['background', 'a', 'b', 'c'])
  assert [c['name'] for c in r['per_class']] == ['background', 'a', 'b', 'c']
  assert r['per_class'][2]['miou'] == pytest.approx((3 / 4 + 1) / 2)
  assert r['per_class'][0]['frames'] == 1 and r['num_classes_seen'] == 2
  assert r['miou'] == pytest.approx(r['per_class'][2]['miou'] / k)
  assert r['miou_fg'] == pytest.approx(r['per_class'][2]['miou'] / (k - 1))


def test_tiny_avss_model_learns_masked_clips():
  """A tiny AVSS model (4 classes, v1-style clips: 5 frames + 5 padded)
  learns coloured squares with the AVSS loss (CE + 0.5 AVM-KL): the CE falls
  and the mIoU over classes rises, through frame masks and TPAVI groups."""
  import optax

  model = tiny_model(num_classes=4)
  rng = np.random.default_rng(0)
  colours = np.array(
      [[0, 0, 0], [2, -2, 0], [-2, 0, 2], [0, 2, -2]], np.float32
  )

  def batch(n):
    labels = np.zeros((n, 10, 32, 32), np.int32)
    for b in range(n):
      for t in range(5):
        y, x = rng.integers(0, 16, 2)
        labels[b, t, y : y + 16, x : x + 16] = rng.integers(1, 4)
    frames = colours[labels] + 0.3 * rng.standard_normal(labels.shape + (3,))
    frames[:, 5:] = 0
    labels[:, 5:] = 0
    audio = rng.standard_normal((n, 10, 128)).astype(np.float32)
    mask = np.tile(np.array([1.0] * 5 + [0.0] * 5, np.float32), (n, 1))
    return frames.astype(np.float32), audio, labels, mask

  x, a, y, m = batch(2)
  v = model.init(jax.random.key(0), x, a, frame_mask=m)
  opt = optax.adam(3e-3)
  state = opt.init(v['params'])

  @jax.jit
  def step(params, stats, opt_state, x, a, y, m):
    def loss_fn(p):
      out, new = model.apply(
          {'params': p, 'batch_stats': stats},
          x,
          a,
          train=True,
          frame_mask=m,
          mutable=['batch_stats'],
      )
      loss, aux = losses.avss_loss(
          out, y, m, avm_weight=0.5, avm_stages=(0, 1, 2, 3)
      )
      return loss, (aux, new['batch_stats'])

    (_, (aux, stats)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    upd, opt_state = opt.update(g, opt_state)
    return optax.apply_updates(params, upd), stats, opt_state, aux

  @jax.jit
  def evaluate(params, stats, x, a, y, m):
    out = model.apply(
        {'params': params, 'batch_stats': stats}, x, a, frame_mask=m
    )
    return (
        losses.avss_ce_loss(out['logits'], y, m),
        metrics.avss_clip_metrics(out['logits'], y),
    )

  test = batch(4)
  params, stats = v['params'], v['batch_stats']
  ce0, m0 = evaluate(params, stats, *test)
  for _ in range(60):
    params, stats, state, _ = step(params, stats, state, *batch(2))
  ce1, m1 = evaluate(params, stats, *test)
  miou0 = metrics.avss_summarize(metrics.merge_metrics(None, m0))['miou']
  miou1 = metrics.avss_summarize(metrics.merge_metrics(None, m1))['miou']
  assert float(ce1) < 0.5 * float(ce0), (ce0, ce1)
  assert miou1 > 0.6 and miou1 > miou0 + 0.2, (miou0, miou1)


def test_validation_starts_at_eval_start_epoch():
  """configs/avss.py: validation after every 2nd epoch (at 2, 4, ...) once
  15 epochs are done, and always at the last step; without
  eval_start_epoch from the first (the S4/MS3 schedule)."""
  from avs_jax import train  # pylint: disable=g-import-not-at-top

  c = avss_config.get_config('resnet_tiny')
  c.train.num_epochs = 20
  sched = train.Schedule.of(c, num_train=40)  # 10 steps per epoch
  evals = [s for s in range(1, sched.total + 1) if sched.is_eval(s)]
  assert evals == [160, 180, 200]
  c.train.eval_start_epoch = 0
  sched = train.Schedule.of(c, num_train=40)
  assert [s for s in range(1, 201) if sched.is_eval(s)] == list(
      range(20, 201, 20)
  )
