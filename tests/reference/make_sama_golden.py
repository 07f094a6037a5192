"""Golden fixtures of SAMA-AVS from its reference PyTorch code, on CPU.

Reference: repository jinxiang-liu/anno-free-AVS (commit 15e6b04; `models/`,
`torchvggish/`), and facebookresearch/segment-anything (commit dca509f) for
SAM's released checkpoint layout. Run with a Python that has torch (2.13 CPU
was used):

  python tests/reference/make_sama_golden.py ANNO_FREE_AVS_DIR SAM_DIR [OUT]

(default OUT: tests/data/golden_sama). Weights are the fixture recipe of
tests/golden_weights.py (each tensor from crc32 of its key; no weights are
stored, `state_dict_shapes` lists them), PyTorch layout.

What is stubbed, and why it does not change the computation:
  * `models.mmseg` and `models.mmseg.models` (the packages above SAM's
    modules): their `__init__` imports mmcv and mmseg's registries; we
    register them as bare packages so that only `models/mmseg/models/sam/`
    runs.
  * `configs.vggish_config` (needs easydict): the same fields, with
    `FREEZE_AUDIO_EXTRACTOR=False` so that VGGish does not load its
    AudioSet file; VGGish is then replaced by the identity after its keys
    are recorded: the inputs are audio embeddings [N, 128] (VGGish's output),
    set on the model as `set_input` leaves them.
  * resampy, soundfile: imported by VGGish's wav reader, which never runs.
  * `segment_anything` is registered as a bare package (its `__init__`
    imports the predictor, which needs torchvision); only `build_sam` and
    `modeling` are used, on the meta device, for the key layout.
  * In the float64 run only, `PositionEmbeddingRandom.forward` builds its
    grid in float64 (`_pe_forward`): the reference's grid is float32
    whatever the model's dtype and would not multiply a float64 buffer.

The model is the reference `SAM` class (`models/sam.py`) at a small size:
96 px frames, a 4-block ViT (64-d, 4 heads, window 4 over a 6x6 token map,
so windows are zero-padded, global attention in blocks 1 and 3), the real
mask decoder (256-d, 2048 MLP, 8 heads).
"""

import json
import os
import sys
import types
import zlib

import numpy as np
import torch
from torch import nn

REF = sys.argv[1] if len(sys.argv) > 1 else '/tmp/sama_ref/afa'
SAM_REF = sys.argv[2] if len(sys.argv) > 2 else '/tmp/sama_ref/sam'
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = (
    sys.argv[3]
    if len(sys.argv) > 3
    else os.path.join(HERE, '..', 'data', 'golden_sama')
)


def _install_stubs():
  for name in ('models.mmseg', 'models.mmseg.models'):
    mod = types.ModuleType(name)
    mod.__path__ = [os.path.join(REF, *name.split('.'))]
    sys.modules[name] = mod
  ns = types.SimpleNamespace
  cfg = ns(
      TRAIN=ns(
          FREEZE_AUDIO_EXTRACTOR=False,
          PRETRAINED_VGGISH_MODEL_PATH='',
          PREPROCESS_AUDIO_TO_LOG_MEL=False,
          POSTPROCESS_LOG_MEL_WITH_PCA=False,
          PRETRAINED_PCA_PARAMS_PATH='',
      )
  )
  configs = types.ModuleType('configs')
  configs.__path__ = []
  vcfg = types.ModuleType('configs.vggish_config')
  vcfg.cfg = cfg
  sys.modules['configs'] = configs
  sys.modules['configs.vggish_config'] = vcfg
  for name in ('resampy', 'soundfile'):
    sys.modules[name] = types.ModuleType(name)


_install_stubs()
sys.path.insert(0, REF)
import models.sam as sama_ref  # pylint: disable=g-import-not-at-top,wrong-import-position

_sam_pkg = types.ModuleType(
    'segment_anything'
)  # its __init__ needs torchvision
_sam_pkg.__path__ = [os.path.join(SAM_REF, 'segment_anything')]
sys.modules['segment_anything'] = _sam_pkg
from segment_anything import build_sam  # pylint: disable=g-import-not-at-top,wrong-import-position


def _pe_forward(self, size):
  """`PositionEmbeddingRandom.forward` with the grid in the buffer's dtype.

  The reference builds the grid in float32 (`models/sam.py:120`), which
  cannot meet a float64 buffer; in float32 this is the same computation.
  """
  g = self.positional_encoding_gaussian_matrix
  grid = torch.ones((size, size), device=g.device, dtype=g.dtype)
  y_embed = (grid.cumsum(dim=0) - 0.5) / size
  x_embed = (grid.cumsum(dim=1) - 0.5) / size
  pe = self._pe_encoding(torch.stack([x_embed, y_embed], dim=-1))  # pylint: disable=protected-access
  return pe.permute(2, 0, 1)


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


