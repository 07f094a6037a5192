"""PyTorch <-> Flax checkpoint conversion: layouts, key sets, errors, files."""

import json
import os
import re
import struct

import jax
import ml_collections
import numpy as np
import pytest
import torch

from avs_jax import torch_weights
from avs_jax.torch_weights import ConversionError

GOLDEN = os.path.join(os.path.dirname(__file__), 'data', 'golden')
C = 32  # decoder channels of the small configs


def config(backbone, **overrides):
  cfg = ml_collections.ConfigDict(
      dict(
          backbone=backbone,
          channels=C,
          tpavi_stages=(0, 1, 2, 3),
          tpavi_mode='dot',
          tpavi_vv=False,
          tpavi_va=True,
      )
  )
  cfg.update(overrides)
  return cfg


def flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat):
  out = {}
  for path, v in flat.items():
    d = out
    for p in path[:-1]:
      d = d.setdefault(p, {})
    d[path[-1]] = v
  return out


def random_variables(shapes, seed=0):
  """Distinct random float32 values for every leaf (so that a swapped or
  mis-transposed leaf cannot go unnoticed), from a flat `{path: shape}`."""
  rng = np.random.default_rng(seed)
  return unflatten(
      {p: rng.random(s.shape, np.float32) - 0.5 for p, s in shapes.items()}
  )


def assert_equal(x, y, msg=''):
  x, y = np.asarray(x), np.asarray(y)
  assert x.shape == y.shape, msg
  if not np.array_equal(x, y):  # (fast path: assert_array_equal is slow)
    np.testing.assert_array_equal(x, y, err_msg=msg)


def assert_trees_equal(a, b):
  fa, fb = flatten(a), flatten(b)
  assert set(fa) == set(fb), set(fa) ^ set(fb)
  for path in fa:
    assert_equal(fa[path], fb[path], '/'.join(path))


@pytest.fixture(scope='module')
def resnet():
  cfg = config('resnet50')
  variables = random_variables(torch_weights.model_shapes(cfg), seed=1)
  return cfg, variables, torch_weights.flax_to_torch(variables, cfg)


@pytest.fixture(scope='module')
def pvt():
  cfg = config('pvt_v2_b0')
  variables = random_variables(torch_weights.model_shapes(cfg), seed=2)
  return cfg, variables, torch_weights.flax_to_torch(variables, cfg)


# --------------------------------------------------------------------------
# Round trips and PyTorch layouts.


@pytest.mark.parametrize('which', ['resnet', 'pvt'])
def test_round_trip(which, request):
  cfg, variables, sd = request.getfixturevalue(which)
  assert set(variables) == {'params', 'batch_stats'}
  assert_trees_equal(torch_weights.torch_to_flax(sd, cfg), variables)
  # ... also from torch tensors, as `torch.load` gives them.
  sd_t = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
  assert_trees_equal(torch_weights.torch_to_flax(sd_t, cfg), variables)


