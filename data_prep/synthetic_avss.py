r"""Synthetic AVSBench-semantic: AVSS-layout clips whose labels need the audio.

The objects and sounds of `data_prep.synthetic` (8 classes, each with its own
look and its own sound band) in the AVSBench-semantic layout
(`data_prep/avss.py`): class `synthetic.CLASSES[i]` is index i + 1 of
`label2idx.json` (0 the background; indices 9..70 are unused names, so the
file has the 71 entries of AVSBench-semantic). Each clip shows 2-4 objects;
only the sounding ones are labelled, with their class, so which objects to
label comes from the audio alone (their class from the look).

Subsets as in AVSBench-semantic: `v1s` (5 frames, one source for the whole
clip; train clips label only frame 0), `v1m` (5 frames, 1-2 sources, each
silent in a second with probability `synthetic.MS3_PAUSE`), `v2` (10 frames,
as v1m). Clip i is v1s, v1m, v2 in turn; splits 70/15/15 by index.

  python -m data_prep.synthetic_avss --out /tmp/avss_synth --clips 60

`ensure_synthetic_data(config)` gives the AVSS demo (`configs/
synthetic_avss.py`) its tree and shards: made once, reused while the
parameters match.
"""

import argparse
import csv
import json
import multiprocessing
import os
import sys

import jax
import numpy as np
from PIL import Image
import soundfile
import tqdm

from avs_jax import avss
from avs_jax import data as data_lib
from avs_jax import utils
from data_prep import avsbench
from data_prep import synthetic

GENERATOR_VERSION = 1  # bump when the clips change
SUBSET_CYCLE = ('v1s', 'v1m', 'v2')


def class_names():
  """The 71 names of label2idx.json: background, the 8 classes, unused."""
  names = ['background'] + [c.name for c in synthetic.CLASSES]
  return names + [f'unused_{i}' for i in range(len(names), avss.NUM_CLASSES)]


def sounding(rng, num_objects, subset, num_frames):
  """Per second, the set of sounding object indices (see the module doc)."""
  if subset == 'v1s':
    return [{int(rng.integers(num_objects))}] * num_frames
  count = min(int(rng.choice((1, 2), p=(0.4, 0.6))), num_objects)
  sources = rng.choice(num_objects, count, replace=False).tolist()
  return [
      {k for k in sources if rng.random() >= synthetic.MS3_PAUSE}
      for _ in range(num_frames)
  ]


def make_clip(seed, index, size):
  """One clip: subset, frames uint8 [T, S, S, 3], labels uint8 [T, S, S]
  (class indices of the sounding objects), audio int16 [T * 16000]."""
  subset = SUBSET_CYCLE[index % len(SUBSET_CYCLE)]
  t = 10 if subset == 'v2' else 5
  rng = np.random.default_rng([seed, 71, index])
  num = int(rng.integers(2, 5))
  picks = rng.choice(len(synthetic.CLASSES), num, replace=False)
  classes = [synthetic.CLASSES[i] for i in picks]
  objects = synthetic._place_objects(rng, classes, size, t)  # pylint: disable=protected-access
  frames, masks = synthetic.render_clip(rng, objects, size, t)
  on = sounding(rng, len(objects), subset, t)
  index_of = {c.name: i + 1 for i, c in enumerate(synthetic.CLASSES)}
  labels = np.zeros((t, size, size), np.uint8)
  for j, now in enumerate(on):
    for k in now:
      labels[j][masks[j, k]] = index_of[objects[k].cls.name]
  return dict(
      subset=subset,
      frames=frames,
      labels=labels,
      audio=synthetic.mix_audio(rng, objects, on),
  )


