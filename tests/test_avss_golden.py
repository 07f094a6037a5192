"""Parity of the AVSS variant with the official `avs_scripts/avss` code.

Fixtures: tests/data/golden_avss (made by tests/reference/make_avss_golden.py
from the reference PyTorch code with the deterministic weights of
tests/data/golden/README.md). Weights go through `avss.torch_to_flax`, as an
official AVSS checkpoint does.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avs_jax import avss
from avs_jax import losses
from avs_jax import metrics
from avs_jax.models import build_model
from golden_weights import rebuild_state_dict

GOLDEN = os.path.join(os.path.dirname(__file__), 'data', 'golden_avss')
FWD_TOL = 1e-4  # relative L2, forward arrays
SCALAR_TOL = 1e-4  # relative, losses and metrics
GRAD_TOL = 1e-3  # relative L2, gradients
AVM_VARIANTS = {  # fixture name -> avss_loss keyword arguments
    'kl': dict(avm_loss='kl'),
    'euclidean_norm': dict(avm_loss='euclidean', avm_norm=True),
    'kl_threshold': dict(avm_loss='kl', avm_threshold=True),
    'kl_max': dict(avm_loss='kl', avm_pooling='max'),
    'closer_kl': dict(avm_loss='kl', avm_closer=True),
    'closer_euclidean_norm': dict(
        avm_loss='euclidean', avm_norm=True, avm_closer=True
    ),
}


def rel(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@functools.lru_cache(maxsize=1)  # one model's variables in memory at a time
def load(name):
  d = dict(np.load(os.path.join(GOLDEN, name)))
  cfg = json.loads(str(d['config']))
  t, h, w = cfg['frames_per_clip'], cfg['height'], cfg['width']
  d['cfg'] = cfg
  sd = rebuild_state_dict(d['state_dict_shapes'])
  d['state_dict'] = sd
  d['mcfg'] = avss.model_config_from_state_dict(sd)
  d['variables'] = avss.torch_to_flax(sd)
  d['x_frames'] = d['frames'].reshape(-1, t, 3, h, w).transpose(0, 1, 3, 4, 2)
  d['x_audio'] = d['audio_embedding'].reshape(-1, t, 128)
  d['x_labels'] = d['labels'].reshape(-1, t, h, w)
  d['x_vid'] = d['vid_temporal_mask'].reshape(-1, t)
  return d


def logits_to_ours(x, t):
  """[B*T, K, H, W] -> [B, T, H, W, K]."""
  return x.reshape(-1, t, *x.shape[1:]).transpose(0, 1, 3, 4, 2)


def gt_masks(d):
  return {
      k[len('gt_temporal_mask_') :]: d[k].reshape(d['x_vid'].shape)
      for k in d
      if k.startswith('gt_temporal_mask_')
  }


def test_model_config_from_checkpoint_keys():
  for name, backbone in [
      ('avss_resnet50_32.npz', 'resnet50'),
      ('avss_pvt_v2_b5_32.npz', 'pvt_v2_b5'),
  ]:
    m = load(name)['mcfg']
    assert m.backbone == backbone
    assert m.num_classes == 71 and not m.align_bias and m.tpavi_group == 5
    assert tuple(m.tpavi_stages) == (0, 1, 2, 3)


@pytest.mark.parametrize(
    'name', ['avss_resnet50_32.npz', 'avss_pvt_v2_b5_32.npz']
)
def test_eval_forward_losses_and_metrics(name):
  d = load(name)
  t = d['cfg']['frames_per_clip']
  model = build_model(d['mcfg'])
  out = jax.jit(model.apply)(
      d['variables'], d['x_frames'], d['x_audio'], frame_mask=d['x_vid']
  )
  ref_logits = logits_to_ours(d['logits'], t)
  assert out['logits'].shape == ref_logits.shape
  assert rel(out['logits'], ref_logits) < FWD_TOL
  for i in range(4):
    v = d[f'v_map_{i}']
    v = v.reshape(-1, t, *v.shape[1:]).transpose(0, 1, 3, 4, 2)
    assert rel(out['visual_maps'][i], v) < FWD_TOL, i
    a = d[f'a_fea_{i}'].reshape(-1, t, d[f'a_fea_{i}'].shape[-1])
    assert rel(out['audio_features'][i], a) < FWD_TOL, i

  labels = d['x_labels']
  avm_logits = logits_to_ours(d['avm_logits'], t)
  for g, gt in gt_masks(d).items():
    total, aux = losses.avss_loss(
        out, labels, gt, avm_weight=0.5, avm_stages=(0, 1, 2, 3)
    )
    np.testing.assert_allclose(aux['ce'], d[f'loss_ce_{g}'], rtol=SCALAR_TOL)
    np.testing.assert_allclose(
        aux['avm'], d[f'loss_avm_kl_{g}'], rtol=SCALAR_TOL
    )
    np.testing.assert_allclose(
        total, d[f'loss_total_lambda0.5_kl_{g}'], rtol=SCALAR_TOL
    )
    for variant, kw in AVM_VARIANTS.items():
      for suffix, logits in [('', out['logits']), ('_avmlogits', avm_logits)]:
        o = dict(out, logits=logits)
        _, aux = losses.avss_loss(o, labels, gt, avm_stages=(0, 1, 2, 3), **kw)
        np.testing.assert_allclose(
            aux['avm'],
            d[f'loss_avm_{variant}_{g}{suffix}'],
            rtol=SCALAR_TOL,
            err_msg=f'{variant} {g}{suffix}',
        )

  s = metrics.avss_frame_stats(
      ref_logits.reshape(-1, *ref_logits.shape[2:]),
      labels.reshape(-1, *labels.shape[2:]),
  )
  np.testing.assert_allclose(s['iou'].sum(0), d['metric_ious'], rtol=1e-5)
  np.testing.assert_allclose(s['fscore'].sum(0), d['metric_fscores'], rtol=1e-5)
  np.testing.assert_array_equal(s['seen'].sum(0), d['metric_cls_count'])
  np.testing.assert_allclose(s['frame_miou'], d['metric_frame_miou'], rtol=1e-5)


def test_padded_frames_are_zero_and_change_nothing_else():
  """Real frames' outputs do not depend on what the padded frames hold."""
  d = load('avss_pvt_v2_b5_32.npz')
  model = build_model(d['mcfg'])
  apply = jax.jit(model.apply)
  out = apply(
      d['variables'], d['x_frames'], d['x_audio'], frame_mask=d['x_vid']
  )
  pad = d['x_vid'][0] == 0
  assert pad.any() and not np.any(np.asarray(out['logits'])[0, pad])
  frames = np.array(d['x_frames'])
  frames[:, pad] = np.random.default_rng(0).standard_normal(
      frames[:, pad].shape
  )
  out2 = apply(d['variables'], frames, d['x_audio'], frame_mask=d['x_vid'])
  np.testing.assert_allclose(out2['logits'], out['logits'], atol=1e-5)


