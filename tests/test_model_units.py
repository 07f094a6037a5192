"""Unit tests of the AVS model beyond the golden fixtures.

TPAVI in all four modes is checked against a naive NumPy re-derivation of the
reference `TPAVIModule.forward` (full [THW, THW] affinity, NCTHW layout);
the full model against its structural contract (shapes, T, batch
independence, bf16, train mode, errors).
"""

import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from avs_jax.models import build_model
from avs_jax.models import layers
from avs_jax.models.avs import ASPP
from avs_jax.models.tpavi import TPAVI

MODES = ('dot', 'embedded', 'gaussian', 'concatenate')
B, T, H, W, C = 2, 3, 4, 6, 16
CI = C // 2


# --------------------------------------------------------------------------
# TPAVI: naive NumPy reference.


def _conv1x1(w, b, x):
  """PyTorch 1x1x1 Conv3d: `w [O, I, 1, 1, 1]`, `x [B, I, T, H, W]`."""
  w = w.reshape(w.shape[:2])
  return np.einsum('oi,bithw->bothw', w, x) + b[None, :, None, None, None]


def _softmax(f):
  e = np.exp(f - f.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def naive_tpavi(x_nthwc, audio, tp, mode, train=False, eps=1e-5):
  """The reference forward, step by step. `tp` holds PyTorch-layout arrays.

  Returns (z [B, T, H, W, C], audio_temp [B, T, C] or None, batch mean,
  biased batch var) -- the last two only meaningful in train mode.
  """
  x = np.transpose(x_nthwc, (0, 4, 1, 2, 3))  # [B, C, T, H, W]
  b, c, t, h, w = x.shape
  ci = c // 2
  audio_temp = None
  if audio is not None:
    audio_temp = audio @ tp['align_channel.weight'].T + tp['align_channel.bias']
    a = np.transpose(audio_temp, (0, 2, 1))[..., None, None]  # [B, C, T, 1, 1]
    a = np.tile(a, (1, 1, 1, h, w))  # [B, C, T, H, W]
  else:
    a = x
  g_x = _conv1x1(tp['g.weight'], tp['g.bias'], x).reshape(b, ci, -1)
  g_x = np.transpose(g_x, (0, 2, 1))  # [B, THW, C']
  if mode == 'gaussian':
    theta_x = np.transpose(x.reshape(b, c, -1), (0, 2, 1))
    phi_x = a.reshape(b, c, -1)
    f = theta_x @ phi_x
  elif mode in ('embedded', 'dot'):
    theta_x = _conv1x1(tp['theta.weight'], tp['theta.bias'], x).reshape(
        b, ci, -1
    )
    phi_x = _conv1x1(tp['phi.weight'], tp['phi.bias'], a).reshape(b, ci, -1)
    f = np.transpose(theta_x, (0, 2, 1)) @ phi_x  # [B, THW, THW]
  else:  # concatenate
    theta_x = _conv1x1(tp['theta.weight'], tp['theta.bias'], x).reshape(
        b, ci, -1, 1
    )
    phi_x = _conv1x1(tp['phi.weight'], tp['phi.bias'], a).reshape(b, ci, 1, -1)
    n_q, n_k = theta_x.shape[2], phi_x.shape[3]
    theta_x = np.tile(theta_x, (1, 1, 1, n_k))
    phi_x = np.tile(phi_x, (1, 1, n_q, 1))
    concat = np.concatenate([theta_x, phi_x], axis=1)  # [B, 2C', THW, THW]
    wf = tp['W_f.0.weight'].reshape(1, 2 * ci)  # Conv2d [1, 2C', 1, 1]
    f = (
        np.einsum('oc,bcij->boij', wf, concat)
        + tp['W_f.0.bias'][None, :, None, None]
    )
    f = np.maximum(f, 0.0)[:, 0]
  if mode in ('gaussian', 'embedded'):
    f_div_c = _softmax(f)
  else:
    f_div_c = f / f.shape[-1]
  y = f_div_c @ g_x  # [B, THW, C']
  y = np.transpose(y, (0, 2, 1)).reshape(b, ci, t, h, w)
  wy = _conv1x1(tp['W_z.0.weight'], tp['W_z.0.bias'], y)
  if train:
    mean = wy.mean(axis=(0, 2, 3, 4))
    var = wy.var(axis=(0, 2, 3, 4))
  else:
    mean, var = tp['W_z.1.running_mean'], tp['W_z.1.running_var']
  bc = lambda v: v[None, :, None, None, None]
  wy = (wy - bc(mean)) / np.sqrt(bc(var) + eps) * bc(tp['W_z.1.weight']) + bc(
      tp['W_z.1.bias']
  )
  z = np.transpose(wy + x, (0, 2, 3, 4, 1))  # [B, T, H, W, C]
  mu = z.mean(-1, keepdims=True)
  sig2 = z.var(-1, keepdims=True)
  z = (z - mu) / np.sqrt(sig2 + 1e-5) * tp['norm_layer.weight'] + tp[
      'norm_layer.bias'
  ]
  return z, audio_temp, mean, var


def randomize(variables, seed):
  """Every leaf replaced by a random float64 array (scales/vars positive)."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  out = {}
  for path, v in flat.items():
    n = rng.standard_normal(v.shape)
    if path[-1] in ('scale', 'var'):
      n = 0.5 + np.abs(n)
    elif path[-1] == 'kernel':
      n = n / np.sqrt(np.prod(v.shape[:-1]))
    elif path[-1] in ('bias', 'mean'):
      n = 0.3 * n
    out[path] = n.astype(np.float32).astype(np.float64)
  return flax.traverse_util.unflatten_dict(out)


def torch_layout(variables):
  """Our TPAVI variables -> PyTorch-layout arrays, written out by hand."""
  p, s = variables['params'], variables['batch_stats']
  conv = lambda k: np.transpose(k.reshape(k.shape[-2:]))[..., None, None, None]
  tp = {
      'align_channel.weight': p['align_channel']['kernel'].T,
      'align_channel.bias': p['align_channel']['bias'],
      'norm_layer.weight': p['norm_layer']['scale'],
      'norm_layer.bias': p['norm_layer']['bias'],
      'W_z.0.weight': conv(p['W_z_0']['kernel']),
      'W_z.0.bias': p['W_z_0']['bias'],
      'W_z.1.weight': p['W_z_1']['scale'],
      'W_z.1.bias': p['W_z_1']['bias'],
      'W_z.1.running_mean': s['W_z_1']['mean'],
      'W_z.1.running_var': s['W_z_1']['var'],
  }
  for name in ('g', 'theta', 'phi'):
    if name in p:
      tp[f'{name}.weight'] = conv(p[name]['kernel'])
      tp[f'{name}.bias'] = p[name]['bias']
  if 'W_f_0' in p:
    k = p['W_f_0']['kernel']  # [1, 1, 2C', 1]
    tp['W_f.0.weight'] = np.transpose(k, (3, 2, 0, 1))
    tp['W_f.0.bias'] = p['W_f_0']['bias']
  return tp


@pytest.fixture(scope='module')
def tpavi_inputs():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((B, T, H, W, C))
  audio = rng.standard_normal((B, T, 128))
  return x, audio


def _tpavi_vars(mode, x, audio, seed):
  variables = TPAVI(mode).init(
      jax.random.key(0),
      jnp.asarray(x, jnp.float32),
      jnp.asarray(audio, jnp.float32),
  )
  return randomize(variables, seed)


EXPECTED_PARAMS = {
    'dot': {
        'align_channel',
        'norm_layer',
        'g',
        'theta',
        'phi',
        'W_z_0',
        'W_z_1',
    },
    'embedded': {
        'align_channel',
        'norm_layer',
        'g',
        'theta',
        'phi',
        'W_z_0',
        'W_z_1',
    },
    'gaussian': {'align_channel', 'norm_layer', 'g', 'W_z_0', 'W_z_1'},
    'concatenate': {
        'align_channel',
        'norm_layer',
        'g',
        'theta',
        'phi',
        'W_z_0',
        'W_z_1',
        'W_f_0',
    },
}


@pytest.mark.parametrize('with_audio', [True, False], ids=['va', 'vv'])
@pytest.mark.parametrize('mode', MODES)
def test_tpavi_matches_naive_reference(tpavi_inputs, mode, with_audio):
  x, audio = tpavi_inputs
  a = audio if with_audio else None
  # Built the same whether or not audio is given (the reference's constructor).
  init_vv = jax.eval_shape(
      TPAVI(mode).init, jax.random.key(0), jnp.zeros((B, T, H, W, C))
  )
  assert set(init_vv['params']) == EXPECTED_PARAMS[mode]
  variables = _tpavi_vars(mode, x, audio, seed=1)
  assert set(variables['params']) == EXPECTED_PARAMS[mode]
  ref, ref_a, _, _ = naive_tpavi(x, a, torch_layout(variables), mode)
  with jax.enable_x64(True):
    z, a_fea = TPAVI(mode, dtype=jnp.float64).apply(
        variables, jnp.asarray(x), None if a is None else jnp.asarray(a)
    )
    z = np.asarray(z)
    a_fea = None if a_fea is None else np.asarray(a_fea)
  assert z.shape == (B, T, H, W, C)
  # The W_z branch really contributes (not just LayerNorm(x)).
  ln_x = (x - x.mean(-1, keepdims=True)) / np.sqrt(
      x.var(-1, keepdims=True) + 1e-5
  )
  assert np.abs(ref - ln_x).max() > 0.1
  np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-5)
  if with_audio:
    assert a_fea.shape == (B, T, C)
    np.testing.assert_allclose(a_fea, ref_a, rtol=1e-10, atol=1e-10)
  else:
    assert a_fea is None


@pytest.mark.parametrize('mode', MODES)
def test_tpavi_float64_compute_is_float64(tpavi_inputs, mode):
  """`TPAVI(dtype=float64)` is float64 throughout, softmax included (a
  float32 softmax would leave ~1e-7 errors in the softmax modes)."""
  x, audio = tpavi_inputs
  variables = _tpavi_vars(mode, x, audio, seed=1)
  ref, _, _, _ = naive_tpavi(x, audio, torch_layout(variables), mode)
  with jax.enable_x64(True):
    z, _ = TPAVI(mode, dtype=jnp.float64).apply(
        variables, jnp.asarray(x), jnp.asarray(audio)
    )
    assert z.dtype == jnp.float64
    z = np.asarray(z)
  np.testing.assert_allclose(z, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('mode', ['dot', 'concatenate'])
def test_tpavi_float32(tpavi_inputs, mode):
  """The default float32 path agrees with the float64 reference too."""
  x, audio = tpavi_inputs
  variables = _tpavi_vars(mode, x, audio, seed=2)
  ref, _, _, _ = naive_tpavi(x, audio, torch_layout(variables), mode)
  v32 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), variables)
  z, _ = jax.jit(TPAVI(mode).apply)(
      v32, jnp.asarray(x, jnp.float32), jnp.asarray(audio, jnp.float32)
  )
  assert z.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(z), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('with_audio', [True, False], ids=['va', 'vv'])
def test_tpavi_train_mode_batch_stats(tpavi_inputs, with_audio):
  """Train mode: BatchNorm3d on batch statistics (biased var) over B, T, H, W;
  running stats updated with momentum 0.1 and the unbiased variance."""
  x, audio = tpavi_inputs
  a = audio if with_audio else None
  variables = _tpavi_vars('embedded', x, audio, seed=3)
  tp = torch_layout(variables)
  ref, _, mean, var = naive_tpavi(x, a, tp, 'embedded', train=True)
  with jax.enable_x64(True):
    (z, _), upd = TPAVI('embedded', train=True, dtype=jnp.float64).apply(
        variables,
        jnp.asarray(x),
        None if a is None else jnp.asarray(a),
        mutable=['batch_stats'],
    )
    z = np.asarray(z)
    upd = jax.tree.map(np.asarray, upd)
  np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-5)
  n = B * T * H * W
  np.testing.assert_allclose(
      upd['batch_stats']['W_z_1']['mean'],
      0.9 * tp['W_z.1.running_mean'] + 0.1 * mean,
      rtol=1e-5,
      atol=1e-6,
  )
  np.testing.assert_allclose(
      upd['batch_stats']['W_z_1']['var'],
      0.9 * tp['W_z.1.running_var'] + 0.1 * var * n / (n - 1),
      rtol=1e-5,
      atol=1e-6,
  )


def test_tpavi_init_is_the_reference_identity(tpavi_inputs):
  """The reference zero-initialises the W_z BatchNorm (weight and bias,
  `nn.init.constant_(self.W_z[1].weight, 0)`), so a freshly built TPAVI
  block returns LayerNorm(x): training starts from the plain encoder.

  Known failure (reported): `layers.BatchNorm` initialises `scale` to ones
  and TPAVI's `W_z_1` uses that default; `model.init` (which training uses)
  therefore starts every TPAVI block from a random branch.
  """
  x, audio = tpavi_inputs
  x = jnp.asarray(x, jnp.float32)
  audio = jnp.asarray(audio, jnp.float32)
  variables = TPAVI('dot').init(jax.random.key(0), x, audio)
  np.testing.assert_array_equal(variables['params']['W_z_1']['bias'], 0.0)
  np.testing.assert_array_equal(variables['params']['W_z_1']['scale'], 0.0)
  z, _ = TPAVI('dot').apply(variables, x, audio)
  xn = np.asarray(x, np.float64)
  ln_x = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(
      xn.var(-1, keepdims=True) + 1e-5
  )
  np.testing.assert_allclose(z, ln_x, rtol=1e-4, atol=1e-4)


def test_tpavi_bad_mode():
  with pytest.raises(ValueError, match='mode'):
    TPAVI('cosine').init(jax.random.key(0), jnp.zeros((1, 1, 2, 2, 4)))


# --------------------------------------------------------------------------
# Convolutions without the kernel taps that only read padding.


@pytest.mark.parametrize(
    'size, dilation, window',
    [
        ((5, 5), 6, (1, 1)),  # ASPP at 160, stage 4: only the centre tap
        ((10, 11), 12, (1, 1)),
        ((10, 11), 10, (1, 3)),  # rows: centre only; columns: all three
        ((10, 10), 6, (3, 3)),  # every tap meets the map: unchanged
        ((3, 3), 1, (3, 3)),
    ],
)
def test_conv_without_padding_taps_equals_lax(size, dilation, window):
  """Same outputs and gradients as lax, with the smaller window compiled."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, *size, 8))
  k = rng.standard_normal((3, 3, 8, 4))
  d = dilation
  args = ((1, 1), [(d, d), (d, d)], None, (d, d), ('NHWC', 'HWIO', 'NHWC'))

  def loss(conv_fn):
    return lambda x, k: jnp.sum(jnp.sin(conv_fn(x, k, *args)))

  with jax.enable_x64(True):
    x, k = jnp.asarray(x), jnp.asarray(k)
    want = jax.value_and_grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, k)
    got = jax.value_and_grad(loss(layers.conv_general_dilated), (0, 1))(x, k)
    hlo = jax.jit(loss(layers.conv_general_dilated)).lower(x, k).as_text()
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
  # The compiled forward conv has only the taps that meet the map.
  convs = [l for l in hlo.splitlines() if 'stablehlo.convolution' in l]
  assert f'tensor<{window[0]}x{window[1]}x8x4xf64>) ->' in convs[0], convs


