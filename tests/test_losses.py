"""Tests of avs_jax.losses against the reference fixtures and NumPy derivations."""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avs_jax import losses

GOLDEN = os.path.join(os.path.dirname(__file__), 'data', 'golden')
RTOL = 1e-4  # README "Tolerances": scalars within 1e-4 relative.
T = 5


def _load_outputs(name):
  """Fixture (PyTorch layout, B*T flattened) -> our layout."""
  d = np.load(os.path.join(GOLDEN, name))
  n, _, h, w = d['logits'].shape
  b = n // T
  out = {'logits': d['logits'].reshape(b, T, h, w)}
  if 'v_map_0' in d:
    out['visual_maps'] = [
        d[f'v_map_{i}']
        .reshape((b, T) + d[f'v_map_{i}'].shape[1:])
        .transpose(0, 1, 3, 4, 2)
        for i in range(4)
    ]
    out['audio_features'] = [d[f'a_fea_{i}'] for i in range(4)]
  return d, out, d['masks'].reshape(b, T, h, w)


# ----------------------------------------------------------------------------
# Golden fixtures.


@pytest.mark.parametrize(
    'name', ['avs_resnet50_224.npz', 'avs_pvt_v2_b5_224.npz']
)
def test_golden_losses(name):
  d, out, masks = _load_outputs(name)
  stages = (0, 1, 2, 3)
  loss_fn = jax.jit(
      losses.avs_loss, static_argnames=('setting', 'avm_weight', 'avm_stages')
  )
  total, aux = loss_fn(
      out, masks, setting='ms3', avm_weight=0.5, avm_stages=stages
  )
  np.testing.assert_allclose(aux['bce'], d['loss_ms3_bce'], rtol=RTOL)
  np.testing.assert_allclose(aux['avm'], d['loss_ms3_avm_kl'], rtol=RTOL)
  np.testing.assert_allclose(total, d['loss_ms3_total_lambda0.5_kl'], rtol=RTOL)

  s4, aux = losses.avs_loss(out, masks, setting='s4')
  np.testing.assert_allclose(s4, d['loss_s4_bce_first_frame'], rtol=RTOL)
  assert float(aux['avm']) == 0.0
  # S4 accepts first-frame-only ground truth, [B, 1, H, W].
  s4_first, _ = losses.avs_loss(out, masks[:, :1], setting='s4')
  np.testing.assert_allclose(s4_first, d['loss_s4_bce_first_frame'], rtol=RTOL)


def test_golden_train_file_bce():
  # The training fixture stores logits and masks but no v_map / a_fea, so
  # only its BCE can be recomputed here.
  d, out, masks = _load_outputs('avs_resnet50_train_160.npz')
  assert 'v_map_0' not in d
  bce, aux = losses.avs_loss(out, masks, setting='ms3')
  np.testing.assert_allclose(bce, d['loss_ms3_bce'], rtol=RTOL)
  np.testing.assert_allclose(aux['bce'], d['loss_ms3_bce'], rtol=RTOL)


# ----------------------------------------------------------------------------
# NumPy derivation from the definitions (float64, explicit loops).


def np_adaptive_pool(x, out_hw, reduce):
  """x [..., H, W]; PyTorch bins [floor(i*H/h), ceil((i+1)*H/h))."""
  H, W = x.shape[-2:]
  h, w = out_hw
  out = np.zeros(x.shape[:-2] + (h, w))
  for i in range(h):
    r0, r1 = (i * H) // h, -(-((i + 1) * H) // h)
    for j in range(w):
      c0, c1 = (j * W) // w, -(-((j + 1) * W) // w)
      win = x[..., r0:r1, c0:c1]
      out[..., i, j] = (
          win.mean((-2, -1)) if reduce == 'avg' else win.max((-2, -1))
      )
  return out


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_match(target, inp, kind):
  """Per-stage loss between target [N, C] and input [N, C]."""
  if kind == 'euclidean':  # F.pairwise_distance adds eps=1e-6 to the difference
    return np.linalg.norm(target - inp + 1e-6, axis=-1).mean()
  p = np_softmax(target)  # KL(p || q) summed over frames and channels
  q = np_softmax(inp)
  return np.sum(p * (np.log(p) - np.log(q)))