def test_checkpoint_round_trip():
  """Flax -> PyTorch layout gives back the reference's keys and tensors."""
  for name in ['avss_resnet50_32.npz', 'avss_pvt_v2_b5_32.npz']:
    d = load(name)
    sd = avss.flax_to_torch(d['variables'], d['mcfg'])
    ref = d['state_dict']
    assert set(k for k in sd if not k.endswith('num_batches_tracked')) == set(
        ref
    )
    for k, v in ref.items():
      if k.startswith(('resnet.layer3_2', 'resnet.layer4_2')):
        continue  # the unused branch: filled with a copy of the used one
      np.testing.assert_array_equal(sd[k], v, err_msg=k)


def _train(d, dtype):
  model = build_model(d['mcfg'], dtype=dtype)
  cast = lambda x: jnp.asarray(x, dtype)
  variables = jax.tree_util.tree_map(cast, d['variables'])
  gt = d['gt_temporal_mask_v1m'].reshape(d['x_vid'].shape)

  def loss_fn(params, stats, frames, audio, vid, labels):
    out, new_state = model.apply(
        {'params': params, 'batch_stats': stats},
        frames,
        audio,
        train=True,
        frame_mask=vid,
        mutable=['batch_stats'],
    )
    loss, aux = losses.avss_loss(
        out, labels, gt, avm_weight=0.5, avm_stages=(0, 1, 2, 3)
    )
    return loss, (aux, out['logits'], new_state)

  (loss, (aux, logits, state)), grads = jax.jit(
      jax.value_and_grad(loss_fn, has_aux=True)
  )(
      variables['params'],
      variables['batch_stats'],
      cast(d['x_frames']),
      cast(d['x_audio']),
      cast(d['x_vid']),
      d['x_labels'],
  )
  return (
      loss,
      aux,
      logits,
      avss.flax_to_torch({'params': grads}, d['mcfg']),
      avss.flax_to_torch(state, d['mcfg']),
  )


