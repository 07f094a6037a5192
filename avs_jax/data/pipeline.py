"""grain input pipelines over the prepared TFRecord shards.

Training: this process's shards in a new order every epoch -> one
`TFRecordIterDataset` per shard -> interleave -> window shuffle -> decode ->
batch -> `mp_prefetch` workers. Infinite, deterministic per (seed, process
count, workers); the iterator's `get_state()`/`set_state()` (and the
`grain.checkpoint` handlers) save and restore its position.

Evaluation: random access into the shards in their fixed order; global clip
position p goes to process p % process_count, and padding (valid=False)
fills every process's last batch, so all processes run the same number of
batches and every clip is seen exactly once. Batch order does not depend on
the number of workers.

Every batch is a dict of NumPy arrays: frames float32 [B, 5, H, W, 3]
(ImageNet-normalised), log_mel float32 [B, 5, 96, 64], masks float32
[B, 5, H, W] in {0, 1}, labelled bool [B, 5], valid bool [B], id and
category str [B] (keep those two off the device).
"""

import functools

from absl import flags
import grain

from avs_jax.data import records


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    # JAX only when asked for: grain's worker processes import this module
    # and need no JAX (its import costs them ~1 s and ~150 MB each).
    import jax  # pylint: disable=g-import-not-at-top

    process_index = (
        jax.process_index() if process_index is None else process_index
    )
    process_count = (
        jax.process_count() if process_count is None else process_count
    )
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index {process_index} not in [0, {process_count})'
    )
  return process_index, process_count


def _keep(element, *, offset, process_index, process_count):
  index, _ = element
  return (offset + index) % process_count == process_index


def _with_index(index, element):
  return index, element


def _second(element):
  return element[1]


def _open_shard(shard, *, process_index, process_count):
  """One shard as an IterDataset of raw records (strided when files are few)."""
  path, offset, strided = shard
  ds = grain.experimental.TFRecordIterDataset(path)
  if strided:
    ds = ds.map_with_index(_with_index)
    ds = ds.filter(
        functools.partial(
            _keep,
            offset=offset,
            process_index=process_index,
            process_count=process_count,
        )
    )
    ds = ds.map(_second)
  return ds


class _Decode(grain.transforms.Map):
  """Raw record -> one clip's dict of arrays (see `records.decode`)."""

  def __init__(self, image_size):
    self.image_size = records.image_hw(image_size)

  def map(self, element):
    return records.decode(element, self.image_size)


class _ReadAndDecode(_Decode):
  """Evaluation: clip position -> decoded clip; past the end -> padding."""

  def __init__(self, source, image_size):
    super().__init__(image_size)
    self.source = source

  def map(self, position):
    if position >= len(self.source):
      return records.padding(self.image_size)
    return records.decode(self.source[position], self.image_size)


def _prefetch(ds, num_workers):
  if not num_workers:
    return ds
  # grain's multiprocessing reads absl flags: outside an absl app (scripts,
  # tests, notebooks) use their defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def train_dataset(
    data_dir,
    setting,
    *,
    batch_size,
    image_size,
    seed,
    num_workers=0,
    process_index=None,
    process_count=None,
    shuffle_window=256,
    cycle_length=4,
):
  """Infinite training batches of this process (per-process batch_size).

  Shards are split across processes (shard k -> process k % count); with
  fewer shards than processes every process reads all shards and keeps every
  count-th record. Files are reshuffled each epoch; records are mixed by
  interleaving `cycle_length` shards and a `shuffle_window` shuffle.
  """
  process_index, process_count = _process(process_index, process_count)
  paths, lengths = records.split_files(data_dir, setting, 'train')
  offsets = [sum(lengths[:k]) for k in range(len(paths))]
  strided = len(paths) < process_count
  if strided:
    shards = [(p, o, True) for p, o in zip(paths, offsets)]
    available = len(range(process_index, sum(lengths), process_count))
  else:
    shards = [(p, o, False) for p, o in zip(paths, offsets)][
        process_index::process_count
    ]
    available = sum(lengths[process_index::process_count])
  if available < batch_size:
    raise records.DataError(
        f'process {process_index} of {process_count} gets {available} '
        f'training clips, fewer than batch_size={batch_size}: lower the batch '
        'size or prepare more clips'
    )
  ds = grain.MapDataset.source(shards).shuffle(seed=seed).repeat()
  ds = ds.map(
      functools.partial(
          _open_shard, process_index=process_index, process_count=process_count
      )
  )
  ds = grain.experimental.InterleaveIterDataset(
      ds, cycle_length=max(1, min(cycle_length, len(shards)))
  )
  ds = grain.experimental.WindowShuffleIterDataset(
      ds, window_size=shuffle_window, seed=seed
  )
  ds = ds.map(_Decode(image_size)).batch(batch_size, drop_remainder=True)
  return _prefetch(ds, num_workers)


def eval_dataset(
    data_dir,
    setting,
    split,
    *,
    batch_size,
    image_size,
    num_workers=0,
    process_index=None,
    process_count=None,
):
  """This process's evaluation batches: fixed order, finite, padded.

  All processes yield ceil(N / (batch_size * process_count)) full batches;
  `valid` is False on padding.
  """
  process_index, process_count = _process(process_index, process_count)
  source = records.TFRecordSource(
      *records.split_files(data_dir, setting, split)
  )
  positions = records.eval_positions(
      len(source), batch_size, process_index, process_count
  )
  ds = grain.MapDataset.source(positions).map(
      _ReadAndDecode(source, image_size)
  )
  ds = ds.batch(batch_size)
  return _prefetch(ds.to_iter_dataset(), num_workers)


def num_examples(data_dir, setting, split):
  """Number of clips in a split of the prepared dataset."""
  return records.num_examples(data_dir, setting, split)