def test_resnet_torch_layout(resnet):
  _, v, sd = resnet
  p, s = v['params'], v['batch_stats']
  conv = lambda k: np.transpose(k, (3, 2, 0, 1))  # [kh,kw,I,O] -> OIhw
  expect = {
      'resnet.conv1.weight': conv(p['resnet']['conv1']['kernel']),
      'resnet.bn1.weight': p['resnet']['bn1']['scale'],
      'resnet.bn1.bias': p['resnet']['bn1']['bias'],
      'resnet.bn1.running_mean': s['resnet']['bn1']['mean'],
      'resnet.bn1.running_var': s['resnet']['bn1']['var'],
      'resnet.layer1.0.downsample.0.weight': conv(
          p['resnet']['layer1_0']['downsample_0']['kernel']
      ),
      'resnet.layer1.0.downsample.1.running_var': s['resnet']['layer1_0'][
          'downsample_1'
      ]['var'],
      'resnet.layer3_1.5.conv2.weight': conv(
          p['resnet']['layer3_1_5']['conv2']['kernel']
      ),
      'conv4.conv2d_list.3.weight': conv(p['conv4']['conv2d_list_3']['kernel']),
      'conv4.conv2d_list.3.bias': p['conv4']['conv2d_list_3']['bias'],
      'path1.resConfUnit1.conv1.weight': conv(
          p['path1']['resConfUnit1']['conv1']['kernel']
      ),
      'output_conv.4.weight': conv(p['output_conv_4']['kernel']),
  }
  shapes = {
      'resnet.conv1.weight': (64, 3, 7, 7),
      'resnet.bn1.weight': (64,),
      'resnet.layer1.0.downsample.0.weight': (256, 64, 1, 1),
      'resnet.layer3_1.5.conv2.weight': (256, 256, 3, 3),
      'resnet.layer4_1.0.conv1.weight': (512, 1024, 1, 1),
      'conv1.conv2d_list.0.weight': (C, 256, 3, 3),
      'conv2.conv2d_list.0.weight': (C, 512, 3, 3),
      'conv3.conv2d_list.0.weight': (C, 1024, 3, 3),
      'conv4.conv2d_list.3.weight': (C, 2048, 3, 3),
      'path4.resConfUnit1.conv1.weight': (C, C, 3, 3),
      'output_conv.0.weight': (128, C, 3, 3),
      'output_conv.2.weight': (32, 128, 3, 3),
      'output_conv.4.weight': (1, 32, 1, 1),
  }
  for k, want in expect.items():
    np.testing.assert_array_equal(sd[k], want, err_msg=k)
  for k, want in shapes.items():
    assert sd[k].shape == want, k
  # The unused second branch: a copy of the first, key for key.
  for src, dst in (
      ('resnet.layer3_1.', 'resnet.layer3_2.'),
      ('resnet.layer4_1.', 'resnet.layer4_2.'),
  ):
    first = {k[len(src) :] for k in sd if k.startswith(src)}
    second = {k[len(dst) :] for k in sd if k.startswith(dst)}
    assert first and first == second
    for k in first:
      np.testing.assert_array_equal(sd[dst + k], sd[src + k])
  # BatchNorm bookkeeping, as PyTorch writes it.
  nbt = [k for k in sd if k.endswith('num_batches_tracked')]
  assert 'resnet.bn1.num_batches_tracked' in nbt
  assert 'resnet.layer3_2.0.bn1.num_batches_tracked' in nbt
  assert 'tpavi_b1.W_z.1.num_batches_tracked' in nbt
  assert len(nbt) == len([k for k in sd if k.endswith('running_mean')])
  for k in nbt:
    assert sd[k].shape == () and sd[k].dtype == np.int64