@pytest.fixture(scope='module')
def train_results():
  d = load('avss_resnet50_train_32.npz')
  return d, _train(d, jnp.float32)


@pytest.fixture(scope='module')
def train_results64(train_results):
  d = train_results[0]
  with jax.enable_x64(True):
    return _train(d, jnp.float64)


def _bound(tol, ours32, ours64, ref32, ref64):
  """`tol`, or twice the larger float32 rounding error (ours or the
  reference's, each measured against its own float64 run) if larger."""
  return max(tol, 2 * rel(ours32, ours64), 2 * rel(ref32, ref64))


def test_train_forward_loss_and_batch_stats(train_results, train_results64):
  """Training mode: BatchNorm on batch statistics (the padded zero frames
  included, as in the reference), updated running statistics (momentum 0.1,
  unbiased variance).

  Float64 against the reference's float64 run within 1e-6; float32 against
  the reference's float32 within FWD_TOL or twice the float32 rounding error
  measured on both sides (the 1x1 maps of stage 4 make a few statistics
  noisier than 1e-4 in float32: ~1.4e-4 for tpavi_b4's BatchNorm).
  """
  d, (loss, aux, logits, _, stats) = train_results
  loss64, _, _, _, stats64 = train_results64
  t = d['cfg']['frames_per_clip']
  assert rel(logits, logits_to_ours(d['logits'], t)) < FWD_TOL
  np.testing.assert_allclose(aux['ce'], d['loss_ce_v1m'], rtol=SCALAR_TOL)
  np.testing.assert_allclose(aux['avm'], d['loss_avm_kl_v1m'], rtol=SCALAR_TOL)
  np.testing.assert_allclose(
      loss, d['loss_total_lambda0.5_kl_v1m'], rtol=SCALAR_TOL
  )
  # 1e-6, not float64 rounding: the model returns its logits in float32.
  np.testing.assert_allclose(
      loss64, d['float64/loss_total_lambda0.5_kl_v1m'], rtol=1e-6
  )
  keys = [k for k in d if k.startswith('updated/')]
  assert len(keys) > 100  # every BatchNorm of the ResNet and the TPAVIs
  direct = 0
  for k in keys:
    key = k[len('updated/') :]
    ref64 = d['float64/' + k]
    assert rel(stats64[key], ref64) < 1e-6, k
    bound = _bound(FWD_TOL, stats[key], stats64[key], d[k], ref64)
    assert rel(stats[key], d[k]) < bound, k
    direct += rel(stats[key], d[k]) < FWD_TOL
  assert direct >= len(keys) - 5