# --------------------------------------------------------------------------
# The full AVS model (PVT-v2-b0 encoder, small head).

# Compilation dominates these tests on a CPU: trade run time for build time.
jit = functools.partial(
    jax.jit,
    compiler_options={
        'xla_backend_optimization_level': 0,
        'xla_llvm_disable_expensive_passes': True,
    },
)


def model_config(**overrides):
  cfg = ml_collections.ConfigDict(
      dict(
          backbone='pvt_v2_b0',
          channels=32,
          tpavi_stages=(0, 1, 2, 3),
          tpavi_mode='dot',
          tpavi_vv=False,
          tpavi_va=True,
      )
  )
  cfg.update(overrides)
  return cfg


def clip(b, t, h, w, seed=0):
  rng = np.random.default_rng(seed)
  return (
      jnp.asarray(rng.standard_normal((b, t, h, w, 3)), jnp.float32),
      jnp.asarray(rng.standard_normal((b, t, 128)), jnp.float32),
  )


def random_variables(shapes, seed=0):
  """Random float32 variables for a tree of shapes: fan-in scaled kernels,
  nonzero biases and norm scales, positive running variances. Random values
  (not the initialisers' zeros and ones) so that no branch is the identity."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  out = {}
  for path, s in flat.items():
    n = rng.standard_normal(s.shape)
    if path[-1] == 'kernel':
      n = n / np.sqrt(np.prod(s.shape[:-1]))
    elif path[-1] == 'var':
      n = 1 + 0.1 * np.abs(n)
    elif path[-1] == 'scale':
      n = 1 + 0.1 * n
    else:  # bias, mean
      n = 0.1 * n
    out[path] = jnp.asarray(n, jnp.float32)
  return flax.traverse_util.unflatten_dict(out)


def init_shapes(model, b=1, t=2, h=64, w=64, audio=True):
  frames, aud = clip(b, t, h, w)
  return jax.eval_shape(
      model.init, jax.random.key(0), frames, aud if audio else None
  )


@pytest.fixture(scope='module')
def pvt_model():
  """(model, variables, jitted eval apply) shared by the model tests."""
  model = build_model(model_config())
  return model, random_variables(init_shapes(model)), jit(model.apply)


def rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# One clip shape for most tests (one compilation): batch 2, T=3 (not the
# reference's hard-coded 5), non-square 64x96.
CLIP = (2, 3, 64, 96)


@pytest.fixture(scope='module')
def pvt_out(pvt_model):
  _, variables, apply = pvt_model
  frames, audio = clip(*CLIP, seed=1)
  return frames, audio, apply(variables, frames, audio)


def test_model_variables(pvt_model):
  _, variables, _ = pvt_model
  assert set(variables) == {'params', 'batch_stats'}
  assert set(variables['params']) == {
      'encoder_backbone',
      'conv1',
      'conv2',
      'conv3',
      'conv4',
      'path1',
      'path2',
      'path3',
      'path4',
      'tpavi_b1',
      'tpavi_b2',
      'tpavi_b3',
      'tpavi_b4',
      'output_conv_0',
      'output_conv_2',
      'output_conv_4',
  }
  # PVT has no BatchNorm: the running stats are TPAVI's W_z BatchNorms only.
  assert set(variables['batch_stats']) == {
      'tpavi_b1',
      'tpavi_b2',
      'tpavi_b3',
      'tpavi_b4',
  }


def test_model_output_shapes(pvt_out):
  _, audio, out = pvt_out
  b, t, h, w = CLIP
  assert set(out) == {'logits', 'visual_maps', 'audio_features'}
  assert out['logits'].shape == (b, t, h, w)
  assert out['logits'].dtype == jnp.float32
  assert np.all(np.isfinite(out['logits']))
  assert np.std(out['logits']) > 0
  assert len(out['visual_maps']) == 4 and len(out['audio_features']) == 4
  for i, (m, a) in enumerate(zip(out['visual_maps'], out['audio_features'])):
    s = 4 * 2**i
    assert m.shape == (b, t, h // s, w // s, 32)
    assert float(m.min()) >= 0.0  # the decoder's in-place ReLU view
    assert a.shape == (b, t, 32)


def test_audio_features_are_align_channel(pvt_model, pvt_out):
  _, variables, _ = pvt_model
  _, audio, out = pvt_out
  for i, a in enumerate(out['audio_features']):
    p = variables['params'][f'tpavi_b{i + 1}']['align_channel']
    ref = np.asarray(audio) @ np.asarray(p['kernel']) + np.asarray(p['bias'])
    np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-4)


def test_audio_changes_the_output(pvt_model, pvt_out):
  _, variables, apply = pvt_model
  frames, audio, out = pvt_out
  out2 = apply(variables, frames, audio * 2 + 1)
  assert rel_l2(out2['logits'], out['logits']) > 1e-3


def test_batch_equals_separate_clips(pvt_model, pvt_out):
  _, variables, apply = pvt_model
  frames, audio, out = pvt_out
  for b in range(CLIP[0]):
    single = apply(variables, frames[b : b + 1], audio[b : b + 1])
    np.testing.assert_allclose(
        out['logits'][b : b + 1], single['logits'], rtol=1e-4, atol=1e-4
    )
    for m, ms in zip(out['visual_maps'], single['visual_maps']):
      np.testing.assert_allclose(m[b : b + 1], ms, rtol=1e-4, atol=1e-4)
    for a, a_s in zip(out['audio_features'], single['audio_features']):
      np.testing.assert_allclose(a[b : b + 1], a_s, rtol=1e-5, atol=1e-5)


def test_frames_interact_within_a_clip_only(pvt_model, pvt_out):
  """TPAVI mixes the T frames of a clip (so T is really the time axis):
  changing one frame changes the clip's other frames, never another clip."""
  _, variables, apply = pvt_model
  frames, audio, out = pvt_out
  out2 = apply(variables, frames.at[0, 0].set(0.0), audio)
  assert rel_l2(out2['logits'][0, 1:], out['logits'][0, 1:]) > 1e-4
  np.testing.assert_allclose(
      out2['logits'][1], out['logits'][1], rtol=1e-5, atol=1e-5
  )


