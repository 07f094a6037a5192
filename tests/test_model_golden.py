"""Parity of the AVS model with the PyTorch reference (tests/data/golden).

Weights are rebuilt from each key by the fixture recipe and go through
`torch_to_flax`, exactly as a real checkpoint would.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from avs_jax import torch_weights
from avs_jax import losses
from avs_jax.models import build_model
from golden_weights import rebuild_state_dict

GOLDEN = os.path.join(os.path.dirname(__file__), 'data', 'golden')
FWD_TOL = 1e-4  # relative L2, forward arrays (fixture README)
SCALAR_TOL = 1e-4  # relative, losses
GRAD_TOL = 1e-3  # relative L2, gradients


def rel(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def model_config(cfg):
  return ml_collections.ConfigDict(
      dict(
          backbone=cfg['backbone'],
          channels=cfg['channel'],
          tpavi_stages=cfg['tpavi_stages'],
          tpavi_mode=cfg['tpavi_mode'],
          tpavi_vv=cfg['tpavi_vv'],
          tpavi_va=cfg['tpavi_va'],
      )
  )


@functools.lru_cache(maxsize=None)
def load(name):
  d = dict(np.load(os.path.join(GOLDEN, name)))
  cfg = json.loads(str(d['config']))
  t, h, w = cfg['frames_per_clip'], cfg['height'], cfg['width']
  d['cfg'] = cfg
  d['mcfg'] = model_config(cfg)
  d['variables'] = torch_weights.torch_to_flax(
      rebuild_state_dict(d['state_dict_shapes']), d['mcfg']
  )
  # PyTorch [B*T, C, H, W] -> ours [B, T, H, W, C].
  d['x_frames'] = d['frames'].reshape(-1, t, 3, h, w).transpose(0, 1, 3, 4, 2)
  d['x_audio'] = d['audio_embedding'].reshape(-1, t, 128)
  d['x_masks'] = d['masks'].reshape(-1, t, h, w)
  return d


def to_ours(v_map, t):
  """[B*T, C, h, w] -> [B, T, h, w, C]."""
  return v_map.reshape(-1, t, *v_map.shape[1:]).transpose(0, 1, 3, 4, 2)


@pytest.mark.parametrize(
    'name', ['avs_resnet50_224.npz', 'avs_pvt_v2_b5_224.npz']
)
def test_eval_forward_and_losses(name):
  d = load(name)
  t = d['cfg']['frames_per_clip']
  model = build_model(d['mcfg'])
  out = jax.jit(model.apply)(d['variables'], d['x_frames'], d['x_audio'])
  assert out['logits'].shape == d['x_masks'].shape
  assert rel(out['logits'], d['logits'].reshape(d['x_masks'].shape)) < FWD_TOL
  for i in range(4):
    assert rel(out['visual_maps'][i], to_ours(d[f'v_map_{i}'], t)) < FWD_TOL
    assert rel(out['audio_features'][i], d[f'a_fea_{i}']) < FWD_TOL

  masks = d['x_masks']
  kw = dict(avm_loss='kl', avm_stages=(0, 1, 2, 3))
  total, aux = losses.avs_loss(out, masks, setting='ms3', avm_weight=0.5, **kw)
  np.testing.assert_allclose(aux['bce'], d['loss_ms3_bce'], rtol=SCALAR_TOL)
  np.testing.assert_allclose(aux['avm'], d['loss_ms3_avm_kl'], rtol=SCALAR_TOL)
  np.testing.assert_allclose(
      total, d['loss_ms3_total_lambda0.5_kl'], rtol=SCALAR_TOL
  )
  s4, _ = losses.avs_loss(out, masks, setting='s4')
  np.testing.assert_allclose(s4, d['loss_s4_bce_first_frame'], rtol=SCALAR_TOL)


def _train_grads(d, dtype):
  """Loss, gradients (PyTorch layout) and updated stats in training mode."""
  model = build_model(d['mcfg'], dtype=dtype)
  cast = lambda x: jnp.asarray(x, dtype)
  variables = jax.tree_util.tree_map(cast, d['variables'])

  def loss_fn(params):
    out, new_state = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']},
        cast(d['x_frames']),
        cast(d['x_audio']),
        train=True,
        mutable=['batch_stats'],
    )
    loss, aux = losses.avs_loss(
        out,
        cast(d['x_masks']),
        setting='ms3',
        avm_weight=0.5,
        avm_stages=(0, 1, 2, 3),
    )
    return loss, (aux, out['logits'], new_state)

  (loss, (aux, logits, state)), grads = jax.jit(
      jax.value_and_grad(loss_fn, has_aux=True)
  )(variables['params'])
  return (
      loss,
      aux,
      logits,
      torch_weights.variables_to_torch({'params': grads}),
      torch_weights.variables_to_torch(state),
  )


@pytest.fixture(scope='module')
def train_results():
  d = load('avs_resnet50_train_160.npz')
  return d, _train_grads(d, jnp.float32)


def test_train_forward_loss_and_batch_stats(train_results):
  d, (loss, aux, logits, _, stats) = train_results
  assert rel(logits, d['logits'].reshape(d['x_masks'].shape)) < FWD_TOL
  np.testing.assert_allclose(aux['bce'], d['loss_ms3_bce'], rtol=SCALAR_TOL)
  np.testing.assert_allclose(aux['avm'], d['loss_ms3_avm_kl'], rtol=SCALAR_TOL)
  np.testing.assert_allclose(
      loss, d['loss_ms3_total_lambda0.5_kl'], rtol=SCALAR_TOL
  )
  keys = [k for k in d if k.startswith('updated/')]
  assert keys
  for k in keys:  # PyTorch momentum 0.1, unbiased running variance.
    assert rel(stats[k[len('updated/') :]], d[k]) < FWD_TOL, k


def test_train_gradients(train_results):
  """Gradients of the MS3 loss (BCE + 0.5 AVM-KL) in training mode.

  Train-mode BatchNorm makes the deep ResNet gradients ill-conditioned in
  float32: our own float32 gradient of `resnet.conv1.weight` is ~2% from the
  float64 one, and so is the reference's (measured: 1.96%). So each golden
  gradient is compared with our float64 gradient and must agree within
  GRAD_TOL or within twice the float32 rounding error measured on the same
  computation, whichever is larger. Near the output, where float32 is
  accurate, this is the plain 1e-3 bound (and a semantic error would show).
  """
  d, (_, _, _, g32, _) = train_results
  with jax.enable_x64(True):
    _, _, _, g64, _ = _train_grads(d, jnp.float64)
  keys = [k for k in d if k.startswith('grad/')]
  assert len(keys) >= 10
  for k in keys:
    key = k[len('grad/') :]
    noise = rel(g32[key], g64[key])
    bound = max(GRAD_TOL, 2 * noise)
    assert rel(d[k], g64[key]) < bound, (key, rel(d[k], g64[key]), noise)
  # Most of the fixture's gradients meet the plain bound directly in float32.
  direct = [k for k in keys if rel(g32[k[len('grad/') :]], d[k]) < GRAD_TOL]
  assert len(direct) >= len(keys) // 2, direct
