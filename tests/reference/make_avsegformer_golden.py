"""Golden fixtures of AVSegFormer from its reference PyTorch code, on CPU.

Reference: repository vvvb-github/AVSegFormer (`model/`, `ops/`, `config/`,
`scripts/{s4,ms3,avss}/loss.py`), extracted to $AVSEGFORMER_REF (default
/work/ref/AVSegFormer). Run with a Python that has torch (2.13 CPU was used):

  python tests/reference/make_avsegformer_golden.py [OUT_DIR]

(default OUT_DIR: tests/data/golden_avsegformer). Weights are the fixture
recipe of tests/data/golden/README.md (each tensor from crc32 of its key; no
weights are stored, `state_dict_shapes` lists them), float32, PyTorch layout.

What is stubbed, and why it does not change the computation:
  * `MultiScaleDeformableAttention` (the compiled CUDA op): its functions
    raise, so `MSDeformAttn.forward` takes its own CPU fallback, the pure
    PyTorch `ms_deform_attn_core_pytorch` (grid_sample, bilinear,
    align_corners=False, zero padding). That is the path we match.
  * timm (`DropPath`, `to_2tuple`, `trunc_normal_`, `register_model`,
    `_cfg`) for the PVT-v2 backbone: initialisers and registry only, plus
    DropPath, which is the identity in eval mode; the training fixture uses
    ResNet-50 (no DropPath), and the stub raises if DropPath is ever active.
  * torchvision (`models.resnet50`): only used to load ImageNet weights,
    which we do not load.
  * VGGish: replaced by the identity after its keys are recorded; the inputs
    are audio embeddings [B*T, 128] (what VGGish outputs), as in the AVS
    fixtures. The full key list with `vggish.*` is in
    `state_dict_shapes_full` (the released checkpoints' layout).
  * resampy, soundfile: imported by VGGish's wav reader, which never runs.
  * `Tensor.cuda` is the identity (the losses call `.cuda()` on indices).

Dropout: the eval fixtures are in eval mode (dropout off). The training
fixture builds the transformer with `dropout=0.0` (a config field of the
reference) so that its batch statistics and gradients are deterministic.
"""

import json
import math
import os
import sys
import types
import zlib

import numpy as np
import torch
from torch import nn

REF = os.environ.get('AVSEGFORMER_REF', '/work/ref/AVSegFormer')
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = (
    sys.argv[1]
    if len(sys.argv) > 1
    else os.path.join(HERE, '..', 'data', 'golden_avsegformer')
)


# ---------------------------------------------------------------------------
# Stubs (see the module docstring).


class _DropPath(nn.Module):

  def __init__(self, drop_prob=0.0):
    super().__init__()
    self.drop_prob = drop_prob

  def forward(self, x):
    if self.training and self.drop_prob > 0:
      raise RuntimeError('stub DropPath is not meant to be active')
    return x


def _install_stubs():
  timm = types.ModuleType('timm')
  models = types.ModuleType('timm.models')
  layers = types.ModuleType('timm.models.layers')
  layers.DropPath = _DropPath
  layers.to_2tuple = (
      lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
  )
  layers.trunc_normal_ = lambda t, std=1.0: nn.init.normal_(t, std=std)
  registry = types.ModuleType('timm.models.registry')
  registry.register_model = lambda f: f
  vit = types.ModuleType('timm.models.vision_transformer')
  vit._cfg = lambda **kw: dict(kw)  # pylint: disable=protected-access
  for name, mod in [
      ('timm', timm),
      ('timm.models', models),
      ('timm.models.layers', layers),
      ('timm.models.registry', registry),
      ('timm.models.vision_transformer', vit),
  ]:
    sys.modules[name] = mod
  tv = types.ModuleType('torchvision')
  tv.models = types.ModuleType('torchvision.models')
  sys.modules['torchvision'] = tv
  sys.modules['torchvision.models'] = tv.models

  msda = types.ModuleType('MultiScaleDeformableAttention')

  def _no_cuda(*args, **kwargs):
    raise RuntimeError('no compiled op: use ms_deform_attn_core_pytorch')

  msda.ms_deform_attn_forward = _no_cuda
  msda.ms_deform_attn_backward = _no_cuda
  sys.modules['MultiScaleDeformableAttention'] = msda
  for name in ('resampy', 'soundfile'):  # VGGish's wav reading, unused here
    sys.modules[name] = types.ModuleType(name)
  torch.Tensor.cuda = lambda self, *a, **k: self


