"""SAMA-AVS: parity with the reference PyTorch code, converter, trainable set.

Fixture: tests/data/golden_sama/sama_tiny_96.npz, made by
tests/reference/make_sama_golden.py (jinxiang-liu/anno-free-AVS's `SAM` on
CPU at 96 px: a 4-block ViT with windowed (zero-padded) and global blocks,
the full-size mask decoder; golden weights rebuilt here from each key and
converted as a real state dict would be). It also holds the key layouts of
SAM's released ViT-B checkpoint and of SAMA-AVS state dicts (ViT-B, ViT-H).
"""

import functools
import importlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from avs_jax import train
from avs_jax.projects.sama import convert
from avs_jax.projects.sama import losses
from avs_jax.projects.sama import model as sama
from avs_jax.projects.sama import train_mask
from configs import sama_s4
from golden_weights import rebuild_state_dict

GOLDEN = os.path.join(os.path.dirname(__file__), 'data', 'golden_sama')
FWD_TOL = 1e-4  # relative L2, forward arrays and losses (float32)
GRAD64_TOL = 1e-6  # relative L2, float64 gradients


def rel(ours, ref):
  ours = np.asarray(ours, np.float64).ravel()
  ref = np.asarray(ref, np.float64).ravel()
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@functools.lru_cache(maxsize=None)
def load():
  d = dict(np.load(os.path.join(GOLDEN, 'sama_tiny_96.npz')))
  cfg = json.loads(str(d['config']))
  em = cfg['encoder_mode']
  b, t, s = cfg['batch'], cfg['frames_per_clip'], em['img_size']
  d['mcfg'] = ml_collections.ConfigDict(
      dict(
          name='sama',
          encoder='custom',
          image_size=s,
          patch_size=em['patch_size'],
          window_size=em['window_size'],
          embed_dim=em['embed_dim'],
          depth=em['depth'],
          num_heads=em['num_heads'],
          global_attn=tuple(em['global_attn_indexes']),
          attention='einsum',
      )
  )
  # PyTorch [B*T, C, H, W] -> ours [B, T, H, W, C].
  d['x_frames'] = d['frames'].reshape(b, t, 3, s, s).transpose(0, 1, 3, 4, 2)
  d['x_audio'] = d['audio_embedding'].reshape(b, t, 128)
  d['x_masks'] = d['masks'].reshape(b, t, s, s)
  d['layouts'] = json.loads(str(d['layouts']))
  return d


def compile_fast(jitted, *args):
  """`jitted` compiled with LLVM at -O0, for the float64 gradient program:
  its compile took 40 s instead of 81 s (wall, once, on the shared 2-core
  VM under load); the same operations."""
  return jitted.lower(*args).compile({'xla_backend_optimization_level': 0})


def golden_variables(d):
  return convert.sama_to_flax(
      rebuild_state_dict(d['state_dict_shapes']), d['mcfg']
  )


@functools.lru_cache(maxsize=None)
def forward(attention, rows=0):
  """Our forward on the fixture; `rows`: `model.attention_rows` (the global
  blocks' 6 token rows in chunks of `rows`)."""
  d = load()
  cfg = ml_collections.ConfigDict(d['mcfg'].to_dict())
  cfg.attention, cfg.attention_rows = attention, rows
  out = jax.jit(sama.build_model(cfg).apply)(
      golden_variables(d), d['x_frames'], d['x_audio']
  )
  return jax.tree_util.tree_map(np.asarray, out)


def to_torch_layout(out):
  """Ours per frame -> the reference's [B*T, C, H, W]."""
  logits = out['logits'].reshape((-1, 1) + out['logits'].shape[2:])
  low = out['low_res_logits'].reshape((-1, 1) + out['low_res_logits'].shape[2:])
  emb = out['image_embedding']
  emb = emb.reshape((-1,) + emb.shape[2:]).transpose(0, 3, 1, 2)
  return dict(
      logits=logits,
      low_res_logits=low,
      image_embedding=emb,
      iou_pred=out['iou_pred'].reshape(-1, 1),
  )


@pytest.mark.parametrize(
    'attention,rows', [('einsum', 0), ('dot_product', 0), ('dot_product', 2)]
)
def test_forward_matches_reference(attention, rows):
  """Both attention paths; and the queries of the global blocks in chunks
  of 2 token rows (3 chunks), as the 1024 px recipes run them."""
  d = load()
  ours = to_torch_layout(forward(attention, rows))
  for k in ('image_embedding', 'low_res_logits', 'logits', 'iou_pred'):
    assert ours[k].shape == d[k].shape, k
    assert rel(ours[k], d[k]) < FWD_TOL, (k, rel(ours[k], d[k]))


