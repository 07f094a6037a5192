"""Evaluation: J and F (reference and per-frame), masks and overlays as PNG.

`eval.audio` evaluates the same model with broken audio, the measure of how
much it uses sound: 'shuffled' gives each clip the audio of another clip of
the split (the next valid clip of the batch, or the previous batch's when a
batch holds one clip); 'silent' feeds the log-mel of a zero waveform
(`log(0 + 0.01)` in every bin).
"""
import json
import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from avs_jax import checkpoint as ckpt_lib
from avs_jax import data as data_lib
from avs_jax import metrics as metrics_lib
from avs_jax import utils

SILENT_LOG_MEL = float(np.log(0.01))
AUDIO_MODES = ('true', 'shuffled', 'silent')


def break_audio(log_mel, valid, mode, previous=None):
  """Applies `eval.audio` to a host batch's `log_mel [B, T, 96, 64]`."""
  if mode == 'true':
    return log_mel
  if mode == 'silent':
    return np.full_like(log_mel, SILENT_LOG_MEL)
  if mode != 'shuffled':
    raise ValueError(f'eval.audio must be one of {AUDIO_MODES}, got {mode!r}')
  out = log_mel.copy()
  idx = np.flatnonzero(valid)
  if len(idx) > 1:
    out[idx] = log_mel[np.roll(idx, -1)]
  elif len(idx) == 1 and previous is not None:
    out[idx] = previous[0]
  return out


def denormalize(frames):
  """ImageNet-normalised `[..., 3]` floats -> uint8 RGB."""
  x = frames * np.asarray(data_lib.IMAGENET_STD) + np.asarray(
      data_lib.IMAGENET_MEAN)
  return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def overlay(frame, mask, color=(255, 40, 40), alpha=0.5, edge=(255, 255, 255)):
  """`frame [H, W, 3] uint8`, `mask [H, W] bool` -> blended uint8 image.

  The mask is tinted with `color` and outlined with `edge`, so that it shows
  on objects of the tint's colour too.
  """
  out = frame.astype(np.float32)
  out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, np.float32)
  inner = mask.copy()
  inner[1:] &= mask[:-1]
  inner[:-1] &= mask[1:]
  inner[:, 1:] &= mask[:, :-1]
  inner[:, :-1] &= mask[:, 1:]
  out[mask & ~inner] = edge
  return out.astype(np.uint8)