# The small model (encoder_mode fields of configs/sam_avs_adapter.yaml).
TINY = dict(
    name='sam',
    img_size=96,
    mlp_ratio=4,
    patch_size=16,
    qkv_bias=True,
    use_rel_pos=True,
    window_size=4,
    out_chans=256,
    prompt_embed_dim=256,
    embed_dim=64,
    depth=4,
    num_heads=4,
    global_attn_indexes=[1, 3],
)
VIT_H = dict(  # configs/sam_avs_adapter.yaml
    TINY,
    img_size=1024,
    window_size=14,
    embed_dim=1280,
    depth=32,
    num_heads=16,
    global_attn_indexes=[7, 15, 23, 31],
)
VIT_B = dict(
    VIT_H,
    embed_dim=768,
    depth=12,
    num_heads=12,
    global_attn_indexes=[2, 5, 8, 11],
)


def _shapes(sd):
  return {k: list(v.shape) for k, v in sd.items()}


def layouts():
  """Full key layouts (shapes only, built on the meta device).

  VGGish's constructor moves itself to a device, which the meta device
  refuses: `audio_extractor` is swapped for one holding the same `VGG`
  network without that move (the same keys and shapes).
  """

  class MetaAudio(nn.Module):

    def __init__(self, cfg, device):
      del cfg, device
      super().__init__()
      vggish = sama_ref.vggish
      self.audio_backbone = vggish.VGG(vggish.make_layers())

  real, sama_ref.audio_extractor = sama_ref.audio_extractor, MetaAudio
  try:
    return _layouts()
  finally:
    sama_ref.audio_extractor = real


def _layouts():
  with torch.device('meta'):
    sam_b = build_sam.build_sam_vit_b()
    sama_b = sama_ref.SAM(inp_size=1024, encoder_mode=VIT_B, loss='iou')
    sama_h = sama_ref.SAM(inp_size=1024, encoder_mode=VIT_H, loss='iou')
  return dict(
      sam_vit_b=_shapes(sam_b.state_dict()),
      sama_vit_b=_shapes(sama_b.state_dict()),
      sama_vit_h=_shapes(sama_h.state_dict()),
  )


def build(loss='iou'):
  """The reference SAM with golden weights, VGGish replaced by identity."""
  torch.manual_seed(0)
  model = sama_ref.SAM(inp_size=TINY['img_size'], encoder_mode=TINY, loss=loss)
  full = _shapes(model.state_dict())
  model.audio_encoder = nn.Identity()
  shapes = _shapes(model.state_dict())
  model.load_state_dict(
      {k: rebuild_tensor(k, s) for k, s in shapes.items()}, strict=True
  )
  return model, shapes, full