def test_attention_paths_agree():
  """`jax.nn.dot_product_attention` and the plain einsum path."""
  a, b = forward('einsum'), forward('dot_product')
  assert rel(a['logits'], b['logits']) < 1e-5
  assert rel(a['image_embedding'], b['image_embedding']) < 1e-5


@pytest.mark.parametrize('loss', losses.LOSSES)
def test_losses_match_reference(loss):
  d = load()
  ref = d[f'loss_{loss}']
  # The loss alone, on the reference's logits.
  on_ref = losses.sama_loss(
      jnp.asarray(d['logits'][:, 0]), jnp.asarray(d['masks'][:, 0]), loss
  )
  np.testing.assert_allclose(on_ref, ref, rtol=1e-6)
  # Model and loss.
  ours = losses.sama_loss(
      jnp.asarray(forward('einsum')['logits']), jnp.asarray(d['x_masks']), loss
  )
  np.testing.assert_allclose(ours, ref, rtol=FWD_TOL)


def test_unknown_loss_is_named():
  with pytest.raises(ValueError, match='dice'):
    losses.sama_loss(jnp.zeros((1, 1, 4, 4)), jnp.zeros((1, 1, 4, 4)), 'dice')


def torch_layout(params, key):
  """Our leaf for the reference's `key`, in PyTorch layout, dtype kept (the
  converter's own renames and transposes)."""
  ours = convert._ours_key(key)  # pylint: disable=protected-access
  path, leaf = convert.tw._split_key(ours)  # pylint: disable=protected-access
  node = params
  for p in path:
    node = node[p]
  if leaf == 'weight':
    leaf = 'kernel' if 'kernel' in node else 'scale'
  x = convert.tw._flax_to_torch_leaf(np.asarray(node[leaf]), leaf)  # pylint: disable=protected-access
  return convert._to_reference(ours, x)[1]  # pylint: disable=protected-access


@pytest.fixture(scope='module')
def grads64():
  """Our loss and gradients in float64 (remat on: its recomputation is in
  the gradient; the global blocks' queries in chunks of 3 token rows, as the
  1024 px recipes: the chunks' recomputation too), the reference's
  trainable split."""
  d = load()
  with jax.enable_x64(True):
    cfg = ml_collections.ConfigDict(d['mcfg'].to_dict())
    cfg.attention_rows = 3
    model = sama.build_model(cfg, dtype=jnp.float64, remat=True)
    cast = lambda x: jnp.asarray(x, jnp.float64)
    params = jax.tree_util.tree_map(cast, golden_variables(d)['params'])

    def loss_fn(p):
      out = model.apply({'params': p}, cast(d['x_frames']), cast(d['x_audio']))
      return losses.sama_loss(out['logits'], cast(d['x_masks']), 'iou'), out

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, out), g = compile_fast(step, params)(params)
    loss, logits0 = float(loss), np.asarray(out['logits'][0, 0])
    g = jax.device_get(g)
  jax.clear_caches()
  return d, loss, logits0, g


def test_float64_loss_and_gradients_match_reference(grads64):
  d, loss, logits0, g = grads64
  assert logits0.dtype == np.float64
  np.testing.assert_allclose(loss, d['loss_iou64'], rtol=1e-10)
  assert rel(logits0, d['logits64_frame0'][0, 0]) < 1e-10
  keys = [k[len('grad64/') :] for k in d if k.startswith('grad64/')]
  assert len(keys) >= 15
  for k in keys:
    ours, ref = torch_layout(g, k), d['grad64/' + k]
    assert ours.shape == ref.shape, k
    if not np.any(ref):  # hypernetwork MLPs of the unused mask tokens
      assert not np.any(ours), k
      continue
    assert rel(ours, ref) < GRAD64_TOL, (k, rel(ours, ref))


def _trainable_keys(params):
  mask = train_mask.trainable_mask(params)
  as_float = jax.tree_util.tree_map(
      lambda m, p: np.full(p.shape, m, np.float32), mask, dict(params)
  )
  sd = convert.flax_to_torch({'params': as_float})
  return {k for k, v in sd.items() if np.all(v == 1)}, set(sd)


def test_trainable_mask_is_the_reference_set():
  """True exactly on the parameters the reference's AdamW updates: those
  with a gradient after its backward with `requires_grad` set as in
  `train_avs.py` (the VGGish and the unused IoU head have none)."""
  d = load()
  params = golden_variables(d)['params']
  trained, ours = _trainable_keys(params)
  has_grad = set(json.loads(str(d['has_grad'])))
  requires_grad = set(json.loads(str(d['requires_grad'])))
  assert trained == has_grad
  assert {
      k.split('.')[0] + '.' + k.split('.')[1] for k in requires_grad - has_grad
  } == {'audio_encoder.audio_backbone', 'mask_decoder.iou_prediction_head'}
  assert 'pe_layer.positional_encoding_gaussian_matrix' in ours - trained