_install_stubs()
sys.path.insert(0, REF)
from model import build_model  # pylint: disable=g-import-not-at-top,wrong-import-position
import importlib.util  # pylint: disable=g-import-not-at-top,wrong-import-position
from ops.functions import ms_deform_attn_func  # pylint: disable=g-import-not-at-top,wrong-import-position


def _load_loss_module(setting):
  spec = importlib.util.spec_from_file_location(
      f'avsegformer_loss_{setting}',
      os.path.join(REF, 'scripts', setting, 'loss.py'),
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _load_config(setting, backbone):
  name = {'resnet50': 'res50', 'pvt_v2_b5': 'pvt2'}[backbone]
  path = os.path.join(
      REF, 'config', setting, f'AVSegFormer_{name}_{setting}.py'
  )
  scope = {}
  with open(path) as f:
    exec(compile(f.read(), path, 'exec'), scope)  # pylint: disable=exec-used
  return scope['model'], scope['loss']


# ---------------------------------------------------------------------------
# Deterministic weights (tests/data/golden/README.md).


def rebuild_tensor(key, shape):
  rng = np.random.default_rng(zlib.crc32(key.encode('utf-8')))
  n = rng.standard_normal(shape)
  leaf = key.rsplit('.', 1)[-1]
  if leaf == 'running_var':
    t = 1 + 0.1 * np.abs(n)
  elif leaf == 'running_mean':
    t = 0.1 * n
  elif leaf == 'bias':
    t = 0.02 * n
  elif len(shape) == 1:
    t = 1 + 0.1 * n
  else:
    t = n * np.sqrt(1.0 / np.prod(shape[1:]))
  return torch.from_numpy(t.astype(np.float32))


def build(setting, backbone, dropout=None):
  """The reference model with golden weights, VGGish replaced by identity."""
  mcfg, lcfg = _load_config(setting, backbone)
  mcfg = json.loads(json.dumps(mcfg))
  mcfg['backbone']['init_weights_path'] = None
  mcfg['vggish'].update(
      freeze_audio_extractor=False,
      pretrained_vggish_model_path=None,
      preprocess_audio_to_log_mel=False,
      postprocess_log_mel_with_pca=False,
  )
  if dropout is not None:
    for part in ('encoder', 'decoder'):
      mcfg['head']['transformer'][part]['layer']['dropout'] = dropout
  torch.manual_seed(0)
  model = build_model(**mcfg)
  full = {k: list(v.shape) for k, v in model.state_dict().items()}
  model.vggish = nn.Identity()
  sd = model.state_dict()
  shapes = {
      k: list(v.shape)
      for k, v in sd.items()
      if not k.endswith('num_batches_tracked')
  }
  new = {k: rebuild_tensor(k, s) for k, s in shapes.items()}
  for k, v in sd.items():
    if k.endswith('num_batches_tracked'):
      new[k] = v
  model.load_state_dict(new, strict=True)
  return model, mcfg, lcfg, shapes, full


class Capture:
  """Records the head's intermediate tensors with forward hooks."""

  def __init__(self, model):
    self.d = {}
    head = model.head
    head.query_generator.register_forward_hook(self._gen)
    head.transformer.register_forward_pre_hook(self._pre)
    head.transformer.register_forward_hook(self._post)

  def _gen(self, mod, inp, out):
    del mod, inp
    self.d['generated_query'] = out.detach().clone()

  def _pre(self, mod, args):
    del mod
    self.d['query'] = args[0].detach().clone()
    self.d['pos_embed'] = args[5].detach().clone()

  def _post(self, mod, inp, out):
    del mod, inp
    memory, outputs = out
    self.d['memory'] = memory.detach().clone()
    self.d['decoder_out'] = outputs[-1].detach().clone()


def make_inputs(rng, b, t, h, w, num_classes):
  frames = rng.standard_normal((b * t, 3, h, w)).astype(np.float32)
  audio = np.abs(rng.standard_normal((b * t, 128))).astype(np.float32)
  if num_classes == 1:
    masks = np.zeros((b * t, 1, h, w), np.float32)  # binary
  else:
    masks = np.zeros((b * t, h, w), np.int64)
  for i in range(b * t):
    if i % 4 == 3:  # an empty frame now and then
      continue
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    y1, x1 = y0 + rng.integers(h // 4, h // 2), x0 + rng.integers(
        w // 4, w // 2
    )
    if num_classes == 1:
      masks[i, 0, y0:y1, x0:x1] = 1
    else:
      masks[i, y0:y1, x0:x1] = rng.integers(1, num_classes)
  return frames, audio, masks


def _np(x):
  return x.detach().cpu().numpy().astype(np.float32)


def losses(setting, logits, mask_feature, masks, b, t, lcfg, gt_flag=None):
  """The reference losses: {name: float}."""
  out = {}
  if setting in ('s4', 'ms3'):
    for st in ('s4', 'ms3'):
      mod = _load_loss_module(st)
      gt = torch.from_numpy(masks)
      if st == 's4':  # the S4 loader gives the first frame's mask only
        gt = gt.view(b, t, 1, *gt.shape[-2:])[:, 0].unsqueeze(1)
      for lt in ('dice', 'bce'):
        total, parts = mod.IouSemanticAwareLoss(
            logits, mask_feature, gt, lcfg['weight_dict'], loss_type=lt
        )
        out[f'loss_{st}_{lt}_total'] = float(total)
        out[f'loss_{st}_{lt}_iou'] = float(parts['iou_loss'])
        out[f'loss_{st}_{lt}_mix'] = float(parts['mix_loss'])
  else:
    mod = _load_loss_module('avss')
    total, parts = mod.IouSemanticAwareLoss(
        logits,
        mask_feature,
        torch.from_numpy(masks),
        torch.from_numpy(gt_flag),
        lcfg['weight_dict'],
    )
    out['loss_avss_total'] = float(total)
    out['loss_avss_iou'] = float(parts['iou_loss'])
    out['loss_avss_mix'] = float(parts['mix_loss'])
  return out


def eval_fixture(name, setting, backbone, b, t, size, seed):
  model, mcfg, lcfg, shapes, full = build(setting, backbone)
  model.eval()
  cap = Capture(model)
  num_classes = mcfg['head']['num_classes']
  rng = np.random.default_rng(seed)
  frames, audio, masks = make_inputs(rng, b, t, size, size, num_classes)
  vid_flag = gt_flag = None
  if setting == 'avss':
    vid_flag = np.ones(b * t, np.float32)
    vid_flag.reshape(b, t)[:, 5:] = 0  # 5-second clips padded to 10
    gt_flag = vid_flag.copy()
    gt_flag.reshape(b, t)[:, 1:] = 0  # only the first frame labelled
    gt_flag.reshape(b, t)[:, 3] = 1
  fl = None if vid_flag is None else torch.from_numpy(vid_flag)
  logits, mask_feature = model(
      torch.from_numpy(audio), torch.from_numpy(frames), fl
  )
  keep = FIXTURE_FRAMES.get(setting, slice(None))
  d = dict(
      frames=frames,
      audio_embedding=audio,
      masks=masks,
      logits=_np(logits[keep]),
      mask_feature=_np(mask_feature[:1]),
  )
  # Per-frame intermediates of the first frame only (size of the files).
  d.update(
      {
          k: _np(v[:1])
          for k, v in cap.d.items()
          if k in ('query', 'memory', 'decoder_out')
      }
  )
  if setting == 'avss':
    d['logits_frames'] = np.arange(b * t)[keep]
  if vid_flag is not None:
    d['vid_temporal_mask_flag'] = vid_flag
    d['gt_temporal_mask_flag'] = gt_flag
  d.update(
      {
          k: np.float64(v)
          for k, v in losses(
              setting, logits, mask_feature, masks, b, t, lcfg, gt_flag
          ).items()
      }
  )
  cfg = dict(
      setting=setting,
      backbone=backbone,
      batch=b,
      frames_per_clip=t,
      height=size,
      width=size,
      num_classes=num_classes,
      query_num=mcfg['head']['query_num'],
      mode='eval',
      loss=lcfg,
  )
  save(name, d, cfg, shapes, full)


# AVSS logits are [B*10, 71, H, W]: keep two live frames and a padded one.
FIXTURE_FRAMES = {'avss': np.asarray([0, 3, 7])}

GRAD_KEYS = [
    'audio_proj.bias',
    'head.fc.4.weight',
    'head.fc.2.bias',
    'head.fc.0.bias',
    'head.mlp.layers.2.bias',
    'head.mlp.layers.0.bias',
    'head.fusion_block.proj.bias',
    'head.out_conv.1.weight',
    'head.lateral_conv.0.bias',
    'head.in_proj.0.1.bias',
    'head.in_proj.1.0.bias',
    'head.in_proj.3.1.weight',
    'head.level_embed',
    'head.learnable_query.weight',
    'head.transformer.decoder.layers.5.linear2.bias',
    'head.transformer.decoder.layers.0.cross_attn.in_proj_bias',
    'head.transformer.decoder.layers.0.self_attn.out_proj.bias',
    'head.transformer.encoder.layers.0.self_attn.sampling_offsets.weight',
    'head.transformer.encoder.layers.0.self_attn.sampling_offsets.bias',
    'head.transformer.encoder.layers.0.self_attn.attention_weights.weight',
    'head.transformer.encoder.layers.3.self_attn.value_proj.bias',
    'head.transformer.encoder.layers.5.norm2.weight',
    'head.query_generator.layers.0.norm1.weight',
    'head.query_generator.layers.0.ffn.2.bias',
    'head.query_generator.layers.5.norm3.bias',
    'backbone.conv1.weight',
    'backbone.layer1.0.conv1.weight',
    'backbone.layer4_1.2.bn3.weight',
    'backbone.layer3_1.5.bn2.bias',
]


def _train_step(setting, frames, audio, masks, dtype):
  model, mcfg, lcfg, shapes, full = build(setting, 'resnet50', dropout=0.0)
  model = model.to(dtype)
  model.train()
  # After `freeze_epochs` the reference trains the backbone too.
  model.freeze_backbone(False)
  logits, mask_feature = model(
      torch.from_numpy(audio).to(dtype), torch.from_numpy(frames).to(dtype)
  )
  mod = _load_loss_module(setting)
  total, parts = mod.IouSemanticAwareLoss(
      logits,
      mask_feature,
      torch.from_numpy(masks).to(dtype),
      lcfg['weight_dict'],
      loss_type='dice',
  )
  model.zero_grad()
  total.backward()
  return (model, mcfg, lcfg, shapes, full, logits, mask_feature, total, parts)


def train_fixture(name, setting, b, t, size, seed):
  """One training-mode forward/backward, in float32 and in float64.

  The float64 run gives the gradients without rounding noise: deep
  gradients here are ill-conditioned in float32 (sums with cancellation),
  so a port is checked against float64 tightly and against float32 within
  the reference's own float32 error.
  """
  rng = np.random.default_rng(seed)
  frames, audio, masks = make_inputs(rng, b, t, size, size, 1)
  model64, *_, total64, _ = _train_step(
      setting, frames, audio, masks, torch.float64
  )
  params64 = dict(model64.named_parameters())
  model, mcfg, lcfg, shapes, full, logits, mask_feature, total, parts = (
      _train_step(setting, frames, audio, masks, torch.float32)
  )
  params = dict(model.named_parameters())
  d = dict(
      frames=frames,
      audio_embedding=audio,
      masks=masks,
      logits=_np(logits),
      mask_feature=_np(mask_feature[:1]),
      loss_total=np.float64(float(total)),
      loss_iou=np.float64(parts['iou_loss']),
      loss_mix=np.float64(parts['mix_loss']),
  )
  d['loss_total64'] = np.float64(float(total64))
  for k in GRAD_KEYS:
    d['grad/' + k] = _np(params[k].grad)
    d['grad64/' + k] = params64[k].grad.detach().numpy().astype(np.float64)
  for k, v in model.state_dict().items():
    if k.endswith(('running_mean', 'running_var')):
      d['updated/' + k] = _np(v)
  cfg = dict(
      setting=setting,
      backbone='resnet50',
      batch=b,
      frames_per_clip=t,
      height=size,
      width=size,
      num_classes=1,
      query_num=mcfg['head']['query_num'],
      mode='train',
      dropout=0.0,
      loss=dict(lcfg, loss_type='dice'),
  )
  save(name, d, cfg, shapes, full)


def deform_fixture(name, seed):
  """`ms_deform_attn_core_pytorch` alone, with many out-of-bounds points."""
  rng = np.random.default_rng(seed)
  shapes = [(6, 5), (3, 3), (2, 1)]
  n, m, dh, lq, p = 2, 4, 8, 7, 3
  s = sum(h * w for h, w in shapes)
  value = rng.standard_normal((n, s, m, dh)).astype(np.float32)
  loc = rng.uniform(-0.3, 1.3, (n, lq, m, len(shapes), p, 2)).astype(np.float32)
  attn = rng.uniform(0, 1, (n, lq, m, len(shapes), p)).astype(np.float32)
  out = ms_deform_attn_func.ms_deform_attn_core_pytorch(
      torch.from_numpy(value),
      torch.as_tensor(shapes),
      torch.from_numpy(loc),
      torch.from_numpy(attn),
  )
  path = os.path.join(OUT, name)
  np.savez(
      path,
      value=value,
      spatial_shapes=np.asarray(shapes),
      sampling_locations=loc,
      attention_weights=attn,
      output=_np(out),
  )
  print('wrote', path, os.path.getsize(path))


def save(name, d, cfg, shapes, full):
  d = dict(d)
  d['config'] = np.asarray(json.dumps(cfg))
  d['state_dict_shapes'] = np.asarray(json.dumps(shapes))
  d['state_dict_shapes_full'] = np.asarray(json.dumps(full))
  path = os.path.join(OUT, name)
  np.savez_compressed(path, **d)
  print('wrote', path, os.path.getsize(path))


def main():
  torch.set_num_threads(2)
  os.makedirs(OUT, exist_ok=True)
  deform_fixture('deform_attn_core.npz', 0)
  eval_fixture('avsegformer_resnet50_s4_64.npz', 's4', 'resnet50', 2, 5, 64, 1)
  eval_fixture(
      'avsegformer_resnet50_ms3_96.npz', 'ms3', 'resnet50', 1, 5, 96, 2
  )
  eval_fixture(
      'avsegformer_pvt_v2_b5_ms3_64.npz', 'ms3', 'pvt_v2_b5', 1, 5, 64, 3
  )
  eval_fixture(
      'avsegformer_resnet50_avss_32.npz', 'avss', 'resnet50', 1, 10, 32, 4
  )
  train_fixture('avsegformer_resnet50_train_ms3_64.npz', 'ms3', 1, 5, 64, 5)


if __name__ == '__main__':
  if len(sys.argv) > 2 and sys.argv[2] == 'train':  # the training one only
    train_fixture('avsegformer_resnet50_train_ms3_64.npz', 'ms3', 1, 5, 64, 5)
  else:
    main()