def test_bf16_close_to_fp32(pvt_model, pvt_out):
  _, variables, _ = pvt_model
  frames, audio, out = pvt_out
  model = build_model(model_config(), dtype=jnp.bfloat16)
  shapes = init_shapes(model)
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes))
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  out16 = jit(model.apply)(variables, frames, audio)
  assert out16['logits'].dtype == jnp.float32
  assert out16['visual_maps'][0].dtype == jnp.bfloat16  # really bf16 compute
  # bf16 rounds every layer's output (~0.4% each): the fused maps stay within
  # ~1%; the final 32 -> 1 projection of random weights cancels a lot, which
  # roughly triples the relative error of the logits.
  for m16, m32 in zip(out16['visual_maps'], out['visual_maps']):
    assert 1e-4 < rel_l2(m16, m32) < 2e-2
  for a16, a32 in zip(out16['audio_features'], out['audio_features']):
    assert rel_l2(a16, a32) < 1e-2
  err = rel_l2(out16['logits'], out['logits'])
  assert 1e-4 < err < 5e-2, err


@pytest.fixture(scope='module')
def train_apply(pvt_model):
  model, _, _ = pvt_model

  def fn(variables, frames, audio, key):
    return model.apply(
        variables,
        frames,
        audio,
        train=True,
        mutable=['batch_stats'],
        rngs={'dropout': key},
    )

  return jit(fn)