def test_masked_optimizer_moves_only_trainable_leaves():
  d = load()
  params = golden_variables(d)['params']
  # The reference's AdamW + per-epoch cosine, as run.py builds it.
  tx, _ = train.make_optimizer(
      sama_s4.get_config().train, 800, model_name='sama', per_epoch=10
  )
  grads = jax.tree_util.tree_map(np.ones_like, params)
  step = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))
  updates, _ = step(grads, params)
  mask = train_mask.trainable_mask(params)
  moved = jax.tree_util.tree_map(lambda u: bool(np.any(u != 0)), updates)
  assert moved == mask
  lr0 = 2e-4  # first step: Adam's normalised step of lr, plus weight decay
  u = updates['no_mask_embed']['embedding']
  p = params['no_mask_embed']['embedding']
  np.testing.assert_allclose(u, -lr0 * (1 + 0.01 * p), rtol=1e-4)
  assert isinstance(tx, optax.GradientTransformation)


# ---------------------------------------------------------------------------
# Converters.


def _vit_b_config():
  return ml_collections.ConfigDict(dict(name='sama', encoder='vit_b'))


def test_sam_vit_b_checkpoint_full_layout():
  """SAM's released ViT-B key layout with golden weights: image encoder and
  mask decoder taken, `prompt_encoder.*` left out (as the reference's
  `strict=False` load), the new parts kept from the given params."""
  d = load()
  sd = rebuild_state_dict(d['layouts']['sam_vit_b'])
  cfg = _vit_b_config()
  shapes = convert.model_shapes(cfg)
  params = jax.tree_util.tree_map(
      lambda s: np.full(s.shape, 7.0, np.float32),
      convert.tw._unflatten(shapes)['params'],  # pylint: disable=protected-access
  )
  out = convert.sam_to_flax(sd, cfg, params)['params']
  enc, dec = out['image_encoder'], out['mask_decoder']
  np.testing.assert_array_equal(
      enc['patch_embed']['proj']['kernel'],
      sd['image_encoder.patch_embed.proj.weight'].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
      enc['blocks_11']['attn']['rel_pos_h'],
      sd['image_encoder.blocks.11.attn.rel_pos_h'],
  )
  np.testing.assert_array_equal(
      dec['output_upscaling_0']['kernel'],
      sd['mask_decoder.output_upscaling.0.weight'].transpose(2, 3, 0, 1),
  )
  np.testing.assert_array_equal(
      dec['mask_tokens']['embedding'], sd['mask_decoder.mask_tokens.weight']
  )
  for new in (
      enc['prompt_generator']['shared_mlp']['kernel'],
      out['no_mask_embed']['embedding'],
      out['pe_layer']['positional_encoding_gaussian_matrix'],
  ):
    assert np.all(new == 7.0)
  back = convert.flax_to_torch({'params': out})
  for k, v in sd.items():
    if not k.startswith('prompt_encoder.'):
      np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_sama_state_dict_round_trips():
  """The tiny reference's whole state dict (VGGish included) converts and
  comes back unchanged."""
  d = load()
  sd = rebuild_state_dict(d['state_dict_shapes_full'])
  variables = convert.sama_to_flax(sd, d['mcfg'])
  back = convert.flax_to_torch(variables, vggish=convert.vggish_variables(sd))
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.mark.parametrize('encoder', ['vit_b', 'vit_h'])
def test_sama_full_layout_has_the_model_shapes(encoder):
  """The reference's SAMA-AVS state dict layout (ViT-B; ViT-H as in its
  config) against our model, key by key, through the converter's mapping
  (shapes only: 2.5 GB of ViT-H weights otherwise)."""
  layout = load()['layouts'][f'sama_{encoder}']
  cfg = ml_collections.ConfigDict(dict(name='sama', encoder=encoder))
  ref = {
      k: tuple(s)
      for k, s in layout.items()
      if not k.startswith('audio_encoder.')
  }
  assert convert.expected_state_dict_shapes(cfg) == ref
  assert any(k.startswith('audio_encoder.audio_backbone.') for k in layout)


def _tiny_sd():
  return rebuild_state_dict(load()['state_dict_shapes'])


def test_conversion_errors_name_the_keys():
  cfg = load()['mcfg']
  sd = _tiny_sd()
  del sd['mask_decoder.iou_token.weight']
  sd['image_encoder.blocks.9.attn.proj.bias'] = np.zeros(64, np.float32)
  sd['image_encoder.blocks.1.attn.rel_pos_h'] = np.zeros((5, 16), np.float32)
  with pytest.raises(convert.ConversionError) as e:
    convert.sama_to_flax(sd, cfg)
  lines = {l.split(':')[0].strip(): l for l in str(e.value).splitlines()[1:]}
  assert 'mask_decoder.iou_token.weight' in lines['missing keys (2)']
  assert 'image_encoder.blocks.9.attn.proj.bias' in lines['unexpected keys (1)']
  assert (
      'image_encoder.blocks.1.attn.rel_pos_h: checkpoint (5, 16) -> (5, 16), '
      'model wants (11, 16)' in lines['shape mismatches']
  )


