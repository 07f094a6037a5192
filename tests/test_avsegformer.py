"""AVSegFormer: parity with the reference PyTorch code, converter, configs.

Fixtures: tests/data/golden_avsegformer, made by
tests/reference/make_avsegformer_golden.py (reference vvvb-github/AVSegFormer
on CPU, deformable attention through its pure-PyTorch path, golden weights
rebuilt here from each key and converted as a real checkpoint would be).
"""

import functools
import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import procs

from avs_jax.projects.avsegformer import convert as ac
from avs_jax.projects.avsegformer import losses as al
from avs_jax.projects.avsegformer import model as avsegformer
from avs_jax.projects.avsegformer.deform_attn import ms_deform_attn_core
from golden_weights import rebuild_state_dict

GOLDEN = os.path.join(os.path.dirname(__file__), 'data', 'golden_avsegformer')
FWD_TOL = 1e-4  # relative L2, forward arrays
SCALAR_TOL = 1e-4  # relative, losses
GRAD_TOL = 1e-3  # relative L2, gradients


def rel(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def model_config(cfg, **kw):
  return ml_collections.ConfigDict(
      dict(
          name='avsegformer',
          backbone=cfg['backbone'],
          num_classes=cfg['num_classes'],
          **kw,
      )
  )


@functools.lru_cache(maxsize=None)
def load(name):
  d = dict(np.load(os.path.join(GOLDEN, name)))
  cfg = json.loads(str(d['config']))
  b, t, h, w = cfg['batch'], cfg['frames_per_clip'], cfg['height'], cfg['width']
  d['cfg'] = cfg
  d['mcfg'] = model_config(cfg, dropout=cfg.get('dropout', 0.1))
  # PyTorch [B*T, C, H, W] -> ours [B, T, H, W, C].
  d['x_frames'] = d['frames'].reshape(b, t, 3, h, w).transpose(0, 1, 3, 4, 2)
  d['x_audio'] = d['audio_embedding'].reshape(b, t, 128)
  d['x_masks'] = d['masks'].reshape(b, t, h, w)
  if 'vid_temporal_mask_flag' in d:
    d['x_frame_mask'] = d['vid_temporal_mask_flag'].reshape(b, t)
    d['x_labelled'] = d['gt_temporal_mask_flag'].reshape(b, t)
  return d


def golden_variables(d):
  """The fixture's weights, rebuilt and converted (not cached: memory)."""
  return ac.torch_to_flax(rebuild_state_dict(d['state_dict_shapes']), d['mcfg'])


def logits_to_torch(logits):
  """[B, T, H, W(, K)] -> [B*T, K, H, W]."""
  x = np.asarray(logits)
  x = x.reshape((-1,) + x.shape[2:])
  return x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)


# ---------------------------------------------------------------------------
# Deformable attention.


def test_deform_attn_core_matches_reference():
  d = np.load(os.path.join(GOLDEN, 'deform_attn_core.npz'))
  shapes = tuple(map(tuple, d['spatial_shapes'].tolist()))
  out = jax.jit(ms_deform_attn_core, static_argnums=1)(
      d['value'], shapes, d['sampling_locations'], d['attention_weights']
  )
  assert out.shape == d['output'].shape
  assert rel(out, d['output']) < 1e-6


def test_deform_attn_core_grid_sample_semantics():
  """Pixel centres read the pixel; halfway averages; outside reads zeros."""
  h, w = 3, 4
  value = np.arange(h * w, dtype=np.float32).reshape(1, h * w, 1, 1) + 1
  # (x, y) in [0, 1]: centre of pixel (row 1, col 2); halfway between
  # columns 0 and 1 of row 0; beyond the right edge; half a pixel left of
  # the first column (bilinear against the zero padding).
  pts = np.asarray(
      [
          [(2.5 / w, 1.5 / h)],
          [(1.0 / w, 0.5 / h)],
          [(1.2, 0.5)],
          [(0.0, 0.5 / h)],
      ],
      np.float32,
  )
  loc = pts.reshape(1, 4, 1, 1, 1, 2)
  out = ms_deform_attn_core(
      value, ((h, w),), loc, np.ones((1, 4, 1, 1, 1), np.float32)
  )
  np.testing.assert_allclose(
      np.asarray(out)[0, :, 0], [7.0, 1.5, 0.0, 0.5], atol=1e-6
  )