def test_train_mode_updates_batch_stats(pvt_model, pvt_out, train_apply):
  _, variables, _ = pvt_model
  frames, audio, out = pvt_out
  out_t, upd = train_apply(variables, frames, audio, jax.random.key(1))
  assert set(upd) == {'batch_stats'}
  old = flax.traverse_util.flatten_dict(variables['batch_stats'])
  new = flax.traverse_util.flatten_dict(flax.core.unfreeze(upd['batch_stats']))
  assert set(new) == set(old)
  for path in old:
    assert new[path].shape == old[path].shape
    diff = np.abs(np.asarray(new[path]) - np.asarray(old[path])).max()
    assert diff > 1e-4, path
  assert out_t['logits'].shape == out['logits'].shape
  assert rel_l2(out_t['logits'], out['logits']) > 1e-3  # batch statistics


def test_train_mode_drop_path_uses_dropout_rng(pvt_model, pvt_out, train_apply):
  model, variables, _ = pvt_model
  frames, audio, _ = pvt_out
  a1, _ = train_apply(variables, frames, audio, jax.random.key(1))
  a2, _ = train_apply(variables, frames, audio, jax.random.key(2))
  b1, _ = train_apply(variables, frames, audio, jax.random.key(1))
  np.testing.assert_array_equal(a1['logits'], b1['logits'])
  assert rel_l2(a2['logits'], a1['logits']) > 1e-3
  # Without a 'dropout' rng, train mode cannot run (eval mode needs none).
  with pytest.raises(Exception, match='dropout'):
    jax.eval_shape(
        lambda v: model.apply(
            v, frames, audio, train=True, mutable=['batch_stats']
        ),
        variables,
    )