def test_conversion_refuses_the_other_kind():
  d = load()
  cfg = d['mcfg']
  with pytest.raises(convert.ConversionError, match='use sam_to_flax'):
    convert.sama_to_flax(
        {'prompt_encoder.no_mask_embed.weight': 0, **_tiny_sd()}, cfg
    )
  with pytest.raises(convert.ConversionError, match='use sama_to_flax'):
    convert.sam_to_flax(_tiny_sd(), cfg, {})


def test_module_prefix_and_unknown_encoder():
  d = load()
  sd = {'module.' + k: v for k, v in _tiny_sd().items()}
  variables = convert.sama_to_flax(sd, d['mcfg'])
  assert 'prompt_generator' in variables['params']['image_encoder']
  with pytest.raises(ValueError, match='vit_x'):
    sama.SAMA(encoder='vit_x').encoder_spec()


def test_bfloat16_keeps_float32_params_and_the_output():
  d = load()
  cfg = d['mcfg']
  model = sama.build_model(cfg, dtype=jnp.bfloat16)
  variables = golden_variables(d)
  out = jax.jit(model.apply)(variables, d['x_frames'], d['x_audio'])
  assert out['logits'].dtype == jnp.float32
  shapes = jax.eval_shape(
      model.init, jax.random.key(0), d['x_frames'], d['x_audio']
  )
  assert {x.dtype for x in jax.tree_util.tree_leaves(shapes)} == {
      jnp.dtype(jnp.float32)
  }
  assert rel(out['logits'], forward('einsum')['logits']) < 5e-2


@pytest.mark.parametrize(
    'name,arg,width,depth',
    [
        ('sama_s4', None, 768, 12),
        ('sama_s4', 'vit_h', 1280, 32),
        ('sama_ms3', 'vit_l', 1024, 24),
        ('synthetic_sama', None, 64, 4),
    ],
)
def test_configs_build_the_model(name, arg, width, depth):
  config = importlib.import_module(f'configs.{name}').get_config(arg)
  assert config.model.name == 'sama' and config.loss.loss in losses.LOSSES
  model = sama.build_model(config.model)
  spec = model.encoder_spec()
  assert (spec['embed_dim'], spec['depth']) == (width, depth)
  if name == 'synthetic_sama':  # small enough to build here
    s = config.model.image_size
    assert config.data.image_size == s
    shapes = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 2, s, s, 3), jnp.float32),
        jax.ShapeDtypeStruct((1, 2, 128), jnp.float32),
    )
    assert shapes['params']['no_mask_embed']['embedding'].shape == (1, 64)


def test_sam_checkpoint_errors_name_the_keys():
  """A SAM-layout checkpoint for the tiny model (its image encoder and mask
  decoder, SAM's own `prompt_encoder.*`) with one key missing, one
  unexpected and one mis-shaped."""
  d = load()
  sam_layout = d['layouts']['sam_vit_b']
  sd = {
      k: v
      for k, v in _tiny_sd().items()
      if k.startswith(('image_encoder.', 'mask_decoder.'))
      and not k.startswith('image_encoder.prompt_generator.')
  }
  sd.update(
      rebuild_state_dict(
          {
              k: s
              for k, s in sam_layout.items()
              if k.startswith('prompt_encoder.')
          }
      )
  )
  params = golden_variables(d)['params']
  assert convert.sam_to_flax(dict(sd), d['mcfg'], params)  # converts whole
  del sd['image_encoder.neck.2.weight']
  sd['mask_decoder.transformer.layers.2.norm1.bias'] = np.zeros(256, np.float32)
  sd['mask_decoder.output_upscaling.0.weight'] = np.zeros(
      (64, 256, 2, 2), np.float32
  )
  with pytest.raises(convert.ConversionError) as e:
    convert.sam_to_flax(sd, d['mcfg'], params)
  lines = {l.split(':')[0].strip(): l for l in str(e.value).splitlines()[1:]}
  assert 'image_encoder.neck.2.weight' in lines['missing keys (2)']
  assert (
      'mask_decoder.transformer.layers.2.norm1.bias'
      in lines['unexpected keys (1)']
  )
  assert (
      'mask_decoder.output_upscaling.0.weight: checkpoint (64, 256, 2, 2)'
      in lines['shape mismatches']
  )