def write_clip(root, seed, index, num_clips, size):
  """Writes clip `index`; returns its metadata.csv row."""
  clip = make_clip(seed, index, size)
  split = synthetic.split_of(index, num_clips)
  subset, uid = clip['subset'], f'avss_{index:05d}'
  folder = os.path.join(root, subset, uid)
  os.makedirs(os.path.join(folder, 'frames'), exist_ok=True)
  os.makedirs(os.path.join(folder, 'labels_rgb'), exist_ok=True)
  labelled = (
      1 if (subset == 'v1s' and split == 'train') else len(clip['labels'])
  )
  pal = avss.palette()
  for i, frame in enumerate(clip['frames']):
    Image.fromarray(frame).save(
        os.path.join(folder, 'frames', f'{i}.jpg'), quality=95
    )
    if i < labelled:
      Image.fromarray(pal[clip['labels'][i]]).save(
          os.path.join(folder, 'labels_rgb', f'{i}.png'), compress_level=1
      )
  soundfile.write(
      os.path.join(folder, 'audio.wav'),
      clip['audio'],
      synthetic.SAMPLE_RATE,
      subtype='PCM_16',
  )
  return dict(vid=index, uid=uid, split=split, label=subset)


def _write_job(args):
  return write_clip(*args)


def generate(root, num_clips, seed=0, size=64, workers=None):
  """Writes `num_clips` clips, metadata.csv and label2idx.json under `root`."""
  os.makedirs(root, exist_ok=True)
  jobs = [(root, seed, i, num_clips, size) for i in range(num_clips)]
  workers = workers or os.cpu_count() or 1
  ctx = multiprocessing.get_context('spawn')  # safe beside JAX's threads
  with ctx.Pool(workers) if workers > 1 else synthetic._NoPool() as pool:  # pylint: disable=protected-access
    rows = list(
        tqdm.tqdm(
            pool.imap(_write_job, jobs, chunksize=4),
            total=len(jobs),
            desc='synthetic AVSS clips',
            unit='clip',
        )
    )
  with open(os.path.join(root, 'label2idx.json'), 'w') as f:
    json.dump({n: i for i, n in enumerate(class_names())}, f, indent=0)
  with open(os.path.join(root, 'metadata.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, ['vid', 'uid', 'split', 'label'])
    writer.writeheader()
    writer.writerows(rows)


def ensure_synthetic_data(config):
  """Generates the synthetic AVSBench-semantic tree and its shards unless
  already there (`config.data`: dir, synthetic.{root, clips, seed, size});
  data made with other parameters raises synthetic.SyntheticDataError."""
  sc, dc = config.data.synthetic, config.data
  want = dict(
      version=GENERATOR_VERSION,
      clips=sc.clips,
      seed=sc.seed,
      size=sc.size,
      setting='avss',
  )
  if synthetic._recorded(dc.dir, want, config):  # pylint: disable=protected-access
    data_lib.num_examples(dc.dir, 'avss', 'train')  # readable
    return
  if jax.process_index() != 0:
    raise RuntimeError('prepare the synthetic data on process 0 first')
  if not synthetic._recorded(sc.root, want, config):  # pylint: disable=protected-access
    utils.log(f'generating {sc.clips} synthetic AVSS clips in {sc.root}')
    generate(sc.root, sc.clips, seed=sc.seed, size=sc.size)
    synthetic._record(sc.root, want)  # pylint: disable=protected-access
  utils.log(f'preparing shards in {dc.dir}')
  errors, _ = avsbench.prepare(sc.root, 'avss', dc.dir)
  if errors:
    raise RuntimeError(
        f'{len(errors)} synthetic clips failed to prepare; see '
        f'{dc.dir}/errors.jsonl'
    )
  synthetic._record(dc.dir, want)  # pylint: disable=protected-access


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m data_prep.synthetic_avss',
      description=__doc__.split('\n')[0],
  )
  parser.add_argument('--out', required=True, help='root to write')
  parser.add_argument('--clips', type=int, default=60, help='clips, >= 3')
  parser.add_argument('--seed', type=int, default=0, help='random seed')
  parser.add_argument('--size', type=int, default=64, help='pixels, >= 32')
  parser.add_argument('--workers', type=int, default=0, help='processes')
  args = parser.parse_args(argv)
  if args.clips < 3 or args.size < 32:
    parser.exit(2, 'error: --clips must be >= 3 and --size >= 32\n')
  generate(args.out, args.clips, args.seed, args.size, args.workers or None)
  print(
      f'wrote {args.clips} AVSS clips ({args.size}x{args.size}) to {args.out}'
  )


if __name__ == '__main__':
  sys.exit(main())
