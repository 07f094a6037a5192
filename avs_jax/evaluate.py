"""Evaluation: J and F (reference and per-frame), PNGs, and the demo report.

`eval.audio` evaluates the same model with broken audio, the measure of how
much it uses sound: 'shuffled' gives each clip the audio of another clip of
the split (the next valid clip of the batch, or the previous batch's when a
batch holds one clip); 'silent' feeds the log-mel of a zero waveform
(`log(0 + 0.01)` in every bin).
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from avs_jax import avss
from avs_jax import checkpoint as ckpt_lib
from avs_jax import data as data_lib
from avs_jax import draw
from avs_jax import metrics as metrics_lib
from avs_jax import runtime
from avs_jax import utils

SILENT_LOG_MEL = float(np.log(0.01))
AUDIO_MODES = ('true', 'shuffled', 'silent')


def break_audio(audio, valid, mode, previous=None, silent=None):
  """Applies `eval.audio` to a host batch's `log_mel [B, T, 96, 64]`, or to
  its VGGish embeddings `[B, T, 128]` given the embedding of silence
  (`silent`, `[128]`)."""
  if mode == 'true':
    return audio
  if mode == 'silent':
    if silent is None:
      return np.full_like(audio, SILENT_LOG_MEL)
    return np.broadcast_to(silent, audio.shape).astype(audio.dtype)
  if mode != 'shuffled':
    raise ValueError(f'eval.audio must be one of {AUDIO_MODES}, got {mode!r}')
  out = audio.copy()
  idx = np.flatnonzero(valid)
  if len(idx) > 1:
    out[idx] = audio[np.roll(idx, -1)]
  elif len(idx) == 1 and previous is not None:
    out[idx] = previous[0]
  return out


def eval_step(variables, audio_vars, batch, *, model, vggish):
  """Metrics of one global batch and its predictions (audio: `log_mel`, or
  precomputed VGGish embeddings `audio`).

  S4/MS3: `metrics.clip_metrics` and the logits `[B, T, H, W]`. AVSS (the
  batch has `labels`): `metrics.avss_clip_metrics` and the predicted class
  indices `[B, T, H, W]` (argmax; padded frames are background).
  """
  out = runtime.forward(
      model,
      vggish,
      variables,
      audio_vars,
      batch['frames'],
      batch['audio'] if 'audio' in batch else batch['log_mel'],
      batch.get('frame_mask'),
  )
  if 'labels' in batch:
    m = metrics_lib.avss_clip_metrics(
        out['logits'], batch['labels'], batch['valid']
    )
    return m, jnp.argmax(out['logits'], axis=-1).astype(jnp.int32)
  m = metrics_lib.clip_metrics(out['logits'], batch['masks'], batch['valid'])
  return m, out['logits']


def jit_eval_step(model, vggish, mesh):
  """The jitted `eval_step`: metrics replicated, predictions split over
  `mesh`'s `data` axis (inputs: as their arrays are sharded)."""
  return jax.jit(
      functools.partial(eval_step, model=model, vggish=vggish),
      out_shardings=(runtime.replicated(mesh), runtime.batch_sharding(mesh)),
  )


