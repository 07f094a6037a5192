"""The embedded demo: synthetic AVSBench on demand, and the report after training."""
import os

import jax

from avs_jax import data as data_lib
from avs_jax import utils


class SyntheticDataError(ValueError):
  """The synthetic data on disk was made with other parameters."""


def ensure_synthetic_data(config):
  """Generates the synthetic AVSBench and its shards unless already there.

  The generation parameters are recorded in both folders (`synthetic.json`);
  data made with other parameters (or by an older generator) is not reused:
  that raises SyntheticDataError naming the folders to delete. An interrupted
  generation or preparation is redone (resumed) on the next call.
  """
  import json  # pylint: disable=g-import-not-at-top
  from data_prep import avsbench, synthetic  # pylint: disable=g-import-not-at-top
  sc, dc = config.data.synthetic, config.data
  want = dict(version=synthetic.VERSION, clips=sc.clips, seed=sc.seed,
              size=sc.size)

  def recorded(folder, want):
    path = os.path.join(folder, 'synthetic.json')
    if not os.path.exists(path):
      return None
    with open(path) as f:
      have = json.load(f)
    if have != want:
      raise SyntheticDataError(
          f'{folder} holds synthetic data made with {have}, the config asks '
          f'for {want}: delete {dc.dir} and {sc.root}, or point '
          f'--config.data.dir and --config.data.synthetic.root elsewhere')
    return have

  def record(folder, want):
    with open(os.path.join(folder, 'synthetic.json'), 'w') as f:
      json.dump(want, f)

  want_raw = dict(want, settings=[dc.setting])
  want_shards = dict(want, setting=dc.setting)
  if recorded(dc.dir, want_shards):
    data_lib.num_examples(dc.dir, dc.setting, 'train')  # readable
    return
  if jax.process_index() != 0:
    raise RuntimeError('prepare the synthetic data on process 0 first')
  if not recorded(sc.root, want_raw):  # absent, or an interrupted generation
    utils.log(f'generating {sc.clips} synthetic clips in {sc.root}')
    synthetic.generate(sc.root, sc.clips, seed=sc.seed, size=sc.size,
                       settings=(dc.setting,))
    record(sc.root, want_raw)
  utils.log(f'preparing shards in {dc.dir}')
  errors, _ = avsbench.prepare(sc.root, dc.setting, dc.dir)
  if errors:
    raise RuntimeError(f'{len(errors)} synthetic clips failed to prepare; see '
                       f'{dc.dir}/errors.jsonl')
  record(dc.dir, want_shards)


def _curve_png(workdir, path):
  import json  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  loss = [(r['step'], r['loss']) for r in rows if 'loss' in r]
  val = [(r['step'], r['val_miou']) for r in rows if 'val_miou' in r]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  if loss:
    ax.plot(*zip(*loss), label='train loss', color='tab:blue')
  ax.set_xlabel('step')
  ax.set_ylabel('loss')
  ax2 = ax.twinx()
  if val:
    ax2.plot(*zip(*val), 'o-', label='val J', color='tab:red')
  ax2.set_ylabel('val J')
  ax2.set_ylim(0, 1)
  fig.legend(loc='upper center', ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _grid_png(config, workdir, ckpt, path, num_clips=3):
  """Rows per clip: frames, ground-truth mask, predicted mask (5 columns)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from avs_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from avs_jax import evaluate, train  # pylint: disable=g-import-not-at-top
  from avs_jax.models import build_model, build_vggish  # pylint: disable=g-import-not-at-top
  del workdir
  model = build_model(config.model)
  vggish = build_vggish()
  restored, _ = ckpt_lib.load_state(ckpt)
  audio_vars = train.load_audio_variables(config, vggish)
  batch = next(iter(data_lib.eval_dataset(
      config.data.dir, config.data.setting, config.eval.split,
      batch_size=num_clips, image_size=config.data.image_size)))
  audio = vggish.apply(audio_vars, batch['log_mel'])
  out = model.apply({'params': restored['params'],
                     'batch_stats': restored['batch_stats']},
                    batch['frames'], audio)
  pred = np.asarray(out['logits']) > 0
  frames = evaluate.denormalize(np.asarray(batch['frames']))
  n = int(np.sum(batch['valid']))
  t = frames.shape[1]
  fig, axes = plt.subplots(3 * n, t, figsize=(1.6 * t, 1.6 * 3 * n),
                           squeeze=False)
  for c in range(n):
    for j in range(t):
      rows = [(frames[c, j], 'frame'),
              (batch['masks'][c, j], 'truth'),
              (pred[c, j].astype(np.float32), 'prediction')]
      for r, (img, label) in enumerate(rows):
        ax = axes[3 * c + r, j]
        ax.imshow(img, cmap='gray' if img.ndim == 2 else None,
                  vmin=0, vmax=1 if img.ndim == 2 else None)
        ax.set_xticks([])
        ax.set_yticks([])
        if j == 0:
          ax.set_ylabel(f'{label}', fontsize=7)
      axes[3 * c, j].set_title(f'{batch["id"][c]} s{j + 1}', fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def report(config, workdir):
  """Test J/F with true, shuffled and silent audio, pictures, `report.md`."""
  import json  # pylint: disable=g-import-not-at-top
  from avs_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from avs_jax import evaluate  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return None
  directory, _ = ckpt_lib.resolve(workdir)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.CheckpointManager(directory, item_names=('state', 'data')) as mngr:
    step = ckpt_lib.best_step(mngr)
  ckpt = os.path.join(directory, str(step))
  split = config.eval.split
  res = {}
  for audio in ('true', 'shuffled', 'silent'):
    name = f'eval_{split}.json' if audio == 'true' else \
        f'eval_{split}_{audio}.json'
    path = os.path.join(workdir, name)
    if os.path.exists(path) and json.load(open(path))['checkpoint_step'] == step:
      res[audio] = json.load(open(path))
    else:
      res[audio] = evaluate.evaluate_checkpoint(config, workdir, ckpt,
                                                split=split, audio=audio)
  _curve_png(workdir, os.path.join(workdir, 'training_curve.png'))
  _grid_png(config, workdir, ckpt, os.path.join(workdir, 'test_grid.png'))
  drop = res['true']['miou'] - res['shuffled']['miou']
  lines = [
      f'# avs_jax demo report ({config.data.setting}, synthetic)', '',
      f'Best checkpoint: step {step} (by validation J). Test split: '
      f'{res["true"]["num_clips"]} clips.', '',
      '| audio | J (mIoU) | F | J per-frame | F per-frame |',
      '| --- | --- | --- | --- | --- |']
  for audio in ('true', 'shuffled', 'silent'):
    r = res[audio]
    lines.append(f'| {audio} | {r["miou"]:.4f} | {r["fscore"]:.4f} | '
                 f'{r["miou_per_frame"]:.4f} | {r["fscore_per_frame"]:.4f} |')
  lines += ['', f'J drop with shuffled audio: {drop:.4f} (the model uses sound '
            'when this is large).', '',
            '![training curve](training_curve.png)', '',
            '![test clips: frames, ground truth, prediction](test_grid.png)', '']
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write('\n'.join(lines))
  utils.log(f'report: {os.path.join(workdir, "report.md")} (J {res["true"]["miou"]:.4f}, '
            f'shuffled {res["shuffled"]["miou"]:.4f}, silent '
            f'{res["silent"]["miou"]:.4f})')
  return res