# ---------------------------------------------------------------------------
# Eval forward, intermediates and losses.

EVAL = [
    'avsegformer_resnet50_s4_64.npz',
    'avsegformer_resnet50_ms3_96.npz',
    'avsegformer_resnet50_avss_32.npz',
    'avsegformer_pvt_v2_b5_ms3_64.npz',
]


@functools.lru_cache(maxsize=None)
def eval_outputs(name):
  d = load(name)
  model = avsegformer.build_model(d['mcfg'])
  out = jax.jit(lambda v, f, a, m: model.apply(v, f, a, frame_mask=m))(
      golden_variables(d), d['x_frames'], d['x_audio'], d.get('x_frame_mask')
  )
  return d, jax.tree_util.tree_map(np.asarray, out)


@pytest.mark.parametrize('name', EVAL)
def test_eval_forward(name):
  d, out = eval_outputs(name)
  b, t = d['x_audio'].shape[:2]
  assert out['logits'].shape[:4] == (b, t) + d['x_frames'].shape[2:4]
  logits = logits_to_torch(out['logits'])
  if 'logits_frames' in d:
    logits = logits[d['logits_frames']]
  assert rel(logits, d['logits']) < FWD_TOL
  # Intermediates of the first frame (PyTorch layout in the fixture).
  assert (
      rel(out['mask_feature'][0, 0].transpose(2, 0, 1), d['mask_feature'][0])
      < FWD_TOL
  )
  for k in ('query', 'memory', 'decoder_out'):
    assert rel(out[k][0, 0], d[k][0]) < FWD_TOL, k


@pytest.mark.parametrize(
    'name',
    ['avsegformer_resnet50_s4_64.npz', 'avsegformer_resnet50_ms3_96.npz'],
)
@pytest.mark.parametrize('setting', ['s4', 'ms3'])
@pytest.mark.parametrize('loss_type', ['dice', 'bce'])
def test_losses(name, setting, loss_type):
  d, out = eval_outputs(name)
  w = d['cfg']['loss']['weight_dict']
  total, aux = al.avsegformer_loss(
      out,
      d['x_masks'],
      setting=setting,
      loss_type=loss_type,
      iou_weight=w['iou_loss'],
      mix_weight=w['mix_loss'],
  )
  key = f'loss_{setting}_{loss_type}'
  np.testing.assert_allclose(
      w['iou_loss'] * aux['iou'], d[key + '_iou'], rtol=SCALAR_TOL
  )
  np.testing.assert_allclose(
      w['mix_loss'] * aux['mix'], d[key + '_mix'], rtol=SCALAR_TOL
  )
  np.testing.assert_allclose(total, d[key + '_total'], rtol=SCALAR_TOL)


def test_avss_frame_mask_and_loss():
  name = 'avsegformer_resnet50_avss_32.npz'
  d, out = eval_outputs(name)
  padded = d['x_frame_mask'] == 0
  assert padded.any()
  assert not np.any(out['logits'][padded]) and not np.any(
      out['mask_feature'][padded]
  )
  w = d['cfg']['loss']['weight_dict']
  total, aux = al.avsegformer_loss(
      out,
      d['x_masks'],
      setting='avss',
      labelled=d['x_labelled'],
      iou_weight=w['iou_loss'],
      mix_weight=w['mix_loss'],
  )
  np.testing.assert_allclose(
      w['iou_loss'] * aux['iou'], d['loss_avss_iou'], rtol=SCALAR_TOL
  )
  np.testing.assert_allclose(
      w['mix_loss'] * aux['mix'], d['loss_avss_mix'], rtol=SCALAR_TOL
  )
  np.testing.assert_allclose(total, d['loss_avss_total'], rtol=SCALAR_TOL)
  with pytest.raises(ValueError, match='labelled'):
    al.avsegformer_loss(out, d['x_masks'], setting='avss')


# ---------------------------------------------------------------------------
# A training-mode step (BatchNorm on batch statistics, dropout 0).