def test_vv_and_va_average_one_shared_block():
  """tpavi_vv + tpavi_va: the stage's map is the mean of the same block
  (same parameters) applied without, then with audio. Run in train mode: the
  reference calls the module twice, so its BatchNorm running stats take two
  momentum updates (vv first, then va)."""
  model = build_model(
      model_config(
          tpavi_vv=True,
          tpavi_va=True,
          tpavi_mode='embedded',
          tpavi_stages=(1, 3),
      )
  )
  variables = random_variables(init_shapes(model), seed=3)
  params = variables['params']
  assert {k for k in params if k.startswith('tpavi')} == {
      'tpavi_b2',
      'tpavi_b4',
  }
  # One block per stage, built exactly as a single TPAVI.
  tp_shapes = jax.eval_shape(
      TPAVI('embedded').init,
      jax.random.key(0),
      jnp.zeros((1, 2, 4, 4, 32)),
      jnp.zeros((1, 2, 128)),
  )
  assert jax.tree.map(lambda s: s.shape, tp_shapes['params']) == jax.tree.map(
      lambda s: s.shape, params['tpavi_b2']
  )
  frames, audio = clip(1, 3, 64, 64, seed=4)
  out, upd = jit(
      lambda v, f, a: model.apply(
          v,
          f,
          a,
          train=True,
          rngs={'dropout': jax.random.key(5)},
          mutable=['batch_stats', 'intermediates'],
          capture_intermediates=lambda m, _: isinstance(m, ASPP),
      )
  )(variables, frames, audio)
  inter = upd['intermediates']
  assert out['audio_features'][0] is None and out['audio_features'][2] is None
  for i in range(4):
    aspp = inter[f'conv{i + 1}']['__call__'][0]
    aspp = aspp.reshape((1, 3) + aspp.shape[1:])
    if i in (1, 3):
      name = f'tpavi_b{i + 1}'
      block = functools.partial(
          TPAVI('embedded', train=True).apply, mutable=['batch_stats']
      )
      v0 = {
          'params': params[name],
          'batch_stats': variables['batch_stats'][name],
      }
      (z_vv, a_vv), s1 = jax.jit(block)(v0, aspp)
      (z_va, a_va), s2 = jax.jit(block)(dict(v0, **s1), aspp, audio)
      assert a_vv is None
      np.testing.assert_allclose(
          out['audio_features'][i], a_va, rtol=1e-5, atol=1e-5
      )
      assert rel_l2(z_vv, z_va) > 1e-2  # the two calls really differ
      expected = np.maximum((np.asarray(z_vv) + np.asarray(z_va)) / 2, 0)
      for stat in ('mean', 'var'):
        got = upd['batch_stats'][name]['W_z_1'][stat]
        np.testing.assert_allclose(
            got, s2['batch_stats']['W_z_1'][stat], rtol=1e-5, atol=1e-6
        )
        assert rel_l2(got, s1['batch_stats']['W_z_1'][stat]) > 1e-3
    else:
      expected = np.maximum(np.asarray(aspp), 0)
    np.testing.assert_allclose(
        out['visual_maps'][i], expected, rtol=1e-4, atol=1e-4
    )


