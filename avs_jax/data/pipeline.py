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
category str [B] (keep those two off the device). AVSS (setting 'avss')
clips have T = 10 frames and, instead of masks and labelled, labels int32
[B, 10, H, W] (class indices), gt_mask and frame_mask float32 [B, 10]
(`records.decode_avss`).
"""

import functools

from absl import flags
import grain
import numpy as np

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


class _Decode(grain.transforms.Map):
  """Raw record -> one clip's dict of arrays (see `records.decode`)."""

  def __init__(self, image_size):
    self.image_size = records.image_hw(image_size)

  def map(self, element):
    return records.decode(element, self.image_size)


class _ReadAndDecode(_Decode):
  """Evaluation: clip position -> decoded clip; past the end -> padding."""

  def __init__(self, source, image_size, setting='s4'):
    super().__init__(image_size)
    self.source, self.setting = source, setting

  def map(self, position):
    if position >= len(self.source):
      return records.padding(self.image_size, self.setting)
    return records.decode(self.source[position], self.image_size)


class _DecodeRows(_Decode):
  """A global batch of raw records -> this process's rows, decoded, stacked."""

  def __init__(self, image_size, start, size):
    super().__init__(image_size)
    self.start, self.size = start, size

  def map(self, element):
    rows = [
        records.decode(r, self.image_size)
        for r in element[self.start : self.start + self.size]
    ]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


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
  """Infinite training batches: this process's rows of each global batch.

  Every process reads the same stream of records (all shards, their order
  reshuffled each epoch with `seed`, `cycle_length` shards interleaved, a
  `shuffle_window` shuffle), cuts it into global batches of `batch_size *
  process_count` clips and decodes only its own `batch_size` rows. So the
  global batches, and hence training, are the same for any number of
  processes, and every process's iterator is at the same position (a
  checkpoint's input state fits any process count). Reading raw records is
  repeated on every process; decoding, the costly part, is split.
  """
  process_index, process_count = _process(process_index, process_count)
  paths, lengths = records.split_files(data_dir, setting, 'train')
  global_batch = batch_size * process_count
  if sum(lengths) < global_batch:
    raise records.DataError(
        f'{sum(lengths)} training clips, fewer than one global batch of '
        f'{global_batch} (batch_size={batch_size} per process x {process_count}):'
        ' lower the batch size or prepare more clips'
    )
  ds = grain.MapDataset.source(paths).shuffle(seed=seed).repeat()
  ds = ds.map(grain.experimental.TFRecordIterDataset)
  ds = grain.experimental.InterleaveIterDataset(
      ds, cycle_length=max(1, min(cycle_length, len(paths)))
  )
  ds = grain.experimental.WindowShuffleIterDataset(
      ds, window_size=shuffle_window, seed=seed
  )
  ds = ds.batch(global_batch, drop_remainder=True, batch_fn=list)
  ds = ds.map(_DecodeRows(image_size, process_index * batch_size, batch_size))
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
      _ReadAndDecode(source, image_size, setting)
  )
  ds = ds.batch(batch_size)
  return _prefetch(ds.to_iter_dataset(), num_workers)


def num_examples(data_dir, setting, split):
  """Number of clips in a split of the prepared dataset."""
  return records.num_examples(data_dir, setting, split)