def make_inputs(rng, n, size):
  frames = rng.standard_normal((n, 3, size, size)).astype(np.float32)
  audio = np.abs(rng.standard_normal((n, 128))).astype(np.float32)
  masks = np.zeros((n, 1, size, size), np.float32)
  for i in range(n):
    if i % 4 == 3:  # an empty frame now and then
      continue
    y0, x0 = rng.integers(0, size // 2, 2)
    y1 = y0 + rng.integers(size // 4, size // 2)
    x1 = x0 + rng.integers(size // 4, size // 2)
    masks[i, 0, y0:y1, x0:x1] = 1
  return frames, audio, masks


class Capture:
  """Records the image embedding and the low-res masks with hooks."""

  def __init__(self, model):
    self.d = {}
    model.image_encoder.register_forward_hook(self._enc)
    model.mask_decoder.register_forward_hook(self._dec)

  def _enc(self, mod, inp, out):
    del mod, inp
    self.d['image_embedding'] = out.detach().clone()

  def _dec(self, mod, inp, out):
    del mod, inp
    self.d['low_res_logits'] = out[0].detach().clone()
    self.d['iou_pred'] = out[1].detach().clone()


def run(model, frames, audio, masks, dtype):
  """`set_input` without VGGish (the inputs are its embeddings), `forward`."""
  model.input = torch.from_numpy(frames).to(dtype)
  model.spec = torch.from_numpy(audio).to(dtype)
  model.gt_mask = torch.from_numpy(masks).to(dtype)
  model.forward()
  return model.pred_mask


def losses(pred, gt):
  """The three `loss` modes of `SAM.__init__` / `backward_G`."""
  bce = torch.nn.BCEWithLogitsLoss()(pred, gt)
  return dict(
      loss_bce=float(bce),
      loss_bbce=float(sama_ref.BBCEWithLogitLoss()(pred, gt)),
      loss_iou=float(bce + sama_ref._iou_loss(pred, gt)),  # pylint: disable=protected-access
  )


def _np(x, dtype=np.float32):
  return x.detach().cpu().numpy().astype(dtype)


GRAD_KEYS = [
    'image_encoder.prompt_generator.shared_mlp.weight',
    'image_encoder.prompt_generator.shared_mlp.bias',
    'image_encoder.prompt_generator.lightweight_mlp_0.0.bias',
    'image_encoder.prompt_generator.lightweight_mlp_3.0.bias',
    'no_mask_embed.weight',
    'mask_decoder.iou_token.weight',
    'mask_decoder.mask_tokens.weight',
    'mask_decoder.output_upscaling.0.bias',
    'mask_decoder.output_upscaling.1.weight',
    'mask_decoder.output_upscaling.3.weight',
    'mask_decoder.output_hypernetworks_mlps.0.layers.0.bias',
    'mask_decoder.output_hypernetworks_mlps.0.layers.2.weight',
    'mask_decoder.output_hypernetworks_mlps.1.layers.2.bias',
    'mask_decoder.transformer.layers.0.self_attn.q_proj.bias',
    'mask_decoder.transformer.layers.0.norm4.bias',
    'mask_decoder.transformer.layers.1.cross_attn_image_to_token.v_proj.weight',
    'mask_decoder.transformer.layers.1.mlp.lin1.bias',
    'mask_decoder.transformer.final_attn_token_to_image.out_proj.bias',
    'mask_decoder.transformer.norm_final_attn.weight',
]


def fixture(name, b, t, seed):
  n, size = b * t, TINY['img_size']
  rng = np.random.default_rng(seed)
  frames, audio, masks = make_inputs(rng, n, size)
  model, shapes, full = build()
  model.eval()
  cap = Capture(model)
  with torch.no_grad():
    pred = run(model, frames, audio, masks, torch.float32)
  d = dict(
      frames=frames,
      audio_embedding=audio,
      masks=masks,
      logits=_np(pred),
      image_embedding=_np(cap.d['image_embedding']),
      low_res_logits=_np(cap.d['low_res_logits']),
      iou_pred=_np(cap.d['iou_pred']),
      **{k: np.float64(v) for k, v in losses(pred, d_gt(masks)).items()},
  )
  d.update(train64(frames, audio, masks))
  cfg = dict(
      encoder_mode=TINY, inp_size=size, batch=b, frames_per_clip=t, loss='iou'
  )
  d['config'] = np.asarray(json.dumps(cfg))
  d['state_dict_shapes'] = np.asarray(json.dumps(shapes))
  d['state_dict_shapes_full'] = np.asarray(json.dumps(full))
  d['layouts'] = np.asarray(json.dumps(layouts()))
  path = os.path.join(OUT, name)
  np.savez_compressed(path, **d)
  print('wrote', path, os.path.getsize(path))


def d_gt(masks):
  return torch.from_numpy(masks)


def train64(frames, audio, masks):
  """One training step's loss and gradients in float64, with the reference's
  frozen/trainable split (`train_avs.py:183-185`)."""
  model, _, full = build()
  model = model.double()
  model.pe_layer.forward = types.MethodType(_pe_forward, model.pe_layer)
  model.train()
  for name, p in model.named_parameters():
    if 'image_encoder' in name and 'prompt_generator' not in name:
      p.requires_grad_(False)
  requires_grad = [
      k for k in full if k.startswith('audio_encoder.')  # VGGish's own
  ] + [k for k, p in model.named_parameters() if p.requires_grad]
  run(model, frames, audio, masks, torch.float64)
  model.zero_grad(set_to_none=True)
  model.backward_G()
  params = dict(model.named_parameters())
  out = dict(
      loss_iou64=np.float64(float(model.loss_G)),
      logits64_frame0=_np(model.pred_mask[:1], np.float64),
      requires_grad=np.asarray(json.dumps(requires_grad)),
      has_grad=np.asarray(
          json.dumps([k for k, p in params.items() if p.grad is not None])
      ),
  )
  for k in GRAD_KEYS:
    out['grad64/' + k] = _np(params[k].grad, np.float64)
  return out


def main():
  torch.set_num_threads(2)
  os.makedirs(OUT, exist_ok=True)
  fixture('sama_tiny_96.npz', 2, 2, 0)


if __name__ == '__main__':
  main()