def _train_grads(d, dtype):
  """Loss, aux, logits, gradients (PyTorch layout), updated stats."""
  model = avsegformer.build_model(d['mcfg'], dtype=dtype)
  cast = lambda x: jnp.asarray(x, dtype)
  variables = jax.tree_util.tree_map(cast, golden_variables(d))
  w = d['cfg']['loss']['weight_dict']

  def loss_fn(params):
    out, new_state = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']},
        cast(d['x_frames']),
        cast(d['x_audio']),
        train=True,
        mutable=['batch_stats'],
        rngs={'dropout': jax.random.key(0)},
    )
    loss, aux = al.avsegformer_loss(
        out,
        cast(d['x_masks']),
        setting=d['cfg']['setting'],
        loss_type='dice',
        iou_weight=w['iou_loss'],
        mix_weight=w['mix_loss'],
    )
    return loss, (aux, out['logits'], new_state)

  (loss, (aux, logits, state)), grads = jax.jit(
      jax.value_and_grad(loss_fn, has_aux=True)
  )(variables['params'])
  to_torch = lambda v: {
      ac._to_reference(k): x
      for k, x in ac.tw.variables_to_torch(  # pylint: disable=protected-access
          v
      ).items()
  }
  return (loss, aux, logits, to_torch({'params': grads}), to_torch(state))


@pytest.fixture(scope='module')
def train_results():
  """Our training-mode step in float64 (one compilation for every check)."""
  d = load('avsegformer_resnet50_train_ms3_64.npz')
  assert d['cfg']['mode'] == 'train' and d['cfg']['dropout'] == 0.0
  with jax.enable_x64(True):
    loss, aux, logits, grads, stats = _train_grads(d, jnp.float64)
  jax.clear_caches()
  grads = {k: grads[k] for k in grads if 'grad/' + k in d}  # memory
  return d, (loss, aux, logits, grads, stats)


def test_train_forward_loss_and_batch_stats(train_results):
  """Against the reference's float32 run (forward values are well
  conditioned: float32 rounding is far below the 1e-4 bound)."""
  d, (loss, aux, logits, _, stats) = train_results
  w = d['cfg']['loss']['weight_dict']
  assert rel(logits_to_torch(logits), d['logits']) < FWD_TOL
  np.testing.assert_allclose(
      w['iou_loss'] * aux['iou'], d['loss_iou'], rtol=SCALAR_TOL
  )
  np.testing.assert_allclose(
      w['mix_loss'] * aux['mix'], d['loss_mix'], rtol=SCALAR_TOL
  )
  np.testing.assert_allclose(loss, d['loss_total'], rtol=SCALAR_TOL)
  np.testing.assert_allclose(loss, d['loss_total64'], rtol=1e-9)
  keys = [k for k in d if k.startswith('updated/')]
  assert len(keys) > 100
  for k in keys:  # PyTorch momentum 0.1, unbiased running variance.
    key = k[len('updated/') :]
    if key.startswith(('backbone.layer3_2.', 'backbone.layer4_2.')):
      continue  # the unused branch: never run, not in our model
    assert rel(stats[key], d[k]) < FWD_TOL, k


def test_train_gradients(train_results):
  """Gradients of the MS3 loss (dice + 0.1 mix) in training mode.

  Deep gradients here are ill-conditioned in float32 (sums of large terms
  that nearly cancel): the reference's float32 gradients differ from its
  float64 ones by up to ~5% (ours alike). So the semantics are checked in
  float64 against the reference run in float64, where nothing but rounding
  differs (bound 1e-6), and the reference's float32 gradients against ours
  within GRAD_TOL or twice their own float32 error, whichever is larger.
  """
  d, (_, _, _, g64, _) = train_results
  keys = [k[len('grad/') :] for k in d if k.startswith('grad/')]
  assert len(keys) >= 20
  for k in keys:
    err = rel(g64[k], d['grad64/' + k])
    assert err < 1e-6, (k, err)
    noise = rel(d['grad/' + k], d['grad64/' + k])
    assert rel(d['grad/' + k], g64[k]) < max(GRAD_TOL, 2 * noise), k
  # Near the output float32 is accurate: there the plain bound holds.
  for k in ('head.fc.4.weight', 'head.fc.0.bias', 'head.mlp.layers.2.bias'):
    assert rel(d['grad/' + k], g64[k]) < GRAD_TOL, k


# ---------------------------------------------------------------------------
# Converter.


