"""Golden fixtures of the official AVSS code (AVSBench-semantic, 71 classes).

Runs the reference PyTorch implementation (OpenNLPLab/AVSBench,
`avs_scripts/avss`: `model/{ResNet,PVT}_AVSModel.py`, `model/TPAVI.py`,
`loss.py`, `utils/compute_color_metrics.py`, `color_dataloader.py`) on CPU in
float32 with the deterministic weights of tests/data/golden/README.md, and
writes `tests/data/golden_avss/*.npz` (see its README.md).

    python tests/reference/make_avss_golden.py --ref /work/ref/AVSBench

`--ref` is an extracted copy of the reference repository. The Python needs
torch, numpy, PIL, pandas, easydict, opencv (the reference's imports); it was
run with a venv holding the project's torch 2.13 (CPU) plus pandas, easydict
and opencv-python-headless.

Stubs (each unavailable here and irrelevant to the numbers):
  * `torchvision`: imported by the reference but unused by the code run here
    (its ImageNet initialisers are replaced, see below; `transforms` is only
    used by the dataset class, which is not run). The PyPI torchvision wheel
    does not load against a CPU-only torch build.
  * `timm` (`DropPath`, `to_2tuple`, `trunc_normal_`, `register_model`,
    `_cfg`): PVT-v2's helpers. `DropPath` is the identity in eval mode, and the
    PVT model is only run in eval mode; initialisers are overwritten by the
    golden weights.
  * `model/pvt.py` is missing from `avs_scripts/avss/model` at the reference's
    head although `PVT_AVSModel.py` imports it: the identical-purpose file of
    `avs_scripts/avs_ms3/model/pvt.py` is loaded as `model.pvt`.
  * The models' constructors load ImageNet backbones from disk when
    `self.training` (always true in a constructor): `initialize_weights` /
    `initialize_pvt_weights` are made no-ops; every weight is then replaced.
  * `Tensor.cuda()` (called unconditionally in the forward and in
    `closer_loss`) returns the tensor itself.
"""

import argparse
import importlib.util
import json
import os
import sys
import types

import numpy as np
import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for golden_weights
from golden_weights import rebuild_state_dict  # noqa: E402

OUT = os.path.join(os.path.dirname(HERE), 'data', 'golden_avss')
NUM_CLASSES = 71
T = 10  # frames per AVSBench-semantic clip (v1 clips padded from 5)


def install_stubs(ref_root):
  """Stubs for the unavailable, irrelevant imports (see the docstring)."""
  tv = types.ModuleType('torchvision')
  tv.models = types.ModuleType('torchvision.models')
  tv.transforms = types.ModuleType('torchvision.transforms')
  sys.modules.update(
      {
          'torchvision': tv,
          'torchvision.models': tv.models,
          'torchvision.transforms': tv.transforms,
      }
  )

  class DropPath(nn.Module):

    def __init__(self, drop_prob=0.0):
      super().__init__()
      self.drop_prob = drop_prob

    def forward(self, x):
      if self.drop_prob == 0.0 or not self.training:
        return x
      raise NotImplementedError('stochastic depth is not exercised here')

  layers = types.ModuleType('timm.models.layers')
  layers.DropPath = DropPath
  layers.to_2tuple = (
      lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
  )
  layers.trunc_normal_ = lambda t, std=1.0, **k: nn.init.trunc_normal_(
      t, std=std
  )
  registry = types.ModuleType('timm.models.registry')
  registry.register_model = lambda f: f
  vit = types.ModuleType('timm.models.vision_transformer')
  vit._cfg = lambda **k: dict(k)
  timm = types.ModuleType('timm')
  timm.models = types.ModuleType('timm.models')
  sys.modules.update(
      {
          'timm': timm,
          'timm.models': timm.models,
          'timm.models.layers': layers,
          'timm.models.registry': registry,
          'timm.models.vision_transformer': vit,
      }
  )
  torch.Tensor.cuda = lambda self, *a, **k: self

  avss = os.path.join(ref_root, 'avs_scripts', 'avss')
  sys.path.insert(0, avss)
  import model  # noqa: F401  (avss/model, a package)

  spec = importlib.util.spec_from_file_location(
      'model.pvt',
      os.path.join(ref_root, 'avs_scripts', 'avs_ms3', 'model', 'pvt.py'),
  )
  pvt = importlib.util.module_from_spec(spec)
  sys.modules['model.pvt'] = pvt
  spec.loader.exec_module(pvt)
  from model import PVT_AVSModel, ResNet_AVSModel

  ResNet_AVSModel.Pred_endecoder.initialize_weights = lambda self: None
  PVT_AVSModel.Pred_endecoder.initialize_pvt_weights = lambda self: None
  return ResNet_AVSModel, PVT_AVSModel