def np_avm(
    logits, v_maps, a_feas, stages, kind, closer, threshold, norm, pooling
):
  """logits [N, H, W], v_maps [N, h, w, C], a_feas [N, C] (N = B*T)."""
  total = 0.0
  for s in stages:
    v_map, a = v_maps[s].astype(np.float64), a_feas[s].astype(np.float64)
    n, h, w, c = v_map.shape
    mask = np_sigmoid(
        np_adaptive_pool(logits.astype(np.float64), (h, w), pooling)
    )
    if threshold:
      mask = (mask > 0.5).astype(np.float64)
      v = np.stack(
          [
              (v_map[k] * mask[k][..., None]).sum((0, 1))
              / (mask[k].sum() + 1e-6)
              for k in range(n)
          ]
      )
    else:
      v = np.stack(
          [(v_map[k] * mask[k][..., None]).mean((0, 1)) for k in range(n)]
      )
    if closer:
      a_pair = np_normalize(a) if norm else a
      partner = []
      for j in range(n):  # nearest other frame by audio, argmin over rows
        d = [
            np.linalg.norm(a_pair[i] - a_pair[j]) + (10.0 if i == j else 0.0)
            for i in range(n)
        ]
        partner.append(int(np.argmin(d)))
      if norm:
        v = np_normalize(v)
      total += np_match(v[partner], v, kind)
    else:
      if norm:
        a, v = np_normalize(a), np_normalize(v)
      total += np_match(a, v, kind)
  return total / len(stages)


def _random_outputs(
    seed=0, b=2, t=3, hw=20, c=8, map_sizes=((10, 10), (7, 7), (5, 6), (3, 3))
):
  rng = np.random.default_rng(seed)
  logits = (3.0 * rng.standard_normal((b, t, hw, hw))).astype(np.float32)
  v_maps = [
      np.abs(rng.standard_normal((b, t, h, w, c))).astype(np.float32)
      for h, w in map_sizes
  ]
  a_feas = [
      rng.standard_normal((b, t, c)).astype(np.float32) for _ in map_sizes
  ]
  masks = (rng.random((b, t, hw, hw)) > 0.6).astype(np.float32)
  return {
      'logits': logits,
      'visual_maps': v_maps,
      'audio_features': a_feas,
  }, masks


def _flat(out):
  b, t = out['logits'].shape[:2]
  return (
      out['logits'].reshape((b * t,) + out['logits'].shape[2:]),
      [v.reshape((b * t,) + v.shape[2:]) for v in out['visual_maps']],
      [a.reshape(b * t, -1) for a in out['audio_features']],
  )


AV_OPTIONS = [
    dict(
        avm_loss=k,
        avm_threshold=th,
        avm_norm=nm,
        avm_pooling=p,
        avm_closer=False,
    )
    for k, th, nm, p in itertools.product(
        ['kl', 'euclidean'], [False, True], [False, True], ['avg', 'max']
    )
]
VV_OPTIONS = [
    dict(
        avm_loss=k,
        avm_threshold=False,
        avm_norm=nm,
        avm_pooling=p,
        avm_closer=True,
    )
    for k, nm, p in itertools.product(
        ['kl', 'euclidean'], [False, True], ['avg', 'max']
    )
]


def _opt_id(o):
  return '-'.join(
      [('vv' if o['avm_closer'] else 'av'), o['avm_loss'], o['avm_pooling']]
      + (['thr'] if o['avm_threshold'] else [])
      + (['norm'] if o['avm_norm'] else [])
  )


@pytest.mark.parametrize('opts', AV_OPTIONS + VV_OPTIONS, ids=_opt_id)
def test_avm_options_match_numpy(opts):
  out, masks = _random_outputs()
  stages = (0, 1, 2, 3)
  _, aux = losses.avs_loss(
      out, masks, setting='ms3', avm_weight=0.5, avm_stages=stages, **opts
  )
  logits, v_maps, a_feas = _flat(out)
  expected = np_avm(
      logits,
      v_maps,
      a_feas,
      stages,
      opts['avm_loss'],
      opts['avm_closer'],
      opts['avm_threshold'],
      opts['avm_norm'],
      opts['avm_pooling'],
  )
  np.testing.assert_allclose(aux['avm'], expected, rtol=RTOL)


def test_avm_stage_subset_and_total():
  out, masks = _random_outputs(seed=1)
  logits, v_maps, a_feas = _flat(out)
  total, aux = losses.avs_loss(
      out, masks, setting='ms3', avm_weight=0.25, avm_stages=(1, 3)
  )
  expected = np_avm(
      logits, v_maps, a_feas, (1, 3), 'kl', False, False, False, 'avg'
  )
  np.testing.assert_allclose(aux['avm'], expected, rtol=RTOL)
  np.testing.assert_allclose(total, aux['bce'] + 0.25 * expected, rtol=RTOL)