def _full_reference_state_dict(name):
  d = load(name)
  full = json.loads(str(d['state_dict_shapes_full']))
  sd = rebuild_state_dict(full)
  for k in full:
    if k.endswith('num_batches_tracked'):
      sd[k] = np.zeros((), np.int64)
  return sd


@pytest.mark.parametrize(
    'name',
    [
        'avsegformer_resnet50_s4_64.npz',
        'avsegformer_pvt_v2_b5_ms3_64.npz',
        'avsegformer_resnet50_avss_32.npz',
    ],
)
def test_converter_round_trip(name):
  """Released layout (DataParallel prefix, VGGish, ResNet's second branch)
  -> Flax -> the same keys and values (the unused branch as a copy)."""
  sd = _full_reference_state_dict(name)
  mcfg = load(name)['mcfg']
  released = {'module.' + k: v for k, v in sd.items()}
  variables = ac.torch_to_flax(released, mcfg)
  vggish = ac.vggish_variables(released)
  assert vggish is not None
  back = ac.flax_to_torch(variables, mcfg, vggish=vggish)
  assert set(back) == set(sd)
  for k, v in sd.items():
    if k.endswith('num_batches_tracked'):
      continue
    src = k
    for dst_src, dst in (
        ('backbone.layer3_1.', 'backbone.layer3_2.'),
        ('backbone.layer4_1.', 'backbone.layer4_2.'),
    ):
      if k.startswith(dst):
        src = dst_src + k[len(dst) :]
    np.testing.assert_array_equal(back[k], sd[src], err_msg=k)
  # And the round trip is the identity on our side.
  again = ac.torch_to_flax(back, mcfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, variables)


def test_converter_errors():
  d = load('avsegformer_resnet50_s4_64.npz')
  sd, mcfg = rebuild_state_dict(d['state_dict_shapes']), d['mcfg']
  missing = dict(sd)
  del missing['head.transformer.encoder.layers.2.self_attn.value_proj.weight']
  with pytest.raises(
      ac.ConversionError,
      match=r'missing keys \(1\): head\.transformer\.encoder'
      r'\.layers\.2\.self_attn\.value_proj\.weight',
  ):
    ac.torch_to_flax(missing, mcfg)
  extra = dict(sd, **{'head.extra.weight': np.zeros((2, 2), np.float32)})
  with pytest.raises(
      ac.ConversionError,
      match=r'unexpected keys \(1\): ' r'head\.extra\.weight',
  ):
    ac.torch_to_flax(extra, mcfg)
  bad = dict(sd, **{'head.level_embed': np.zeros((4, 256), np.float32)})
  with pytest.raises(ac.ConversionError, match='head.level_embed'):
    ac.torch_to_flax(bad, mcfg)
  with pytest.raises(ac.ConversionError, match='AVS/TPAVI checkpoint'):
    ac.torch_to_flax({'resnet.conv1.weight': np.zeros(1)}, mcfg)
  with pytest.raises(ac.ConversionError, match="asks for 'pvt_v2_b5'"):
    ac.torch_to_flax(
        sd, model_config(dict(backbone='pvt_v2_b5', num_classes=1))
    )


# ---------------------------------------------------------------------------
# Configs.


@pytest.mark.parametrize(
    'setting, default, classes',
    [('s4', 'resnet50', 1), ('ms3', 'resnet50', 1), ('avss', 'pvt_v2_b5', 71)],
)
def test_configs(setting, default, classes):
  mod = importlib.import_module(f'configs.avsegformer_{setting}')
  c = mod.get_config()
  assert c.model.name == 'avsegformer' and c.model.backbone == default
  other = 'resnet50' if default != 'resnet50' else 'pvt_v2_b5'
  assert mod.get_config(other).model.backbone == other
  assert c.data.setting == setting and c.loss.kind == 'avsegformer'
  assert c.train.lr == 2e-5 and c.train.weight_decay == 0.01
  model = avsegformer.build_model(c.model)
  assert model.num_classes == classes and model.query_num == 300
  assert model.mlp_dim == 2048 and model.dropout == 0.1


def convert_cli(*args):
  """`python -m avs_jax.convert ARGS` -> (exit status, stderr)."""
  p = subprocess.run(
      [sys.executable, '-m', 'avs_jax.convert', *args],
      cwd=procs.REPO,
      env=procs.env(os.environ.get('JAX_COMPILATION_CACHE_DIR', '')),
      capture_output=True,
      text=True,
      timeout=600,
  )
  return p.returncode, p.stderr