def build(module, cfg):
  model = module.Pred_endecoder(
      channel=256,
      config=cfg,
      tpavi_stages=[0, 1, 2, 3],
      tpavi_vv_flag=False,
      tpavi_va_flag=True,
  )
  sd = model.state_dict()
  shapes = {k: list(v.shape) for k, v in sd.items()}
  weights = rebuild_state_dict(shapes)
  missing, unexpected = model.load_state_dict(
      {k: torch.from_numpy(v) for k, v in weights.items()}, strict=False
  )
  assert not unexpected and all(
      k.endswith('num_batches_tracked') for k in missing
  ), (missing, unexpected)
  return model, shapes


def make_inputs(rng, h, w, n_real):
  """One clip: frames [T,3,h,w] (zero padding after n_real), raw audio
  [T,128] (not zero on padded frames: the reference masks it), labels
  [T,h,w] int64 (blocks of a few classes; padded frames 0)."""
  frames = rng.standard_normal((T, 3, h, w)).astype(np.float32)
  frames[n_real:] = 0
  audio = rng.standard_normal((T, 128)).astype(np.float32)
  labels = np.zeros((T, h, w), np.int64)
  for f in range(n_real):
    for _ in range(3):
      y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
      y1, x1 = y0 + rng.integers(4, h // 2), x0 + rng.integers(4, w // 2)
      labels[f, y0:y1, x0:x1] = rng.integers(1, NUM_CLASSES)
  return frames, audio, labels


def avm_variants():
  """Name -> IouSemanticAwareLoss keyword arguments of the AVM term."""
  base = dict(
      mask_pooling_type='avg',
      norm_fea=False,
      threshold=False,
      closer_flag=False,
      euclidean_flag=False,
      kl_flag=False,
  )
  return {
      'kl': dict(base, kl_flag=True),  # the recipe (train.sh)
      'euclidean_norm': dict(base, euclidean_flag=True, norm_fea=True),
      'kl_threshold': dict(base, kl_flag=True, threshold=True),
      'kl_max': dict(base, kl_flag=True, mask_pooling_type='max'),
      'closer_kl': dict(base, kl_flag=True, closer_flag=True),
      'closer_euclidean_norm': dict(
          base, euclidean_flag=True, norm_fea=True, closer_flag=True
      ),
  }


def losses(loss_mod, pred, labels, a_feas, v_maps, gt_masks, out):
  """Loss terms of every gt-mask pattern and AVM variant into `out`."""
  for gname, gt in gt_masks.items():
    gt = torch.from_numpy(gt)
    out[f'loss_ce_{gname}'] = loss_mod.F10_IoU_BCELoss(
        pred, torch.from_numpy(labels), gt
    ).item()
    for vname, kw in avm_variants().items():
      total, d = loss_mod.IouSemanticAwareLoss(
          pred,
          torch.from_numpy(labels),
          a_feas,
          v_maps,
          gt,
          sa_loss_flag=True,
          count_stages=[0, 1, 2, 3],
          lambda_1=0.5,
          **kw,
      )
      out[f'loss_avm_{vname}_{gname}'] = d['sa_loss']
      if vname == 'kl':
        out[f'loss_total_lambda0.5_kl_{gname}'] = total.item()


def forward_fixture(
    module, loss_mod, metric_mod, cfg, name, h, w, n_real, gt_masks, seed
):
  model, shapes = build(module, cfg)
  model.eval()
  rng = np.random.default_rng(seed)
  frames, audio, labels = make_inputs(rng, h, w, n_real)
  vid = np.array([1.0] * n_real + [0.0] * (T - n_real), np.float32)
  out = {
      'config': json.dumps(
          dict(
              backbone=name,
              num_classes=NUM_CLASSES,
              frames_per_clip=T,
              height=h,
              width=w,
              channel=256,
              tpavi_stages=[0, 1, 2, 3],
              tpavi_mode='dot',
              tpavi_vv=False,
              tpavi_va=True,
              n_real_frames=n_real,
          )
      ),
      'state_dict_shapes': json.dumps(shapes),
      'frames': frames,
      'audio_embedding': audio,
      'labels': labels,
      'vid_temporal_mask': vid,
  }
  for k, v in gt_masks.items():
    out[f'gt_temporal_mask_{k}'] = v
  with torch.no_grad():
    vid_t = torch.from_numpy(vid)
    a = torch.from_numpy(audio) * vid_t.unsqueeze(-1)  # as train.py/test.py
    pred, v_maps, a_feas = model(torch.from_numpy(frames), a, vid_t)
    out['logits'] = pred.numpy()
    for i in range(4):
      out[f'v_map_{i}'] = v_maps[i].numpy()
      out[f'a_fea_{i}'] = a_feas[i].numpy()
    losses(loss_mod, pred, labels, a_feas, v_maps, gt_masks, out)
    # The AVM mask is argmax != background: with random weights the model
    # predicts one class everywhere, so the AVM terms are also evaluated with
    # `avm_logits`, a spatially mixed prediction (one-hot of shifted labels).
    mixed = np.zeros_like(out['logits'])
    shifted = np.roll(labels, 3, axis=-1)
    np.put_along_axis(mixed, shifted[:, None], 4.0, axis=1)
    out['avm_logits'] = mixed
    extra = {}
    losses(
        loss_mod,
        torch.from_numpy(mixed),
        labels,
        a_feas,
        v_maps,
        gt_masks,
        extra,
    )
    out.update(
        {
            f'{k}_avmlogits': v
            for k, v in extra.items()
            if k.startswith('loss_avm')
        }
    )
    ious, fs, cls, vid_miou = metric_mod.calc_color_miou_fscore(
        pred, torch.from_numpy(labels)
    )
    out.update(
        metric_ious=ious.numpy(),
        metric_fscores=fs.numpy(),
        metric_cls_count=cls.numpy(),
        metric_frame_miou=torch.stack(vid_miou).numpy(),
    )
  return out


def train_fixture(module, loss_mod, cfg, h, w, seed):
  """ResNet-50, training mode (batch statistics), v1m clip (5 + 5 padded)."""
  model, shapes = build(module, cfg)
  model.train()
  rng = np.random.default_rng(seed)
  frames, audio, labels = make_inputs(rng, h, w, 5)
  vid = np.array([1.0] * 5 + [0.0] * 5, np.float32)
  vid_t = torch.from_numpy(vid)
  a = torch.from_numpy(audio) * vid_t.unsqueeze(-1)
  pred, v_maps, a_feas = model(torch.from_numpy(frames), a, vid_t)
  loss, d = loss_mod.IouSemanticAwareLoss(
      pred,
      torch.from_numpy(labels),
      a_feas,
      v_maps,
      vid_t,
      sa_loss_flag=True,
      count_stages=[0, 1, 2, 3],
      lambda_1=0.5,
      **avm_variants()['kl'],
  )
  loss.backward()
  out = {
      'config': json.dumps(
          dict(
              backbone='resnet50',
              num_classes=NUM_CLASSES,
              frames_per_clip=T,
              height=h,
              width=w,
              channel=256,
              tpavi_stages=[0, 1, 2, 3],
              tpavi_mode='dot',
              tpavi_vv=False,
              tpavi_va=True,
              n_real_frames=5,
          )
      ),
      'state_dict_shapes': json.dumps(shapes),
      'frames': frames,
      'audio_embedding': audio,
      'labels': labels,
      'vid_temporal_mask': vid,
      'gt_temporal_mask_v1m': vid,
      'logits': pred.detach().numpy(),
      'loss_ce_v1m': d['iou_loss'],
      'loss_avm_kl_v1m': d['sa_loss'],
      'loss_total_lambda0.5_kl_v1m': loss.item(),
  }
  params = dict(model.named_parameters())
  for k in [
      'output_conv.4.weight',
      'output_conv.4.bias',
      'output_conv.2.weight',
      'output_conv.0.bias',
      'path1.resConfUnit2.conv2.bias',
      'path4.resConfUnit2.conv1.bias',
      'conv1.conv2d_list.0.bias',
      'conv4.conv2d_list.3.bias',
      'tpavi_b1.align_channel.weight',
      'tpavi_b4.theta.weight',
      'tpavi_b2.W_z.0.weight',
      'tpavi_b3.norm_layer.weight',
      'tpavi_b2.W_z.1.weight',
      'resnet.layer4_1.2.bn3.weight',
      'resnet.layer2.0.conv1.weight',
      'resnet.layer1.0.bn1.weight',
      'resnet.conv1.weight',
  ]:
    out[f'grad/{k}'] = params[k].grad.numpy()
  for k, v in model.state_dict().items():
    if k.endswith(('running_mean', 'running_var')) and not k.startswith(
        ('resnet.layer3_2', 'resnet.layer4_2')
    ):
      out[f'updated/{k}'] = v.numpy()
  # The same step in float64: the reference's own float32 rounding error
  # (train-mode BatchNorm on 10 frames, 5 of them zero images, makes the deep
  # ResNet gradients ill-conditioned: ~5% in float32) is measured, not guessed.
  # Stored rounded to float32 (6e-8 relative).
  model64, _ = build(module, cfg)
  model64 = model64.double()
  model64.train()
  vid64 = vid_t.double()
  pred, v_maps, a_feas = model64(
      torch.from_numpy(frames).double(), a.double(), vid64
  )
  loss, _ = loss_mod.IouSemanticAwareLoss(
      pred,
      torch.from_numpy(labels),
      a_feas,
      v_maps,
      vid64,
      sa_loss_flag=True,
      count_stages=[0, 1, 2, 3],
      lambda_1=0.5,
      **avm_variants()['kl'],
  )
  loss.backward()
  out['float64/loss_total_lambda0.5_kl_v1m'] = loss.item()
  params = dict(model64.named_parameters())
  for k in [k for k in out if k.startswith('grad/')]:
    out['float64/' + k] = params[k[len('grad/') :]].grad.float().numpy()
  sd = model64.state_dict()
  for k in [k for k in out if k.startswith('updated/')]:
    out['float64/' + k] = sd[k[len('updated/') :]].float().numpy()
  return out


def metric_scenarios(metric_mod, rng, h=16, w=16):
  """Prediction scenarios through the reference metric and test loop.

  Each scenario is one batch (one 10-frame clip) of `test.py`'s loop; the
  loop's accumulation and final mIoU / F (over all 71 classes, absent ones
  as 0; `_noBg` drops the LAST class) are recorded after every batch.
  """
  out = {}
  labels = np.zeros((4, T, h, w), np.int64)
  logits = np.zeros((4, T, NUM_CLASSES, h, w), np.float32)

  def one_hot_logits(pred):
    x = np.zeros((NUM_CLASSES, h, w), np.float32)
    x[pred, np.arange(h)[:, None], np.arange(w)[None, :]] += 5.0
    return x

  for f in range(T):
    # 0: v1 clip, exact on the 5 real frames; padded frames: zero logits.
    if f < 5:
      labels[0, f, 2:10, 3:12] = 7
      labels[0, f, 10:14, 0:5] = 30 + f
      logits[0, f] = one_hot_logits(labels[0, f])
    # 1: v2 clip with errors: class 12 predicted but never in the ground
    # truth, class 40 in the ground truth but never predicted, a frame whose
    # ground truth is all background, class 70 (the last) present.
    lab = np.zeros((h, w), np.int64)
    if f != 3:
      lab[0:8, 0:8] = 40
      lab[8:16, 4:12] = 5
      lab[12:16, 12:16] = 70
    pred = lab.copy()
    pred[pred == 40] = 12
    pred[8:10, 4:12] = 0
    pred[0:2, 10:16] = 5
    labels[1, f], logits[1, f] = lab, one_hot_logits(pred)
    # 2: random logits, random blocks.
    lab = np.zeros((h, w), np.int64)
    lab[rng.integers(0, 8) :, rng.integers(0, 8) :] = rng.integers(1, 71)
    labels[2, f] = lab
    logits[2, f] = rng.standard_normal((NUM_CLASSES, h, w)) * 2
    # 3: everything predicted background, ground truth partly foreground.
    lab = np.zeros((h, w), np.int64)
    lab[4:12, 4:12] = 1 + f
    labels[3, f] = lab
    logits[3, f] = one_hot_logits(np.zeros((h, w), np.int64))

  out['scenario_logits'], out['scenario_labels'] = logits, labels
  miou_pc = torch.zeros(NUM_CLASSES)
  fs_pc = torch.zeros(NUM_CLASSES)
  cls_pc = torch.zeros(NUM_CLASSES)
  for s in range(4):
    # test.py unpacks 3 values from a function returning 4 (ValueError at
    # the reference's head); its evident intent is the first three.
    ious, fs, cls, vid_miou = metric_mod.calc_color_miou_fscore(
        torch.from_numpy(logits[s]), torch.from_numpy(labels[s])
    )
    out[f'scenario{s}_ious'] = ious.numpy()
    out[f'scenario{s}_fscores'] = fs.numpy()
    out[f'scenario{s}_cls_count'] = cls.numpy()
    out[f'scenario{s}_frame_miou'] = torch.stack(vid_miou).numpy()
    miou_pc += ious
    cls_pc += cls
    fs_pc += fs
    # test.py's running print (mean over present classes).
    b_iou = miou_pc / cls_pc
    b_iou[torch.isnan(b_iou)] = 0
    out[f'after{s}_running_miou'] = (
        torch.sum(b_iou) / torch.sum(cls_pc != 0)
    ).item()
    b_fs = fs_pc / cls_pc
    b_fs[torch.isnan(b_fs)] = 0
    out[f'after{s}_running_fscore'] = (
        torch.sum(b_fs) / torch.sum(cls_pc != 0)
    ).item()
    # test.py's final numbers, had the loop ended here.
    m = miou_pc / cls_pc
    m[torch.isnan(m)] = 0
    f_ = fs_pc / cls_pc
    f_[torch.isnan(f_)] = 0
    out[f'after{s}_miou_per_class'] = m.numpy()
    out[f'after{s}_fscore_per_class'] = f_.numpy()
    out[f'after{s}_miou'] = torch.mean(m).item()
    out[f'after{s}_miou_noBg'] = torch.mean(m[:-1]).item()
    out[f'after{s}_fscore'] = torch.mean(f_).item()
    out[f'after{s}_fscore_noBg'] = torch.mean(f_[:-1]).item()
    out[f'after{s}_num_classes_seen'] = int(torch.sum(cls_pc != 0).item())
  return out


def palette_fixture(tmp_dir, rng):
  """The reference palette and colour-PNG -> class-index conversion."""
  import color_dataloader as cd
  from PIL import Image

  path = os.path.join(tmp_dir, 'label2idx.json')
  with open(path, 'w') as f:
    json.dump({f'class{i}': i for i in range(NUM_CLASSES)}, f)
  pal = cd.get_v2_pallete(path, num_cls=NUM_CLASSES)
  idx = rng.integers(0, NUM_CLASSES, (24, 40))
  rgb = pal[idx].astype(np.uint8)
  rgb[0, 0] = (1, 2, 3)  # off-palette colour: no class matches -> argmax 0
  img = Image.fromarray(rgb)
  label = cd.color_mask_to_label(img, pal)
  resized = cd.color_mask_to_label(
      cd.resize_img(16, img, img_is_mask=True), pal
  )
  return {
      'palette': pal.astype(np.int64),
      'color_mask': rgb,
      'color_label': label.astype(np.int64),
      'color_label_resized16': resized.astype(np.int64),
  }


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--ref', default='/work/ref/AVSBench')
  p.add_argument('--out', default=OUT)
  args = p.parse_args()
  torch.set_num_threads(2)
  res_mod, pvt_mod = install_stubs(args.ref)
  import loss as loss_mod
  from utils import compute_color_metrics as metric_mod
  from easydict import EasyDict

  cfg = EasyDict(NUM_CLASSES=NUM_CLASSES)
  os.makedirs(args.out, exist_ok=True)

  def save(name, d):
    np.savez_compressed(os.path.join(args.out, name), **d)
    print(name, os.path.getsize(os.path.join(args.out, name)))

  v1 = np.array([1.0] * 5 + [0.0] * 5, np.float32)
  v1s = np.array([1.0] + [0.0] * 9, np.float32)
  save(
      'avss_resnet50_32.npz',
      forward_fixture(
          res_mod,
          loss_mod,
          metric_mod,
          cfg,
          'resnet50',
          32,
          32,
          10,
          {'v2': np.ones(T, np.float32)},
          seed=1,
      ),
  )
  save(
      'avss_pvt_v2_b5_32.npz',
      forward_fixture(
          pvt_mod,
          loss_mod,
          metric_mod,
          cfg,
          'pvt_v2_b5',
          32,
          32,
          5,
          {'v1m': v1, 'v1s': v1s},
          seed=2,
      ),
  )
  save(
      'avss_resnet50_train_32.npz',
      train_fixture(res_mod, loss_mod, cfg, 32, 32, seed=3),
  )
  rng = np.random.default_rng(4)
  d = metric_scenarios(metric_mod, rng)
  d.update(palette_fixture(args.out, rng))
  os.remove(os.path.join(args.out, 'label2idx.json'))
  save('avss_metrics.npz', d)


if __name__ == '__main__':
  main()