def test_tpavi_torch_layout(pvt):
  _, v, sd = pvt
  p = v['params']['tpavi_b2']
  shapes = {
      'tpavi_b2.theta.weight': (C // 2, C, 1, 1, 1),
      'tpavi_b2.theta.bias': (C // 2,),
      'tpavi_b2.phi.weight': (C // 2, C, 1, 1, 1),
      'tpavi_b2.g.weight': (C // 2, C, 1, 1, 1),
      'tpavi_b2.W_z.0.weight': (C, C // 2, 1, 1, 1),
      'tpavi_b2.W_z.1.weight': (C,),
      'tpavi_b2.W_z.1.running_mean': (C,),
      'tpavi_b2.align_channel.weight': (C, 128),
      'tpavi_b2.align_channel.bias': (C,),
      'tpavi_b2.norm_layer.weight': (C,),
  }
  for k, want in shapes.items():
    assert sd[k].shape == want, k
  np.testing.assert_array_equal(
      sd['tpavi_b2.align_channel.weight'], p['align_channel']['kernel'].T
  )
  np.testing.assert_array_equal(
      sd['tpavi_b2.theta.weight'][:, :, 0, 0, 0],
      p['theta']['kernel'].reshape(C, C // 2).T,
  )
  np.testing.assert_array_equal(
      sd['tpavi_b2.W_z.1.running_var'],
      v['batch_stats']['tpavi_b2']['W_z_1']['var'],
  )
  assert {k.split('.', 1)[1] for k in sd if k.startswith('tpavi_b2.')} == {
      'theta.weight',
      'theta.bias',
      'phi.weight',
      'phi.bias',
      'g.weight',
      'g.bias',
      'W_z.0.weight',
      'W_z.0.bias',
      'W_z.1.weight',
      'W_z.1.bias',
      'W_z.1.running_mean',
      'W_z.1.running_var',
      'W_z.1.num_batches_tracked',
      'align_channel.weight',
      'align_channel.bias',
      'norm_layer.weight',
      'norm_layer.bias',
  }


def test_pvt_torch_layout(pvt):
  _, v, sd = pvt
  e = v['params']['encoder_backbone']
  shapes = {
      'encoder_backbone.patch_embed1.proj.weight': (32, 3, 7, 7),
      'encoder_backbone.patch_embed2.proj.weight': (64, 32, 3, 3),
      'encoder_backbone.patch_embed1.norm.weight': (32,),
      'encoder_backbone.block1.0.attn.q.weight': (32, 32),
      'encoder_backbone.block1.0.attn.kv.weight': (64, 32),
      'encoder_backbone.block1.0.attn.sr.weight': (32, 32, 8, 8),
      'encoder_backbone.block1.1.attn.norm.weight': (32,),
      'encoder_backbone.block1.0.mlp.fc1.weight': (256, 32),
      'encoder_backbone.block1.0.mlp.dwconv.dwconv.weight': (256, 1, 3, 3),
      'encoder_backbone.block4.1.mlp.fc2.weight': (256, 1024),
      'encoder_backbone.norm4.weight': (256,),
      'conv1.conv2d_list.0.weight': (C, 32, 3, 3),
      'conv4.conv2d_list.0.weight': (C, 256, 3, 3),
  }
  for k, want in shapes.items():
    assert sd[k].shape == want, k
  assert 'encoder_backbone.block4.0.attn.sr.weight' not in sd  # sr_ratio 1
  np.testing.assert_array_equal(
      sd['encoder_backbone.block1.0.attn.kv.weight'],
      e['block1_0']['attn']['kv']['kernel'].T,
  )
  np.testing.assert_array_equal(
      sd['encoder_backbone.block1.0.mlp.dwconv.dwconv.weight'],
      np.transpose(
          e['block1_0']['mlp']['dwconv']['dwconv']['kernel'], (3, 2, 0, 1)
      ),
  )
  np.testing.assert_array_equal(
      sd['encoder_backbone.norm4.weight'], e['norm4']['scale']
  )
  assert not any(k.startswith('resnet.') for k in sd)


@pytest.mark.parametrize('mode', ['concatenate', 'gaussian'])
def test_round_trip_other_tpavi_modes(mode):
  cfg = config('pvt_v2_b0', tpavi_mode=mode, tpavi_vv=True, tpavi_stages=(2, 3))
  variables = random_variables(torch_weights.model_shapes(cfg), seed=3)
  sd = torch_weights.flax_to_torch(variables, cfg)
  keys = {k.split('.', 1)[1] for k in sd if k.startswith('tpavi_b3.')}
  assert not any(k.startswith(('tpavi_b1.', 'tpavi_b2.')) for k in sd)
  if mode == 'concatenate':
    # The reference's W_f: nn.Conv2d(2 * C', 1, 1) then ReLU.
    assert sd['tpavi_b3.W_f.0.weight'].shape == (1, C, 1, 1)
    assert sd['tpavi_b3.W_f.0.bias'].shape == (1,)
    assert {'theta.weight', 'phi.weight'} <= keys
  else:  # gaussian: no theta / phi at all
    assert not any(k.startswith(('theta.', 'phi.', 'W_f.')) for k in keys)
  assert_trees_equal(torch_weights.torch_to_flax(sd, cfg), variables)


# --------------------------------------------------------------------------
# Our parameters are exactly the reference's (the golden fixtures' key list).


def golden_config(name):
  with np.load(os.path.join(GOLDEN, name)) as z:
    cfg = json.loads(z['config'].item())
    shapes = json.loads(z['state_dict_shapes'].item())
  return (
      config(
          cfg['backbone'],
          channels=cfg['channel'],
          tpavi_stages=tuple(cfg['tpavi_stages']),
          tpavi_mode=cfg['tpavi_mode'],
          tpavi_vv=cfg['tpavi_vv'],
          tpavi_va=cfg['tpavi_va'],
      ),
      shapes,
  )


def zero_view(shape, dtype=np.float32):
  """A read-only zero array of any size that takes no memory."""
  return np.broadcast_to(np.zeros((), dtype), tuple(shape))


@pytest.mark.parametrize(
    'name', ['avs_resnet50_224.npz', 'avs_pvt_v2_b5_224.npz']
)
def test_keys_and_shapes_equal_reference(name):
  cfg, golden = golden_config(name)
  shapes = torch_weights.model_shapes(cfg)  # no materialisation
  sd = torch_weights.flax_to_torch(
      unflatten({p: zero_view(s.shape) for p, s in shapes.items()}), cfg
  )
  ours = {k: tuple(v.shape) for k, v in sd.items()}
  if not any(k.endswith('num_batches_tracked') for k in golden):
    ours = {
        k: s for k, s in ours.items() if not k.endswith('num_batches_tracked')
    }
  golden = {k: tuple(s) for k, s in golden.items()}
  assert set(ours) - set(golden) == set()
  assert set(golden) - set(ours) == set()
  assert {k: s for k, s in ours.items() if golden[k] != s} == {}
  if cfg.backbone != 'resnet50':
    return  # (the golden parity tests convert the PVT-v2-b5 state dict)
  # ... and the converter takes exactly the reference's key set (dropping
  # the unused layer3_2 / layer4_2 branch).
  ref_sd = {k: zero_view(s) for k, s in golden.items()}
  flat = flatten(torch_weights.torch_to_flax(ref_sd, cfg))
  assert {p: np.shape(v) for p, v in flat.items()} == {
      p: s.shape for p, s in shapes.items()
  }


# --------------------------------------------------------------------------
# Prefixes, wrappers, errors.


def test_module_prefix(pvt):
  cfg, variables, sd = pvt
  prefixed = {'module.' + k: v for k, v in sd.items()}
  assert_trees_equal(torch_weights.torch_to_flax(prefixed, cfg), variables)


@pytest.mark.parametrize('wrapper', ['state_dict', 'model'])
def test_wrapped_state_dict_file(pvt, tmp_path, wrapper):
  cfg, variables, sd = pvt
  path = str(tmp_path / 'ckpt.pth')
  torch.save(
      {
          wrapper: {
              'module.' + k: torch.from_numpy(np.array(v))
              for k, v in sd.items()
          },
          'epoch': 3,
      },
      path,
  )
  loaded = torch_weights.load_state_dict(path)
  assert set(loaded) == {'module.' + k for k in sd}
  assert_trees_equal(torch_weights.torch_to_flax(loaded, cfg), variables)


def test_missing_key_raises(pvt):
  cfg, _, sd = pvt
  sd = dict(sd)
  del sd['tpavi_b3.theta.weight']
  del sd['encoder_backbone.block2.1.norm1.bias']
  with pytest.raises(ConversionError) as e:
    torch_weights.torch_to_flax(sd, cfg)
  assert 'tpavi_b3.theta.weight' in str(e.value)
  assert 'encoder_backbone.block2.1.norm1.bias' in str(e.value)
  assert 'missing' in str(e.value)


def test_missing_running_stat_raises(resnet):
  cfg, _, sd = resnet
  sd = dict(sd)
  del sd['resnet.layer2.3.bn2.running_var']
  with pytest.raises(
      ConversionError, match=re.escape('resnet.layer2.3.bn2.running_var')
  ):
    torch_weights.torch_to_flax(sd, cfg)


def test_unexpected_key_raises(pvt):
  cfg, _, sd = pvt
  sd = dict(sd, **{'tpavi_b1.extra.weight': np.zeros((3, 3), np.float32)})
  with pytest.raises(ConversionError, match='unexpected') as e:
    torch_weights.torch_to_flax(sd, cfg)
  assert 'tpavi_b1.extra.weight' in str(e.value)


def test_wrong_shape_raises(pvt):
  cfg, _, sd = pvt
  sd = dict(sd)
  sd['conv2.conv2d_list.1.weight'] = np.zeros((C, 63, 3, 3), np.float32)
  with pytest.raises(ConversionError) as e:
    torch_weights.torch_to_flax(sd, cfg)
  assert 'conv2.conv2d_list.1.weight' in str(e.value)


def test_wrong_backbone_raises(resnet, pvt):
  cfg_r, _, sd_r = resnet
  cfg_p, _, _ = pvt
  with pytest.raises(ConversionError):
    torch_weights.torch_to_flax(sd_r, cfg_p)


def test_unrecognised_checkpoint_raises():
  sd = {'backbone.stem.weight': np.zeros((4, 3, 3, 3), np.float32)}
  with pytest.raises(ConversionError, match='unrecognised') as e:
    torch_weights.torch_to_flax(sd, config('pvt_v2_b0'))
  assert 'backbone.stem.weight' in str(e.value)


# --------------------------------------------------------------------------
# ImageNet backbone checkpoints -> encoder subtree -> merged into a model.


def torchvision_resnet50(sd):
  out = {}
  for k, v in sd.items():
    if not k.startswith('resnet.') or k.startswith(
        ('resnet.layer3_2.', 'resnet.layer4_2.')
    ):
      continue
    k = k[len('resnet.') :]
    k = k.replace('layer3_1.', 'layer3.').replace('layer4_1.', 'layer4.')
    out[k] = torch.from_numpy(np.array(v))
  out['fc.weight'] = torch.randn(1000, 2048)
  out['fc.bias'] = torch.randn(1000)
  return out


def test_torchvision_resnet50(resnet):
  cfg, variables, sd = resnet
  tv = torchvision_resnet50(sd)
  # Sanity of the hand-built file: torchvision's key names.
  assert {
      'conv1.weight',
      'bn1.running_mean',
      'layer3.5.bn3.weight',
      'layer4.0.downsample.0.weight',
      'fc.bias',
  } <= set(tv)
  assert not any('_' in k.split('.')[0] for k in tv)
  enc = torch_weights.torch_to_flax(tv, cfg)
  assert {c: set(t) for c, t in enc.items()} == {
      'params': {'resnet'},
      'batch_stats': {'resnet'},
  }
  assert_trees_equal(
      enc,
      {
          c: {'resnet': variables[c]['resnet']}
          for c in ('params', 'batch_stats')
      },
  )
  base = random_variables(torch_weights.model_shapes(cfg), seed=7)
  merged = torch_weights.merge_variables(base, enc)
  fm, fb, fv = flatten(merged), flatten(base), flatten(variables)
  assert set(fm) == set(fb)
  for path in fm:
    want = fv[path] if path[1] == 'resnet' else fb[path]
    assert_equal(fm[path], want, '/'.join(path))


def test_pvt_v2_backbone(pvt):
  cfg, variables, sd = pvt
  pv = {
      k[len('encoder_backbone.') :]: v
      for k, v in sd.items()
      if k.startswith('encoder_backbone.')
  }
  pv['head.weight'] = np.ones((1000, 256), np.float32)
  pv['head.bias'] = np.ones((1000,), np.float32)
  enc = torch_weights.torch_to_flax(pv, cfg)
  assert set(enc) == {'params'}
  assert set(enc['params']) == {'encoder_backbone'}
  assert_trees_equal(
      enc['params']['encoder_backbone'], variables['params']['encoder_backbone']
  )
  base = random_variables(torch_weights.model_shapes(cfg), seed=8)
  merged = torch_weights.merge_variables(base, enc)
  fm, fb, fv = flatten(merged), flatten(base), flatten(variables)
  for path in fm:
    want = fv[path] if path[1] == 'encoder_backbone' else fb[path]
    assert_equal(fm[path], want, '/'.join(path))
  # A PVT checkpoint does not fit a ResNet model, nor a ResNet one a PVT.
  with pytest.raises(ConversionError):
    torch_weights.torch_to_flax(pv, config('resnet50'))


def test_merge_variables_checks(pvt):
  _, variables, _ = pvt
  with pytest.raises(ConversionError, match='not in the model'):
    torch_weights.merge_variables(
        variables, {'params': {'nope': {'kernel': np.zeros(1)}}}
    )
  bad = {'params': {'conv1': {'conv2d_list_0': {'bias': np.zeros(C + 1)}}}}
  with pytest.raises(ConversionError, match='conv2d_list_0'):
    torch_weights.merge_variables(variables, bad)


# --------------------------------------------------------------------------
# File formats.


_ST_DTYPES = {
    np.dtype(np.float32): 'F32',
    np.dtype(np.float16): 'F16',
    np.dtype(np.float64): 'F64',
    np.dtype(np.int64): 'I64',
    np.dtype(np.int32): 'I32',
    np.dtype(np.uint8): 'U8',
}


def write_safetensors(path, tensors, bf16=()):
  """The safetensors format, by hand: u64 LE header size, JSON header
  `{name: {dtype, shape, data_offsets}}` (offsets into the data block, which
  follows the header), raw little-endian data. `bf16` names are stored as
  bfloat16 (the upper half of their float32 bits)."""
  header, blobs, offset = {'__metadata__': {'format': 'pt'}}, [], 0
  for name, a in tensors.items():
    a = np.asarray(a)  # (np.ascontiguousarray would make scalars 1-D)
    if name in bf16:
      raw = (a.astype('<f4').view('<u4') >> 16).astype('<u2').tobytes()
      dtype = 'BF16'
    else:
      raw = a.astype(a.dtype.newbyteorder('<')).tobytes()
      dtype = _ST_DTYPES[a.dtype]
    header[name] = {
        'dtype': dtype,
        'shape': list(a.shape),
        'data_offsets': [offset, offset + len(raw)],
    }
    blobs.append(raw)
    offset += len(raw)
  h = json.dumps(header).encode()
  h += b' ' * (-len(h) % 8)
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(h)) + h + b''.join(blobs))


@pytest.fixture
def small_sd():
  rng = np.random.default_rng(5)
  return {
      'a.weight': rng.standard_normal((4, 3, 3, 3), np.float32),
      'a.bias': rng.standard_normal((4,), np.float32),
      'b.0.weight': rng.standard_normal((5, 7), np.float32),
      'bn.running_var': rng.random(6, np.float32) + 0.5,
      'bn.num_batches_tracked': np.array(17, np.int64),
      'half.weight': rng.standard_normal((2, 3)).astype(np.float16),
  }


def check_loaded(loaded, sd):
  assert set(loaded) == set(sd)
  for k, v in sd.items():
    assert loaded[k].shape == v.shape, k
    np.testing.assert_array_equal(loaded[k], v, err_msg=k)
  assert loaded['a.weight'].dtype == np.float32
  assert loaded['bn.num_batches_tracked'].dtype == np.int64


@pytest.mark.parametrize('ext', ['.pth', '.pt', '.tar'])
def test_load_torch_file(tmp_path, small_sd, ext):
  path = str(tmp_path / f'w{ext}')
  torch.save({k: torch.from_numpy(v) for k, v in small_sd.items()}, path)
  check_loaded(torch_weights.load_state_dict(path), small_sd)


def test_load_npz(tmp_path, small_sd):
  path = str(tmp_path / 'w.npz')
  np.savez(path, **small_sd)
  check_loaded(torch_weights.load_state_dict(path), small_sd)


def test_load_safetensors(tmp_path, small_sd):
  path = str(tmp_path / 'w.safetensors')
  write_safetensors(path, small_sd)
  check_loaded(torch_weights.load_state_dict(path), small_sd)


def test_load_safetensors_bf16(tmp_path, small_sd):
  """BF16 tensors (not the first in the data block) come back as float32."""
  bits = small_sd['b.0.weight'].view(np.uint32) & np.uint32(0xFFFF0000)
  as_bf16 = bits.view(np.float32)
  sd = dict(small_sd, **{'b.0.weight': as_bf16})
  path = str(tmp_path / 'w.safetensors')
  write_safetensors(path, sd, bf16=('b.0.weight',))
  loaded = torch_weights.load_state_dict(path)
  assert loaded['b.0.weight'].dtype == np.float32
  np.testing.assert_array_equal(loaded['b.0.weight'], as_bf16)
  check_loaded(loaded, sd)


def test_same_model_from_every_format(tmp_path, pvt):
  cfg, variables, sd = pvt
  paths = {
      ext: str(tmp_path / f'm{ext}') for ext in ('.pth', '.npz', '.safetensors')
  }
  torch.save(
      {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, paths['.pth']
  )
  np.savez(paths['.npz'], **sd)
  write_safetensors(paths['.safetensors'], sd)
  for ext, path in paths.items():
    loaded = torch_weights.load_state_dict(path)
    assert set(loaded) == set(sd), ext
    assert_trees_equal(torch_weights.torch_to_flax(loaded, cfg), variables)


def test_missing_file_raises(tmp_path):
  path = str(tmp_path / 'nope.pth')
  with pytest.raises(FileNotFoundError, match='nope.pth'):
    torch_weights.load_state_dict(path)


# --------------------------------------------------------------------------
# VGGish.


@pytest.fixture(scope='module')
def vggish():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from avs_jax.models import build_vggish  # pylint: disable=g-import-not-at-top

  shapes = jax.eval_shape(
      build_vggish(postprocess=True).init,
      jax.random.key(0),
      jnp.zeros((1, 96, 64)),
  )
  return random_variables(
      flatten(jax.tree.map(lambda s: s, dict(shapes))), seed=9
  )


def test_vggish_round_trip(vggish):
  assert set(vggish) == {'params', 'pca'}
  sd = torch_weights.vggish_flax_to_torch(vggish)
  assert sd['features.0.weight'].shape == (64, 1, 3, 3)
  assert sd['features.13.weight'].shape == (512, 512, 3, 3)
  assert sd['embeddings.0.weight'].shape == (4096, 12288)
  assert sd['embeddings.4.weight'].shape == (128, 4096)
  assert sd['pca_eigen_vectors'].shape == (128, 128)
  assert sd['pca_means'].shape == (128, 1)  # torchvggish's column vector
  np.testing.assert_array_equal(
      sd['embeddings.4.weight'], vggish['params']['embeddings_4']['kernel'].T
  )
  np.testing.assert_array_equal(
      sd['pca_eigen_vectors'], vggish['pca']['eigen_vectors']
  )
  # PCA inside the same dict (torchvggish's hub file) ...
  assert_trees_equal(torch_weights.vggish_torch_to_flax(sd), vggish)
  # ... or as a separate file with the Postprocessor's `pproc.` names.
  net = {k: v for k, v in sd.items() if not k.startswith('pca_')}
  pca = {'pproc.' + k: v for k, v in sd.items() if k.startswith('pca_')}
  assert_trees_equal(torch_weights.vggish_torch_to_flax(net, pca), vggish)
  assert_trees_equal(
      torch_weights.vggish_torch_to_flax(net), {'params': vggish['params']}
  )


def test_vggish_errors(vggish):
  sd = torch_weights.vggish_flax_to_torch({'params': vggish['params']})
  with pytest.raises(ConversionError, match='pca_means'):
    torch_weights.vggish_torch_to_flax(sd, {'pca_eigen_vectors': np.eye(128)})
  with pytest.raises(ConversionError, match='eigen_vectors'):
    torch_weights.vggish_torch_to_flax(
        sd, {'pca_eigen_vectors': np.eye(64), 'pca_means': np.zeros(128)}
    )
  del sd['features.3.bias']
  with pytest.raises(ConversionError, match=re.escape('features.3.bias')):
    torch_weights.vggish_torch_to_flax(sd)


def test_imagenet_backbone_initialises_avsegformer(resnet, tmp_path):
  """`train.init_backbone` with AVSegFormer: the torchvision file fills its
  `backbone` subtree (params and BatchNorm statistics) and nothing else."""
  from avs_jax import runtime  # pylint: disable=g-import-not-at-top
  from configs import avsegformer_s4  # pylint: disable=g-import-not-at-top

  _, variables, sd = resnet
  path = str(tmp_path / 'resnet50-imagenet.pth')
  torch.save(torchvision_resnet50(sd), path)
  c = avsegformer_s4.get_config('resnet50')
  c.model.update(query_num=4, num_layers=1, generator_layers=1)
  c.data.image_size = 64
  model, _ = runtime.build(c)
  base = jax.device_get(runtime.init_variables(c, model))
  c.train.init_backbone = path
  got = flatten(runtime.pretrained(c, base))
  fb, fv = flatten(base), flatten(variables)
  assert set(got) == set(fb)
  n = 0
  for path_, x in got.items():
    if path_[1] == 'backbone':
      n += 1
      assert_equal(x, fv[(path_[0], 'resnet') + path_[2:]], '/'.join(path_))
    else:
      assert_equal(x, fb[path_], '/'.join(path_))
  assert n == sum(p[1] == 'resnet' for p in fv) == 265  # 53 convs, 53 BNs
  with pytest.raises(ConversionError, match='does not fit'):
    torch_weights.backbone_variables(torchvision_resnet50(sd), 'pvt_v2_b0')