def test_closer_pairs_nearest_other_frame():
  # Audio features of 4 frames at 0, 0.1, 5, 5.3 on a line: partners 1, 0, 3, 2.
  c = 4
  a = np.zeros((1, 4, c), np.float32)
  a[0, :, 0] = [0.0, 0.1, 5.0, 5.3]
  rng = np.random.default_rng(3)
  v = rng.random((1, 4, 2, 2, c)).astype(np.float32)
  logits = np.zeros((1, 4, 2, 2), np.float32)  # mask = sigmoid(0) = 0.5
  loss = losses.avm_vv_stage(logits, v, a, loss='euclidean')
  feats = 0.5 * v[0].mean((1, 2))
  expected = np.mean(
      [
          np.linalg.norm(feats[p] - feats[i] + 1e-6)
          for i, p in enumerate([1, 0, 3, 2])
      ]
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_euclidean_adds_pairwise_distance_eps():
  # F.pairwise_distance computes ||x1 - x2 + 1e-6||: identical features are
  # 1e-6 * sqrt(C) apart. Saturated logits make the mask exactly 1, so the
  # masked visual feature equals the (spatially constant) map.
  c = 16
  a = np.random.default_rng(0).standard_normal((1, 2, c)).astype(np.float32)
  v_map = np.broadcast_to(a[:, :, None, None, :], (1, 2, 3, 3, c))
  logits = np.full((1, 2, 6, 6), 40.0, np.float32)
  loss = losses.avm_av_stage(logits, v_map, a, loss='euclidean')
  np.testing.assert_allclose(loss, 1e-6 * np.sqrt(c), rtol=1e-3)


# ----------------------------------------------------------------------------
# Adaptive pooling.


def test_adaptive_pool_hand_computed():
  x = np.arange(5, dtype=np.float32)[None, :]  # [1, 5] -> [1, 3]
  # bins [0, 2), [1, 4), [3, 5)
  np.testing.assert_allclose(
      losses.adaptive_pool2d(x, (1, 3), 'avg'), [[0.5, 2.0, 3.5]]
  )
  np.testing.assert_allclose(
      losses.adaptive_pool2d(x, (1, 3), 'max'), [[1.0, 3.0, 4.0]]
  )


@pytest.mark.parametrize(
    'in_hw,out_hw',
    [
        ((20, 20), (7, 7)),
        ((224, 224), (56, 56)),
        ((13, 9), (5, 4)),
        ((5, 6), (7, 9)),
        ((160, 160), (7, 7)),
    ],
)
@pytest.mark.parametrize('reduce', ['avg', 'max'])
def test_adaptive_pool_matches_numpy(in_hw, out_hw, reduce):
  x = (
      np.random.default_rng(0)
      .standard_normal((2, 3) + in_hw)
      .astype(np.float32)
  )
  np.testing.assert_allclose(
      losses.adaptive_pool2d(x, out_hw, reduce),
      np_adaptive_pool(x.astype(np.float64), out_hw, reduce),
      rtol=1e-5,
      atol=1e-6,
  )


@pytest.mark.parametrize(
    'in_hw,out_hw', [((20, 20), (7, 7)), ((13, 9), (5, 4)), ((5, 6), (7, 9))]
)
def test_adaptive_pool_matches_torch(in_hw, out_hw):
  torch = pytest.importorskip('torch')
  x = (
      np.random.default_rng(1)
      .standard_normal((2, 3) + in_hw)
      .astype(np.float32)
  )
  xt = torch.from_numpy(x)
  np.testing.assert_allclose(
      losses.adaptive_pool2d(x, out_hw, 'avg'),
      torch.nn.AdaptiveAvgPool2d(out_hw)(xt).numpy(),
      rtol=1e-6,
      atol=1e-6,
  )
  np.testing.assert_array_equal(
      losses.adaptive_pool2d(x, out_hw, 'max'),
      torch.nn.AdaptiveMaxPool2d(out_hw)(xt).numpy(),
  )


# ----------------------------------------------------------------------------
# BCE.


def test_bce_matches_definition_and_clamp():
  x = np.array([-200.0, -50.0, -3.0, 0.0, 2.5, 12.0, 200.0], np.float32)
  for y in (0.0, 1.0):
    t = np.full_like(x, y)
    p = np_sigmoid(x.astype(np.float64))
    with np.errstate(divide='ignore'):
      ref = -(
          y * np.maximum(np.log(p), -100)
          + (1 - y) * np.maximum(np.log1p(-p), -100)
      )
    np.testing.assert_allclose(
        losses.bce_with_logits(x, t), ref, rtol=1e-5, atol=1e-30
    )
  # log clamped at -100 as torch: a confident wrong logit costs 100.
  np.testing.assert_allclose(
      losses.bce_with_logits(np.float32(-200.0), np.float32(1.0)), 100.0
  )


def test_bce_matches_torch_bceloss():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  x = (4.0 * rng.standard_normal((2, 5, 16, 16))).astype(np.float32)
  y = (rng.random((2, 5, 16, 16)) > 0.5).astype(np.float32)
  ref = torch.nn.BCELoss()(
      torch.sigmoid(torch.from_numpy(x)), torch.from_numpy(y)
  )
  ours, _ = losses.avs_loss({'logits': x}, y, setting='ms3')
  np.testing.assert_allclose(ours, ref.item(), rtol=RTOL)


def test_s4_uses_first_frame_only_and_labelled_weights():
  out, masks = _random_outputs(seed=2)
  x, y = out['logits'], masks

  def loss(o, m, **kw):
    return losses.avs_loss(o, m, **kw)[0]

  s4 = loss(out, masks, setting='s4')
  first = np.asarray(losses.bce_with_logits(x[:, 0], y[:, 0])).mean()
  np.testing.assert_allclose(s4, first, rtol=1e-6)
  # Changing frames other than the first does not change S4.
  out2 = dict(out, logits=x.copy())
  out2['logits'][:, 1:] = 7.0
  np.testing.assert_allclose(loss(out2, masks, setting='s4'), s4, rtol=1e-6)

  ms3 = loss(out, masks, setting='ms3')
  ones = np.ones(x.shape[:2], np.float32)
  np.testing.assert_allclose(
      loss(out, masks, setting='ms3', labelled=ones), ms3, rtol=1e-6
  )
  np.testing.assert_allclose(
      loss(out, masks, setting='s4', labelled=ones), s4, rtol=1e-6
  )
  # A zero-weighted (padding) clip drops out.
  w = ones.copy()
  w[1] = 0.0
  np.testing.assert_allclose(
      loss(out, masks, setting='ms3', labelled=w),
      loss({'logits': x[:1]}, masks[:1], setting='ms3'),
      rtol=1e-6,
  )
  np.testing.assert_allclose(
      loss(out, masks, setting='ms3', labelled=np.zeros_like(w)), 0.0
  )


def test_invalid_options_raise():
  out, masks = _random_outputs()
  with pytest.raises(ValueError):
    losses.avs_loss(out, masks, setting='avss')
  with pytest.raises(ValueError):
    losses.avs_loss(out, masks, setting='ms3', avm_stages=(0,), avm_loss='cos')
  with pytest.raises(ValueError):
    losses.avs_loss(
        out,
        masks,
        setting='ms3',
        avm_stages=(0,),
        avm_closer=True,
        avm_threshold=True,
    )
  with pytest.raises(ValueError):
    losses.avs_loss(
        dict(out, audio_features=None), masks, setting='ms3', avm_stages=(0,)
    )


# ----------------------------------------------------------------------------
# jit + grad.


@pytest.mark.parametrize(
    'opts', [AV_OPTIONS[0], AV_OPTIONS[-1], VV_OPTIONS[-1]], ids=_opt_id
)
def test_jit_grad_finite(opts):
  out, masks = _random_outputs(seed=4)
  out = jax.tree.map(jnp.asarray, out)

  @jax.jit
  def f(o):
    return losses.avs_loss(
        o, masks, setting='ms3', avm_weight=0.5, avm_stages=(1, 2), **opts
    )

  (loss, _), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(out)
  assert np.isfinite(float(loss))
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.any(np.asarray(grads['logits']) != 0)
  for s in range(4):  # stages 1 and 2 only (non-divisible pooling sizes)
    used = s in (1, 2)
    assert np.any(np.asarray(grads['visual_maps'][s]) != 0) == used
    if not opts['avm_closer']:  # the closer loss does not reach the audio
      assert np.any(np.asarray(grads['audio_features'][s]) != 0) == used
