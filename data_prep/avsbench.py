r"""Prepare AVSBench for TPU input pipelines: AVSBench -> TFDS TFRecords.

  python -m data_prep.avsbench --root ROOT --setting ms3 --out OUT
  python -m data_prep.avsbench --root SEMANTIC_ROOT --setting avss --out OUT

ROOT is the AVSBench-object folder (holding `Single-source/` and
`Multi-sources/`, see `data_prep/layout.py`); for `avss` it is the
AVSBench-semantic folder (`metadata.csv`, `label2idx.json`, `v1s/`, `v1m/`,
`v2/`, see `data_prep/avss.py`; the class names go to `class_names.json`
beside the shards). Writes a standard TFDS dataset
to `OUT/avs_bench/{setting}/1.0.0/`: `avs_bench-{split}.tfrecord-NNNNN-of-MMMMM`
shards, `dataset_info.json` (split and shard sizes) and `features.json`, so it
also loads with `tfds.builder_from_directory` or `tfds.load('avs_bench/ms3',
data_dir=OUT)` (after importing `data_prep.tfds_builder`).

Clips are read in parallel (one process per core by default). A shard whose
clips were all written is skipped when the command is run again. A clip with
a missing or unreadable frame, mask or wav, a mask of another size than its
frame or a wav holding less than its header declares is left out, and so is
a CSV row that is not a clip (a name that is not UTF-8 or not a file name,
another split, an id listed twice): each is reported in `OUT/errors.jsonl`
(one JSON object per clip: setting, split, id, file, reason) and in the
summary, and the command then exits with status 1. The other clips are
prepared. `dataset_info.json` records the setting (`configName`); the input
pipeline refuses shards of another setting.
"""

import argparse
import functools
import json
import math
import multiprocessing
import os
import sys

import tqdm

from avs_jax.data import records
from data_prep import avss
from data_prep import layout


def plan_shards(clips, clips_per_shard):
  """{split: [[Clip, ...] per shard]}: contiguous runs of the sorted clips."""
  plan = {}
  for split in records.SPLITS:
    group = [c for c in clips if c.split == split]
    if group:
      num = math.ceil(len(group) / clips_per_shard)
      size = math.ceil(len(group) / num)
      plan[split] = [group[i : i + size] for i in range(0, len(group), size)]
  return plan


def _load(clip):
  """(record or None, error dict or None); never raises."""
  is_avss = isinstance(clip, avss.Clip)
  try:
    return (avss.load_example if is_avss else layout.load_clip)(clip), None
  except layout.ClipError as e:
    file, reason = e.file, e.reason
  except Exception as e:  # pylint: disable=broad-except
    file = clip.folder if is_avss else os.path.dirname(clip.frames[0])
    reason = f'unexpected error: {type(e).__name__}: {e}'
  return None, dict(split=clip.split, id=clip.id, file=file, reason=reason)


def _state_path(out, setting, filename):
  return os.path.join(out, '.prepare', setting, filename + '.json')


def _read_state(out, setting, filename, clips):
  """The shard's recorded state if the shard was finished for these clips."""
  try:
    with open(_state_path(out, setting, filename)) as f:
      state = json.load(f)
  except (OSError, ValueError):
    return None
  shard = os.path.join(records.version_dir(out, setting), filename)
  if (
      state.get('ids') != [c.id for c in clips]
      or not os.path.isfile(shard)
      or os.path.getsize(shard) != state.get('num_bytes')
  ):
    return None
  return state


@functools.cache
def _tfds():
  """(tf, tfds, tfds_builder), imported by the writing process only.

  Not at the top: spawn imports this module again in every reader process,
  which needs neither TensorFlow (~5 s and ~0.5 GB to import) nor TFDS.
  TensorFlow is kept off any GPU (prepare may run where JAX owns it).
  """
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  import tensorflow_datasets as tfds
  from data_prep import tfds_builder
  # pylint: enable=g-import-not-at-top

  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TensorFlow was initialised earlier by the caller.
    pass
  return tf, tfds, tfds_builder