class Evaluator:
  """Runs a split through the model in eval mode and accumulates metrics."""

  def __init__(self, config, model, vggish, mesh, audio_vars):
    self.config = config
    self.vggish, self.audio_vars = vggish, audio_vars
    self.tables = {}  # (setting, split) -> {clip id: [T, 128]}
    self.sharding = runtime.batch_sharding(mesh)
    self.step = utils.CompileThenMeet(
        jit_eval_step(model, vggish, mesh), 'eval step'
    )

  def run(
      self, variables, setting, split, *, audio='true', out_dir=None, desc=''
  ):
    """Metrics of `split` (dict of `summarize`); optional PNGs to `out_dir`."""
    c = self.config
    bs, nproc = c.eval.batch_size, jax.process_count()
    if bs % jax.device_count():
      raise ValueError(
          f'eval.batch_size={bs} must be a multiple of the '
          f'device count {jax.device_count()}'
      )
    ds = data_lib.eval_dataset(
        c.data.dir,
        setting,
        split,
        batch_size=bs // nproc,
        image_size=c.data.image_size,
        num_workers=c.data.num_workers,
        process_index=jax.process_index(),
        process_count=nproc,
    )
    total = -(-data_lib.num_examples(c.data.dir, setting, split) // bs)
    table, silent = self._embeddings(setting, split, audio)
    acc, previous = None, None
    for host in utils.progress(total, 0, desc or f'eval {split}', iterable=ds):
      if table is not None:  # embeddings in place of log-mel, same step
        host = runtime.with_audio(host, table)
      key = 'log_mel' if table is None else 'audio'
      x = break_audio(host[key], host['valid'], audio, previous, silent)
      if np.any(host['valid']):
        previous = host[key][np.asarray(host['valid'], bool)]
      batch = runtime.to_device(dict(host, **{key: x}), self.sharding)
      m, pred = self.step(variables, self.audio_vars, batch)
      acc = metrics_lib.merge_metrics(acc, m)
      if out_dir is not None and setting == 'avss':
        save_avss_pngs(out_dir, host, local_rows(pred), c.eval)
      elif out_dir is not None:
        save_pngs(out_dir, host, local_rows(pred) > 0, c.eval)
    if setting == 'avss':
      return metrics_lib.avss_summarize(acc, avss.class_names(c.data))
    return metrics_lib.summarize(acc)

  def _embeddings(self, setting, split, audio):
    """`(table, silent)`: with `audio.precompute`, the split's VGGish
    embeddings (computed once per split) and, for silent audio, the
    embedding of silence `[128]`; else `(None, None)`."""
    if not self.config.audio.precompute:
      return None, None
    if (setting, split) not in self.tables:
      self.tables[setting, split] = runtime.embedding_table(
          self.config, self.vggish, self.audio_vars, split, setting
      )
    silent = None
    if audio == 'silent':
      embed = runtime.local_embedder(self.vggish, self.audio_vars)
      silent = embed(np.full((1, 1, 96, 64), SILENT_LOG_MEL, np.float32))[0, 0]
    return self.tables[setting, split], silent


def local_rows(x):
  """This process's rows of a global `[B, ...]` array, in order (numpy)."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  rows, seen = [], set()
  for s in shards:
    start = s.index[0].start or 0
    if start not in seen:  # replicas of one row block
      seen.add(start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows)


def save_pngs(out_dir, host, pred, ec):
  """Masks / overlays of a host batch's valid clips (`pred [B, T, H, W]`)."""
  frames = draw.denormalize(np.asarray(host['frames']))
  for b, valid in enumerate(host['valid']):
    if not valid:
      continue
    cid = str(host['id'][b])
    d = os.path.join(out_dir, cid)
    os.makedirs(d, exist_ok=True)
    for t in range(pred.shape[1]):
      if ec.save_masks:
        Image.fromarray(pred[b, t].astype(np.uint8) * 255).save(
            os.path.join(d, f'{cid}_{t + 1}_mask.png')
        )
      if ec.save_overlays:
        Image.fromarray(draw.overlay(frames[b, t], pred[b, t])).save(
            os.path.join(d, f'{cid}_{t + 1}_overlay.png')
        )


def save_avss_pngs(out_dir, host, pred, ec):
  """AVSS: coloured masks (the official palette) / colour overlays of a host
  batch's valid clips, real frames only (`pred [B, T, H, W]` classes)."""
  frames = draw.denormalize(np.asarray(host['frames']))
  pal = avss.palette()
  for b, valid in enumerate(host['valid']):
    if not valid:
      continue
    cid = str(host['id'][b])
    d = os.path.join(out_dir, cid)
    os.makedirs(d, exist_ok=True)
    for t in np.flatnonzero(host['frame_mask'][b]):
      if ec.save_masks:
        Image.fromarray(pal[pred[b, t]]).save(
            os.path.join(d, f'{cid}_{t + 1}_mask.png')
        )
      if ec.save_overlays:
        Image.fromarray(draw.color_overlay(frames[b, t], pred[b, t], pal)).save(
            os.path.join(d, f'{cid}_{t + 1}_overlay.png')
        )


def result_name(split, audio):
  return (
      f'eval_{split}.json' if audio == 'true' else f'eval_{split}_{audio}.json'
  )


def evaluate_checkpoint(config, workdir, path, split=None, audio=None):
  """Restores `path` and writes `WORKDIR/eval_{split}[_{audio}].json`."""
  restored = runtime.Inference(config, path)
  return _evaluate(
      config,
      workdir,
      restored,
      _evaluator(config, restored),
      split or config.eval.split,
      audio or config.eval.audio,
  )


def _evaluator(config, restored):
  return Evaluator(
      config,
      restored.model,
      restored.vggish,
      restored.mesh,
      restored.audio_vars,
  )


def _evaluate(config, workdir, restored, evaluator, split, audio, pngs=True):
  """Evaluates the restored model, writes the JSON; PNGs (if configured and
  `pngs`) to `predictions_{split}[_{audio}]`."""
  ec = config.eval
  out_dir = None
  if pngs and (ec.save_masks or ec.save_overlays):
    name = f'predictions_{split}' + ('' if audio == 'true' else f'_{audio}')
    out_dir = os.path.join(workdir, name)
  res = evaluator.run(
      restored.variables,
      config.data.setting,
      split,
      audio=audio,
      out_dir=out_dir,
  )
  res = dict(res, checkpoint_step=int(restored.step), split=split, audio=audio)
  out = os.path.join(workdir, result_name(split, audio))
  if jax.process_index() == 0:
    with open(out, 'w') as f:
      json.dump(res, f, indent=2)
  utils.log(
      f'{split} ({audio} audio, step {restored.step}): {_summary(res)} | '
      f'{res["num_clips"]} clips -> {out}'
  )
  return res


def _summary(res):
  """The headline numbers of an evaluation, one line."""
  if 'per_class' in res:  # AVSS
    return (
        f'mIoU {res["miou"]:.4f} F {res["fscore"]:.4f} (the official mean '
        f'over all {len(res["per_class"])} classes) | over the '
        f'{res["num_classes_seen"]} classes present: mIoU '
        f'{res["miou_present"]:.4f} F {res["fscore_present"]:.4f}'
    )
  return (
      f'J {res["miou"]:.4f} F {res["fscore"]:.4f} | per-frame J '
      f'{res["miou_per_frame"]:.4f} F {res["fscore_per_frame"]:.4f}'
  )


def report(config, workdir, results):
  """The demo report: test J/F with true, shuffled and silent audio, pictures.

  `results`: the test results with true audio (what `train_and_evaluate`
  returns); its checkpoint is evaluated with broken audio too. Every process
  computes, process 0 writes `training_curve.png`, `test_grid.png` and
  `report.md`.
  """
  step = results['checkpoint_step']
  ckpt = os.path.join(workdir, 'checkpoints', str(step))
  res = {'true': results}
  restored = runtime.Inference(config, ckpt)
  evaluator = _evaluator(config, restored)  # one VGGish pass (precompute)
  split = config.eval.split
  for audio in AUDIO_MODES[1:]:  # pictures only of the true audio's masks
    res[audio] = _evaluate(
        config, workdir, restored, evaluator, split, audio, pngs=False
    )
  grid = _grid_arrays(config, ckpt)
  if jax.process_index() == 0:
    draw.training_curve(
        os.path.join(workdir, 'metrics.jsonl'),
        os.path.join(workdir, 'training_curve.png'),
    )
    draw.clip_grid(*grid, os.path.join(workdir, 'test_grid.png'))
    with open(os.path.join(workdir, 'report.md'), 'w') as f:
      if config.data.setting == 'avss':
        f.write(avss_report_markdown(config, step, res))
      else:
        f.write(report_markdown(config, step, res))
  utils.log(
      f'report: {os.path.join(workdir, "report.md")} (J '
      f'{res["true"]["miou"]:.4f}, shuffled {res["shuffled"]["miou"]:.4f}'
      f', silent {res["silent"]["miou"]:.4f})'
  )
  return res


def _grid_arrays(config, ckpt, num_clips=3):
  """Frames, truth, prediction, ids of the split's first clips (host-local)."""
  restored = runtime.Inference(config, ckpt, mesh=runtime.local_mesh())
  batch = next(
      iter(
          data_lib.eval_dataset(
              config.data.dir,
              config.data.setting,
              config.eval.split,
              batch_size=num_clips,
              image_size=config.data.image_size,
          )
      )
  )
  logits = np.asarray(
      restored.logits(
          batch['frames'], batch['log_mel'], batch.get('frame_mask')
      )
  )
  n = int(np.sum(batch['valid']))
  if config.data.setting == 'avss':  # colour pictures of the classes
    pal = avss.palette(logits.shape[-1])
    truth, pred = pal[batch['labels']], pal[np.argmax(logits, -1)]
  else:
    truth, pred = batch['masks'], logits > 0
  return (
      draw.denormalize(np.asarray(batch['frames']))[:n],
      truth[:n],
      pred[:n],
      batch['id'][:n],
  )


def report_markdown(config, step, res):
  """`report.md` of the three evaluations `res[audio]`."""
  drop = res['true']['miou'] - res['shuffled']['miou']
  lines = [
      f'# avs_jax demo report ({config.data.setting}, synthetic)',
      '',
      f'Best checkpoint: step {step} (by validation J). Test split: '
      f'{res["true"]["num_clips"]} clips.',
      '',
      '| audio | J (mIoU) | F | J per-frame | F per-frame |',
      '| --- | --- | --- | --- | --- |',
  ]
  for audio in AUDIO_MODES:
    r = res[audio]
    lines.append(
        f'| {audio} | {r["miou"]:.4f} | {r["fscore"]:.4f} | '
        f'{r["miou_per_frame"]:.4f} | {r["fscore_per_frame"]:.4f} |'
    )
  lines += [
      '',
      f'J drop with shuffled audio: {drop:.4f} (the model uses sound '
      'when this is large).',
      '',
      '![training curve](training_curve.png)',
      '',
      '![test clips: frames, ground truth, prediction](test_grid.png)',
      '',
  ]
  return '\n'.join(lines)


def avss_report_markdown(config, step, res):
  """`report.md` of an AVSS run: the three evaluations `res[audio]`, and the
  classes present in the test split with true audio."""
  del config
  drop = res['true']['miou_present'] - res['shuffled']['miou_present']
  lines = [
      '# avs_jax demo report (avss, synthetic AVSBench-semantic)',
      '',
      f'Best checkpoint: step {step} (by validation mIoU). Test split: '
      f'{res["true"]["num_clips"]} clips.',
      '',
      'mIoU and F: the official AVSS metric (mean over all 71 classes, a '
      'class absent from the split counting 0); "present": the mean over '
      'the classes that occur in the ground truth or the prediction.',
      '',
      '| audio | mIoU | F | mIoU present | F present | mIoU without bg |',
      '| --- | --- | --- | --- | --- | --- |',
  ]
  for audio in AUDIO_MODES:
    r = res[audio]
    lines.append(
        f'| {audio} | {r["miou"]:.4f} | {r["fscore"]:.4f} | '
        f'{r["miou_present"]:.4f} | {r["fscore_present"]:.4f} | '
        f'{r["miou_fg"]:.4f} |'
    )
  lines += [
      '',
      f'mIoU (present) drop with shuffled audio: {drop:.4f}.',
      '',
      '| class | mIoU | F | frames |',
      '| --- | --- | --- | --- |',
  ]
  for c in res['true']['per_class']:
    if c['frames']:
      lines.append(
          f'| {c["name"]} | {c["miou"]:.4f} | {c["fscore"]:.4f} | '
          f'{c["frames"]} |'
      )
  lines += [
      '',
      '![training curve](training_curve.png)',
      '',
      '![test clips: frames, ground truth, prediction](test_grid.png)',
      '',
  ]
  return '\n'.join(lines)