def test_resnet50_feature_shapes():
  """ResNet-50 encoder: strides 4..32 (shape inference only)."""
  model = build_model(model_config(backbone='resnet50'))
  frames, audio = clip(2, 3, 64, 96)
  shapes = jax.eval_shape(model.init, jax.random.key(0), frames, audio)
  out = jax.eval_shape(model.apply, shapes, frames, audio)
  assert out['logits'].shape == (2, 3, 64, 96)
  for i, m in enumerate(out['visual_maps']):
    assert m.shape == (2, 3, 64 // (4 * 2**i), 96 // (4 * 2**i), 32)
  assert 'resnet' in shapes['params'] and 'resnet' in shapes['batch_stats']


def test_resnet_tiny_and_head_channels():
  """The demo's encoder: ResNet-50's layout, 1 block a stage, width 16."""
  model = build_model(model_config(backbone='resnet_tiny', head_channels=8))
  frames, audio = clip(2, 3, 64, 96)
  shapes = jax.eval_shape(model.init, jax.random.key(0), frames, audio)
  out = jax.eval_shape(model.apply, shapes, frames, audio)
  assert out['logits'].shape == (2, 3, 64, 96)
  res = shapes['params']['resnet']
  assert sorted(k for k in res if k.startswith('layer')) == [
      'layer1_0',
      'layer2_0',
      'layer3_1_0',
      'layer4_1_0',
  ]
  for i, name in enumerate(
      ['layer1_0', 'layer2_0', 'layer3_1_0', 'layer4_1_0']
  ):
    assert res[name]['conv3']['kernel'].shape[-1] == 64 * 2**i
  assert shapes['params']['output_conv_0']['kernel'].shape[-1] == 8
  assert shapes['params']['output_conv_2']['kernel'].shape[-2] == 8
  # The reference's head (128) by default.
  default = jax.eval_shape(
      build_model(model_config()).init, jax.random.key(0), frames, audio
  )
  assert default['params']['output_conv_0']['kernel'].shape[-1] == 128


def test_unknown_backbone_names_the_choices():
  with pytest.raises(ValueError, match='resnet_tiny'):
    init_shapes(build_model(model_config(backbone='resnet18')))


@pytest.mark.parametrize('h, w', [(48, 64), (64, 80), (100, 100)])
def test_size_not_multiple_of_32_raises(h, w):
  model = build_model(model_config())
  with pytest.raises(ValueError, match='multiple of 32'):
    init_shapes(model, h=h, w=w)


def test_tpavi_stages_without_vv_or_va_raises():
  model = build_model(model_config(tpavi_vv=False, tpavi_va=False))
  with pytest.raises(ValueError, match='tpavi_vv'):
    init_shapes(model)
  # No TPAVI stage: nothing to enable, builds without TPAVI blocks.
  model = build_model(
      model_config(tpavi_vv=False, tpavi_va=False, tpavi_stages=())
  )
  shapes = init_shapes(model, audio=False)
  assert not any(k.startswith('tpavi') for k in shapes['params'])


def test_va_without_audio_raises():
  model = build_model(model_config())
  with pytest.raises(ValueError, match='audio'):
    init_shapes(model, audio=False)


def test_unknown_backbone_raises():
  model = build_model(model_config(backbone='vit_b16'))
  with pytest.raises(ValueError, match='vit_b16'):
    init_shapes(model)


def assert_is_upsample_then_conv(fn, size, align_corners, seed):
  """`fn(x, k, b)` equals `conv3x3(upsample2x(x, align_corners)) + b` (zero
  padding 1) in float64, values and gradients to 1e-12."""
  rng = np.random.default_rng(seed)
  x, k, b = (
      rng.standard_normal((2, *size, 4)),
      rng.standard_normal((3, 3, 4, 3)),
      rng.standard_normal(3),
  )

  def two_steps(x, k, b):
    up = layers.upsample2x(x, align_corners=align_corners)
    dn = ('NHWC', 'HWIO', 'NHWC')
    y = jax.lax.conv_general_dilated(
        up, k, (1, 1), [(1, 1)] * 2, None, None, dn
    )
    return y + b

  def loss(fn):
    return lambda *a: jnp.sum(jnp.sin(fn(*a)) * jnp.arange(3.0))

  with jax.enable_x64(True):
    x, k, b = jnp.asarray(x), jnp.asarray(k), jnp.asarray(b)
    got, want = fn(x, k, b), two_steps(x, k, b)
    assert got.shape == (2, 2 * size[0], 2 * size[1], 3)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    g = jax.grad(loss(fn), (0, 1, 2))(x, k, b)
    w = jax.grad(loss(two_steps), (0, 1, 2))(x, k, b)
  for gi, wi in zip(g, w):
    np.testing.assert_allclose(gi, wi, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('size', [(1, 1), (1, 3), (2, 2), (3, 5), (8, 8)])
def test_upsample_then_conv_on_the_input_grid(size):
  """`upsample2x_conv3x3` (phases, shuffled) is `conv3x3(upsample2x(x))`."""
  phases = layers.upsample2x_conv3x3(
      np.zeros((2, *size, 4)), np.zeros((3, 3, 4, 3)), np.zeros(3)
  )
  assert phases.shape == (2, *size, 2, 2, 3)
  on_grid = lambda *a: layers.pixel_shuffle(layers.upsample2x_conv3x3(*a))
  assert_is_upsample_then_conv(on_grid, size, False, seed=1)


@pytest.mark.parametrize('align_corners', [True, False])
@pytest.mark.parametrize('size', [(1, 1), (1, 3), (2, 2), (3, 5), (8, 8)])
def test_upsample_then_conv_with_channels_mixed_first(size, align_corners):
  """`upsample2x_conv3x3_mixed_first` is `conv3x3(upsample2x(x))` (the
  border rows and columns, where the taps read padding, included)."""
  mixed_first = lambda x, k, b: layers.upsample2x_conv3x3_mixed_first(
      x, k, b, align_corners
  )
  assert_is_upsample_then_conv(mixed_first, size, align_corners, seed=2)


@pytest.mark.parametrize('align_corners', [False, True])
def test_upsample_conv_module_has_the_conv_parameters(align_corners):
  """Same parameter tree and initial values as `conv(32, 3, 1, 1)`."""
  x = jnp.zeros((1, 4, 4, 8))
  key = jax.random.key(3)
  new = layers.Upsample2xConv3x3(32, align_corners=align_corners).init(key, x)
  old = layers.conv(32, 3, 1, 1).init(key, x)
  assert jax.tree.structure(new) == jax.tree.structure(old)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
    np.testing.assert_array_equal(a, b)
