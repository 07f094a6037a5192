r"""Input pipeline throughput: clips/s decoding one epoch of training batches.

  python -m data_prep.synthetic --out /tmp/avs_synth224 --clips 300 --size 224
  python -m data_prep.avsbench --root /tmp/avs_synth224 --setting ms3 \
      --out /tmp/avs_tfds224
  python bench/input_pipeline.py --data_dir /tmp/avs_tfds224 --setting ms3 \
      --image_size 224 --workers 2

Times `train_dataset` (shard interleave, window shuffle, PNG decode, resize,
normalise, batch) for one epoch of the split after the first batch (worker
start-up is reported separately). With --workers 0 the decoding runs in this
process, and clips per CPU-second of this process are reported too (a figure
that other load on the machine does not lower).
"""

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable-next=g-import-not-at-top,wrong-import-position
from avs_jax import data


def run(data_dir, setting, image_size, batch_size, workers, epochs=1.0):
  """Returns (start-up s, clips timed, wall s, CPU s of this process)."""
  num = data.num_examples(data_dir, setting, 'train')
  steps = max(1, round(epochs * num / batch_size))
  start = time.perf_counter()
  ds = data.train_dataset(
      data_dir,
      setting,
      batch_size=batch_size,
      image_size=image_size,
      seed=0,
      num_workers=workers,
      process_index=0,
      process_count=1,
  )
  it = iter(ds)
  next(it)
  startup = time.perf_counter() - start
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    batch = next(it)
    del batch
  seconds = time.perf_counter() - start
  cpu = time.process_time() - cpu
  it.close()
  gc.collect()
  return startup, steps * batch_size, seconds, cpu


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
      '--data_dir',
      required=True,
      help='--out folder of python -m data_prep.avsbench',
  )
  parser.add_argument('--setting', default='ms3', choices=('s4', 'ms3'))
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument(
      '--workers',
      type=int,
      default=0,
      help='grain worker processes (0: decode in this process)',
  )
  parser.add_argument(
      '--epochs',
      type=float,
      default=1.0,
      help='epochs of the train split to time',
  )
  args = parser.parse_args(argv)
  startup, clips, seconds, cpu = run(
      args.data_dir,
      args.setting,
      args.image_size,
      args.batch_size,
      args.workers,
      args.epochs,
  )
  cores = max(1, args.workers)
  print(
      f'{args.setting} train, {args.image_size}x{args.image_size}, batch '
      f'{args.batch_size}, workers {args.workers}: {clips} clips in '
      f'{seconds:.2f} s = {clips / seconds:.1f} clips/s '
      f'({clips / seconds / cores:.1f} per worker core); '
      f'start-up {startup:.1f} s'
  )
  if not args.workers:  # all decoding ran here: a contention-free figure
    print(
        f'  CPU time of this process {cpu:.2f} s = {clips / cpu:.1f} clips '
        'per CPU-second'
    )


if __name__ == '__main__':
  main()