@functools.cache
def _features(setting):
  return _tfds()[2].features(setting)


def _write_shard(out, setting, filename, clips, examples, errors):
  """Writes one shard atomically, then its state; returns the state."""
  tf, features = _tfds()[0], _features(setting)
  path = os.path.join(records.version_dir(out, setting), filename)
  with tf.io.TFRecordWriter(path + '.tmp') as writer:
    for example in examples:
      writer.write(features.serialize_example(example))
  os.replace(path + '.tmp', path)
  state = dict(
      ids=[c.id for c in clips],
      num_examples=len(examples),
      num_bytes=os.path.getsize(path),
      errors=errors,
  )
  state_file = _state_path(out, setting, filename)
  with open(state_file + '.tmp', 'w') as f:
    json.dump(state, f)
  os.replace(state_file + '.tmp', state_file)
  return state


def _write_info(out, setting, plan, states):
  """dataset_info.json and features.json through the TFDS builder."""
  _, tfds, tfds_builder = _tfds()
  builder = tfds_builder.AvsBench(config=setting, data_dir=out)
  splits = [
      tfds.core.SplitInfo(
          name=split,
          shard_lengths=[
              states[split, i]['num_examples'] for i in range(len(shards))
          ],
          num_bytes=sum(
              states[split, i]['num_bytes'] for i in range(len(shards))
          ),
      )
      for split, shards in plan.items()
  ]
  builder.info.set_splits(tfds.core.SplitDict(splits))
  builder.info.write_to_directory(records.version_dir(out, setting))


def _write_errors(out, setting, errors):
  """OUT/errors.jsonl: this run's errors of `setting`, other settings kept."""
  path = os.path.join(out, 'errors.jsonl')
  kept = []
  if os.path.isfile(path):
    with open(path) as f:
      kept = [
          line
          for line in f
          if line.strip() and json.loads(line).get('setting') != setting
      ]
  with open(path, 'w') as f:
    f.writelines(kept)
    for e in errors:
      f.write(json.dumps(dict(setting=setting, **e)) + '\n')


def _remove_stale(directory, keep):
  """Deletes shards of earlier runs with another shard count."""
  for name in os.listdir(directory):
    if (
        name.startswith(records.NAME + '-')
        and '.tfrecord-' in name
        and name not in keep
    ):
      os.remove(os.path.join(directory, name))


def _write_shards(out, setting, todo, workers, bar):
  """Reads the clips of the `todo` shards in parallel, writes those shards.

  `todo`: [(split, index, filename, clips)]. Returns {(split, index): state}.
  """
  jobs = [clip for *_, clips in todo for clip in clips]
  workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
  # spawn: the caller may hold threads (JAX, TF) that fork would copy.
  pool = (
      multiprocessing.get_context('spawn').Pool(workers)
      if workers > 1
      else None
  )
  states = {}
  try:
    results = pool.imap(_load, jobs, chunksize=1) if pool else map(_load, jobs)
    for split, i, filename, clips in todo:
      examples, errors = [], []
      for _ in clips:
        example, error = next(results)
        if error:
          errors.append(error)
          bar.write(f'error: {error["id"]}: {error["file"]}: {error["reason"]}')
        else:
          examples.append(example)
        bar.update(1)
      states[split, i] = _write_shard(
          out, setting, filename, clips, examples, errors
      )
  finally:
    if pool:
      pool.close()
      pool.join()
  return states


def _read_clips(root, setting):
  """(clips, problems, class names or None) of a setting's layout."""
  if setting == 'avss':
    names = avss.read_class_names(root)
    clips, problems = avss.read_clips(root)
    csv_file = os.path.join(root, 'metadata.csv')
  else:
    names = None
    clips, problems = layout.read_clips(root, setting)
    csv_file = layout.csv_path(root, setting)
  if not clips:
    first = f' ({problems[0]["reason"]}, ...)' if problems else ''
    raise layout.LayoutError(f'{csv_file} lists no train/val/test clip{first}')
  return clips, problems, names