def test_command_line_round_trip(tmp_path):
  """`python -m avs_jax.convert` both ways, VGGish carried over."""
  sd = _full_reference_state_dict('avsegformer_resnet50_s4_64.npz')
  src = tmp_path / 'released.npz'
  np.savez(src, **{'module.' + k: v for k, v in sd.items()})
  config = '--config=configs/avsegformer_s4.py:resnet50'
  out = tmp_path / 'ckpt'
  rc, err = convert_cli(f'--src={src}', config, f'--out={out}')
  assert rc == 0, err
  back = tmp_path / 'back.npz'
  rc, err = convert_cli(
      '--to_torch', f'--src={out}', config, f'--out={back}', f'--vggish={src}'
  )
  assert rc == 0, err
  with np.load(back) as z:
    assert set(z.files) == set(sd)
    for k in (
        'head.in_proj.2.0.weight',
        'vggish.embeddings.4.weight',
        'head.learnable_query.weight',
        'audio_proj.bias',
    ):
      np.testing.assert_array_equal(z[k], sd[k])
  # A wrong backbone is one clear error line, exit status 1.
  rc, err = convert_cli(
      f'--src={src}',
      '--config=configs/avsegformer_s4.py:pvt_v2_b5',
      f'--out={tmp_path / "x"}',
  )
  assert rc == 1
  assert "asks for 'pvt_v2_b5'" in err and err.count('\n') == 1, err


def test_tiny_model_learns_from_audio():
  """A tiny AVSegFormer learns masks that only the audio tells apart.

  Frames are noise; the audio says whether the sounding object is the left
  or the right half. After training on the dice + mix loss the masks must
  follow the audio (and swapping the audio must swap them).
  """
  import optax  # pylint: disable=g-import-not-at-top

  cfg = ml_collections.ConfigDict(
      dict(
          name='avsegformer',
          backbone='resnet_tiny',
          num_classes=1,
          query_num=8,
          embed_dim=32,
          num_layers=1,
          generator_layers=1,
          ffn_dim=64,
          mlp_dim=32,
          dropout=0.0,
      )
  )
  model = avsegformer.build_model(cfg)
  rng = np.random.default_rng(0)
  n, size = 8, 32
  side = np.arange(n) % 2
  # One frame for every clip: only the audio tells the clips apart.
  frames = np.repeat(
      rng.standard_normal((1, 1, size, size, 3)).astype(np.float32), n, 0
  )
  audio = rng.standard_normal((n, 1, 128)).astype(np.float32) * 0.1
  audio[:, 0, :64] += (side == 0)[:, None]
  audio[:, 0, 64:] += (side == 1)[:, None]
  masks = np.zeros((n, 1, size, size), np.float32)
  for i in range(n):
    masks[i, 0, :, side[i] * size // 2 : (side[i] + 1) * size // 2] = 1
  variables = jax.jit(model.init)(jax.random.key(0), frames, audio)
  opt = optax.adam(3e-3)

  def forward(params, stats, audio):
    return model.apply(
        {'params': params, 'batch_stats': stats},
        frames,
        audio,
        train=True,
        mutable=['batch_stats'],
    )

  def loss_fn(params, stats):
    out, new = forward(params, stats, audio)
    loss, _ = al.avsegformer_loss(out, masks, setting='ms3')
    return loss, new['batch_stats']

  @jax.jit
  def step(params, stats, opt_state):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, stats
    )
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  params, stats = variables['params'], variables['batch_stats']
  opt_state = opt.init(params)
  losses = []
  for _ in range(40):
    params, stats, opt_state, loss = step(params, stats, opt_state)
    losses.append(loss)
  losses = [float(l) for l in losses]
  assert losses[-1] < 0.5 * losses[0], losses

  def iou(audio):
    pred = np.asarray(forward(params, stats, audio)[0]['logits']) > 0
    inter = np.logical_and(pred, masks > 0).sum()
    return inter / np.logical_or(pred, masks > 0).sum()

  assert iou(audio) > 0.8
  swapped = audio[np.arange(n) ^ 1]  # each clip gets the other side's audio
  assert iou(swapped) < 0.3