def test_train_gradients(train_results, train_results64):
  """Gradients of CE + 0.5 AVM-KL in training mode.

  Float64 against the reference's float64 gradients within 1e-6: the exact
  check. Float32 against the reference's float32 within GRAD_TOL or twice
  the larger float32 rounding error (ours, or the reference's: ~5% for the
  ResNet's early layers, whose train-mode gradients are ill-conditioned, and
  1e-3 - 2e-3 for the TPAVI blocks), and the output head's within GRAD_TOL
  directly.
  """
  d, (_, _, _, g32, _) = train_results
  _, _, _, g64, _ = train_results64
  keys = [k for k in d if k.startswith('grad/')]
  assert len(keys) >= 10
  for k in keys:
    key = k[len('grad/') :]
    ref64 = d['float64/' + k]
    assert rel(g64[key], ref64) < 1e-6, (key, rel(g64[key], ref64))
    bound = _bound(GRAD_TOL, g32[key], g64[key], d[k], ref64)
    assert rel(g32[key], d[k]) < bound, (key, rel(g32[key], d[k]), bound)
  # Near the output, where float32 is accurate, the plain bound holds.
  near = [k for k in keys if k.startswith(('grad/output_conv', 'grad/path1'))]
  assert len(near) >= 4
  for k in near:
    assert rel(g32[k[len('grad/') :]], d[k]) < GRAD_TOL, k


def test_metric_scenarios_and_test_loop():
  """The reference metric on crafted predictions (absent classes, a class
  only predicted, one only in the ground truth, an all-background frame,
  zero logits on padded frames) and test.py's aggregation after each batch."""
  d = load_metrics()
  acc = None
  for s in range(4):
    logits = d['scenario_logits'][s].transpose(0, 2, 3, 1)[None]
    labels = d['scenario_labels'][s][None]
    st = metrics.avss_frame_stats(logits[0], labels[0])
    np.testing.assert_allclose(
        st['frame_miou'], d[f'scenario{s}_frame_miou'], rtol=1e-5
    )
    new = metrics.avss_clip_metrics(logits, labels)
    np.testing.assert_allclose(
        new['iou_sum'], d[f'scenario{s}_ious'], rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        new['fscore_sum'], d[f'scenario{s}_fscores'], rtol=1e-5, atol=1e-7
    )
    np.testing.assert_array_equal(
        new['class_count'], d[f'scenario{s}_cls_count']
    )
    acc = metrics.merge_metrics(acc, new)
    r = metrics.avss_summarize(acc)
    for ours, ref in [
        ('miou', 'miou'),
        ('fscore', 'fscore'),
        ('miou_noBg', 'miou_noBg'),
        ('fscore_noBg', 'fscore_noBg'),
        ('miou_present', 'running_miou'),
        ('fscore_present', 'running_fscore'),
    ]:
      np.testing.assert_allclose(
          r[ours], d[f'after{s}_{ref}'], rtol=SCALAR_TOL, err_msg=f'{s} {ours}'
      )
    assert r['num_classes_seen'] == d[f'after{s}_num_classes_seen']
    np.testing.assert_allclose(
        [c['miou'] for c in r['per_class']],
        d[f'after{s}_miou_per_class'],
        rtol=1e-5,
        atol=1e-7,
    )
    np.testing.assert_allclose(
        [c['fscore'] for c in r['per_class']],
        d[f'after{s}_fscore_per_class'],
        rtol=1e-5,
        atol=1e-7,
    )
  # Absent classes count 0 in the mean over all 71 (the first batch sees 7).
  assert d['after0_num_classes_seen'] == 7
  np.testing.assert_allclose(
      metrics.avss_summarize(
          metrics.merge_metrics(
              None,
              metrics.avss_clip_metrics(
                  d['scenario_logits'][0].transpose(0, 2, 3, 1)[None],
                  d['scenario_labels'][0][None],
              ),
          )
      )['miou'],
      7 / 71,
      rtol=1e-6,
  )


def test_palette_and_colour_labels():
  d = load_metrics()
  np.testing.assert_array_equal(avss.palette().astype(np.int64), d['palette'])
  np.testing.assert_array_equal(
      avss.color_to_label(d['color_mask']), d['color_label']
  )
  with pytest.raises(ValueError, match='outside the 71-class palette'):
    avss.color_to_label(d['color_mask'], strict=True)
  np.testing.assert_array_equal(
      avss.label_to_color(d['color_label'])[1:], d['color_mask'][1:]
  )


@functools.lru_cache(maxsize=None)
def load_metrics():
  return dict(np.load(os.path.join(GOLDEN, 'avss_metrics.npz')))