def prepare(root, setting, out, *, workers=None, clips_per_shard=64):
  """Writes the TFDS dataset of `setting`; returns (errors, {split: count}).

  errors: a dict (split, id, file, reason) per CSV row or clip left out.
  Raises layout.LayoutError for a wrong root, CSV or setting.
  """
  clips, problems, names = _read_clips(root, setting)
  plan = plan_shards(clips, clips_per_shard)
  directory = records.version_dir(out, setting)
  os.makedirs(directory, exist_ok=True)
  if names is not None:
    with open(os.path.join(directory, records.CLASS_NAMES), 'w') as f:
      json.dump(names, f)
  os.makedirs(os.path.join(out, '.prepare', setting), exist_ok=True)
  shards = [
      (split, i, records.shard_filename(split, i, len(group)), shard)
      for split, group in plan.items()
      for i, shard in enumerate(group)
  ]
  _remove_stale(directory, {filename for _, _, filename, _ in shards})

  # A shard is done when its file and state match and none of its clips failed
  # (a shard with failed clips is written, and retried on the next run).
  states, todo = {}, []
  for split, i, filename, shard in shards:
    state = _read_state(out, setting, filename, shard)
    if state is not None and not state['errors']:
      states[split, i] = state
    else:
      todo.append((split, i, filename, shard))
  done = len(clips) - sum(len(shard) for *_, shard in todo)
  with tqdm.tqdm(
      total=len(clips), initial=done, unit='clip', desc=f'{setting} clips'
  ) as bar:
    if todo:
      states.update(_write_shards(out, setting, todo, workers, bar))

  _write_info(out, setting, plan, states)
  errors = problems + [
      e for split, i, _, _ in shards for e in states[split, i]['errors']
  ]
  _write_errors(out, setting, errors)
  counts = {
      split: sum(states[split, i]['num_examples'] for i in range(len(group)))
      for split, group in plan.items()
  }
  return errors, counts


class _Parser(argparse.ArgumentParser):
  """Bad arguments give one error line (and exit status 2)."""

  def error(self, message):
    self.exit(2, f'{self.prog}: error: {message}\n')


def _parser():
  parser = _Parser(
      prog='python -m data_prep.avsbench', description=__doc__.split('\n')[0]
  )
  parser.add_argument(
      '--root',
      required=True,
      help='AVSBench-object folder (has Single-source/, Multi-sources/)',
  )
  parser.add_argument(
      '--setting',
      required=True,
      choices=records.SETTINGS,
      help='s4 (Single-source), ms3 (Multi-sources) or avss (--root: '
      'AVSBench-semantic)',
  )
  parser.add_argument(
      '--out',
      required=True,
      help='output folder (the data_dir of the input pipeline)',
  )
  parser.add_argument(
      '--workers',
      type=int,
      default=0,
      help='reader processes (default: one per CPU core)',
  )
  parser.add_argument(
      '--clips_per_shard',
      type=int,
      default=64,
      help='clips per TFRecord shard (default: 64)',
  )
  return parser


def main(argv=None):
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  parser = _parser()
  args = parser.parse_args(argv)
  if args.clips_per_shard < 1:
    parser.error('--clips_per_shard must be at least 1')
  try:
    errors, counts = prepare(
        args.root,
        args.setting,
        args.out,
        workers=args.workers or None,
        clips_per_shard=args.clips_per_shard,
    )
  except (layout.LayoutError, OSError) as e:  # OSError: --out not writable
    print(f'{parser.prog}: error: {e}', file=sys.stderr)
    return 2
  written = ', '.join(f'{split} {n}' for split, n in counts.items())
  print(
      f'{args.setting}: wrote {written} clips to '
      f'{records.version_dir(args.out, args.setting)}'
  )
  if errors:
    print(
        f'{len(errors)} clip(s) left out (listed in '
        f'{os.path.join(args.out, "errors.jsonl")}):'
    )
    for e in errors:
      print(f'  {e["split"]} {e["id"]}: {e["file"]}: {e["reason"]}')
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