class Evaluator:
  """Runs a split through the model in eval mode and accumulates metrics."""

  def __init__(self, config, model, vggish, mesh):
    self.config = config
    self.model = model
    self.vggish = vggish
    self.mesh = mesh
    self.sharding = NamedSharding(mesh, P('data'))
    replicated = NamedSharding(mesh, P())

    def step(params, batch_stats, audio_vars, batch):
      audio = vggish.apply(audio_vars, batch['log_mel'])
      out = model.apply({'params': params, 'batch_stats': batch_stats},
                        batch['frames'], audio, train=False)
      m = metrics_lib.clip_metrics(out['logits'], batch['masks'],
                                   batch['valid'])
      return m, out['logits']

    self._step = jax.jit(step, out_shardings=(replicated, self.sharding))
    self.audio_vars = None

  def run(self, state, setting, split, *, audio=None, out_dir=None, desc=''):
    """Metrics of `split` (dict of `summarize`); optional PNGs to `out_dir`."""
    c = self.config
    audio = audio or 'true'
    if self.audio_vars is None:
      from avs_jax import train  # pylint: disable=g-import-not-at-top
      self.audio_vars = jax.device_put(
          train.load_audio_variables(c, self.vggish),
          NamedSharding(self.mesh, P()))
    nproc = jax.process_count()
    bs = c.eval.batch_size
    if bs % jax.device_count():
      raise ValueError(f'eval.batch_size={bs} must be a multiple of the '
                       f'device count {jax.device_count()}')
    ds = data_lib.eval_dataset(c.data.dir, setting, split,
                               batch_size=bs // nproc,
                               image_size=c.data.image_size,
                               num_workers=c.data.num_workers,
                               process_index=jax.process_index(),
                               process_count=nproc)
    total = -(-data_lib.num_examples(c.data.dir, setting, split) // bs)
    acc, previous = None, None
    bar = utils.progress(total, 0, desc or f'eval {split}')
    for host in ds:
      log_mel = break_audio(host['log_mel'], host['valid'], audio, previous)
      previous = host['log_mel'][np.asarray(host['valid'], bool)] \
          if np.any(host['valid']) else previous
      host = dict(host, log_mel=log_mel)
      batch = {k: jax.make_array_from_process_local_data(
          self.sharding, np.asarray(host[k]))
               for k in ('frames', 'log_mel', 'masks', 'valid')}
      m, logits = self._step(state.params, state.batch_stats, self.audio_vars,
                             batch)
      acc = metrics_lib.merge_metrics(acc, m)
      if out_dir is not None:
        self._save_pngs(out_dir, host, logits)
      bar.update(1)
    bar.close()
    return metrics_lib.summarize(acc)

  def _save_pngs(self, out_dir, host, logits):
    ec = self.config.eval
    local = np.concatenate([np.asarray(s.data) for s in sorted(
        logits.addressable_shards, key=lambda s: s.index[0].start or 0)])
    pred = local > 0  # sigmoid > 0.5
    frames = denormalize(np.asarray(host['frames']))
    for b, valid in enumerate(host['valid']):
      if not valid:
        continue
      cid = str(host['id'][b])
      d = os.path.join(out_dir, cid)
      os.makedirs(d, exist_ok=True)
      for t in range(pred.shape[1]):
        if ec.save_masks:
          Image.fromarray(pred[b, t].astype(np.uint8) * 255).save(
              os.path.join(d, f'{cid}_{t + 1}_mask.png'))
        if ec.save_overlays:
          Image.fromarray(overlay(frames[b, t], pred[b, t])).save(
              os.path.join(d, f'{cid}_{t + 1}_overlay.png'))


class EvalState:
  """What the evaluator needs of a train state."""

  def __init__(self, params, batch_stats):
    self.params = params
    self.batch_stats = batch_stats


def evaluate_checkpoint(config, workdir, path, split=None, audio=None):
  """Restores `path` and writes `WORKDIR/eval_{split}[_{audio}].json`."""
  from avs_jax import train  # pylint: disable=g-import-not-at-top
  from avs_jax.models import build_model, build_vggish  # pylint: disable=g-import-not-at-top
  split = split or config.eval.split
  audio = audio or config.eval.audio
  mesh = train.make_mesh()
  dtype = train.dtype_of(config)
  model = build_model(config.model, dtype=dtype)
  vggish = build_vggish(postprocess=config.audio.postprocess, dtype=dtype)
  restored, step = ckpt_lib.load_state(path)
  replicated = NamedSharding(mesh, P())
  state = EvalState(jax.device_put(restored['params'], replicated),
                    jax.device_put(restored['batch_stats'], replicated))
  evaluator = Evaluator(config, model, vggish, mesh)
  save = config.eval.save_masks or config.eval.save_overlays
  out_dir = os.path.join(workdir, f'predictions_{split}') if save else None
  res = evaluator.run(state, config.data.setting, split, audio=audio,
                      out_dir=out_dir)
  res = dict(res, checkpoint_step=int(step), split=split, audio=audio)
  name = f'eval_{split}.json' if audio == 'true' else \
      f'eval_{split}_{audio}.json'
  if jax.process_index() == 0:
    with open(os.path.join(workdir, name), 'w') as f:
      json.dump(res, f, indent=2)
  utils.log(f'{split} ({audio} audio, step {step}): J {res["miou"]:.4f} '
            f'F {res["fscore"]:.4f} | per-frame J {res["miou_per_frame"]:.4f} '
            f'F {res["fscore_per_frame"]:.4f} | {res["num_clips"]} clips -> '
            f'{os.path.join(workdir, name)}')
  return res



