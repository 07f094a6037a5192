"""The prepared dataset on disk: where it lives, random access, decoding.

`data_dir` is the `--out` folder of `python -m data_prep.avsbench`; a setting
lives in `data_dir/avs_bench/{setting}/{VERSION}/` (a TFDS dataset: TFRecord
shards + dataset_info.json, whose `configName` records the setting). The
constants here are the dataset's layout; `data_prep` writes it with them.
Decoding uses PIL and NumPy only.
"""

import io
import json
import math
import os
import re
import struct
import threading

import numpy as np
from PIL import Image

from avs_jax.data import example_proto

NAME = 'avs_bench'  # the TFDS dataset name
VERSION = '1.0.0'  # of the record format: bump when the features change
SETTINGS = ('s4', 'ms3', 'avss')  # TFDS configs: Single-source,
# Multi-sources (AVSBench-object) and AVSBench-semantic (AVSS)
SPLITS = ('train', 'val', 'test')
NUM_FRAMES = 5  # frames, masks and seconds of audio per clip (s4, ms3)
AVSS_FRAMES = 10  # AVSS: 10 frames per clip, 5-frame clips padded
CLASS_NAMES = 'class_names.json'  # AVSS: [name of class 0, 1, ...]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_PREPARE = 'python -m data_prep.avsbench'


class DataError(ValueError):
  """The prepared dataset cannot serve a request.

  The message is one line: what is wrong, and what to do.
  """


class DatasetNotFoundError(DataError, FileNotFoundError):
  """No prepared dataset of the setting where it was looked for."""


def version_dir(data_dir, setting):
  """`data_dir/avs_bench/{setting}/{VERSION}`: where data_prep writes."""
  return os.path.join(data_dir, NAME, setting, VERSION)


def shard_filename(split, index, num_shards):
  """TFDS's default shard file name."""
  return f'{NAME}-{split}.tfrecord-{index:05d}-of-{num_shards:05d}'


def dataset_dir(data_dir, setting):
  """`data_dir/avs_bench/{setting}/{newest version}` (or `data_dir` itself).

  Versions are folders named like `1.0.0` holding a dataset_info.json.
  """
  if setting not in SETTINGS:
    raise DataError(
        f'unknown setting {setting!r} (expected one of {", ".join(SETTINGS)})'
    )
  if os.path.isfile(os.path.join(data_dir, 'dataset_info.json')):
    return data_dir
  base = os.path.join(data_dir, NAME, setting)
  versions = sorted(
      (
          d
          for d in (os.listdir(base) if os.path.isdir(base) else [])
          if re.fullmatch(r'\d+(\.\d+)*', d)  # not e.g. `1.0.0.old`
          and os.path.isfile(os.path.join(base, d, 'dataset_info.json'))
      ),
      key=lambda v: tuple(int(x) for x in v.split('.')),
  )
  if not versions:
    raise DatasetNotFoundError(
        f'no prepared {setting!r} dataset under {data_dir!r} (expected '
        f'{base}/<version>/dataset_info.json; run {_PREPARE} --root ROOT '
        f'--setting {setting} --out {data_dir})'
    )
  return os.path.join(base, versions[-1])


def _read_info(directory, setting):
  """dataset_info.json of `directory`, checked to hold `setting`."""
  path = os.path.join(directory, 'dataset_info.json')
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(
        f'cannot read {path} ({e}): prepare the data again with '
        f'{_PREPARE} --setting {setting}'
    ) from e
  have = info.get('configName')
  if not have:
    raise DataError(
        f'{path} records no setting (configName): prepare the data again '
        f'with {_PREPARE} --setting {setting}'
    )
  if have != setting:
    raise DataError(
        f'{directory} holds the {have!r} setting, not {setting!r} (configName '
        f'in its dataset_info.json): point the data directory at the --out '
        f'folder of {_PREPARE} --setting {setting} (the folder holding '
        f'{NAME}/{setting}/), or ask for setting {have!r}'
    )
  return info


def split_files(data_dir, setting, split):
  """(shard paths, records per shard) of a split, from dataset_info.json.

  Raises DataError when the dataset is of another setting, lacks the split or
  a shard file, and DatasetNotFoundError when there is none.
  """
  directory = dataset_dir(data_dir, setting)
  info = _read_info(directory, setting)
  splits = {s['name']: s for s in info.get('splits', [])}
  if split not in splits:
    raise DataError(
        f'split {split!r} not in {directory} (has {sorted(splits)})'
    )
  lengths = [int(n) for n in splits[split].get('shardLengths', [])]
  paths = [
      os.path.join(directory, shard_filename(split, i, len(lengths)))
      for i in range(len(lengths))
  ]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise DataError(
        f'{missing[0]} is missing ({len(missing)} of the {len(paths)} '
        f'{split} shards in dataset_info.json): prepare the data again with '
        f'{_PREPARE} --setting {setting}'
    )
  return paths, lengths


def num_examples(data_dir, setting, split):
  """Number of clips in a split."""
  return sum(split_files(data_dir, setting, split)[1])


def class_names(data_dir, setting):
  """AVSS class names by index (`class_names.json` beside the shards), or
  None when the dataset has none (S4/MS3, or written without it)."""
  path = os.path.join(dataset_dir(data_dir, setting), CLASS_NAMES)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return [str(n) for n in json.load(f)]


def image_hw(image_size):
  """int or (H, W) -> (H, W)."""
  if isinstance(image_size, int):
    return image_size, image_size
  h, w = image_size
  return int(h), int(w)


class TFRecordSource:
  """Random access to the records of TFRecord files (a grain data source).

  The record offsets are found once by reading the length headers. Reads use
  `os.pread` (grain reads with several threads); descriptors are opened
  lazily, so the source pickles into worker processes.
  """

  def __init__(self, paths, lengths=None):
    self._paths = list(paths)
    self._index = []  # (file number, offset of the data, length)
    for k, path in enumerate(self._paths):
      size, start, count = os.path.getsize(path), 0, 0
      with open(path, 'rb') as f:
        while start < size:
          f.seek(start)
          header = f.read(12)
          if len(header) != 12:
            raise DataError(f'{path}: truncated TFRecord at byte {start}')
          (length,) = struct.unpack('<Q', header[:8])
          self._index.append((k, start + 12, length))
          start += 12 + length + 4
          count += 1
      if start != size:
        raise DataError(f'{path}: truncated TFRecord (ends mid-record)')
      if lengths is not None and count != lengths[k]:
        raise DataError(
            f'{path}: {count} records, dataset_info.json says '
            f'{lengths[k]} (prepare the data again with {_PREPARE})'
        )
    self._fds = {}  # file number -> OS file descriptor, opened lazily
    self._lock = threading.Lock()

  def __len__(self):
    return len(self._index)

  def __getitem__(self, i):
    k, offset, length = self._index[i]
    fd = self._fds.get(k)
    if fd is None:
      with self._lock:
        fd = self._fds.get(k)
        if fd is None:
          fd = self._fds[k] = os.open(self._paths[k], os.O_RDONLY)
    data = os.pread(fd, length, offset)  # no shared file position: thread-safe
    if len(data) != length:
      raise DataError(f'{self._paths[k]}: record {i} is truncated')
    return data

  def __getstate__(self):
    return {
        k: v for k, v in self.__dict__.items() if k not in ('_fds', '_lock')
    }

  def __setstate__(self, state):
    self.__dict__.update(state, _fds={}, _lock=threading.Lock())

  def __del__(self):
    for fd in getattr(self, '_fds', {}).values():
      os.close(fd)

  def __repr__(self):
    return f'TFRecordSource({len(self._paths)} files, {len(self)} records)'


def _decode_png(data):
  img = Image.open(io.BytesIO(data))
  img.load()
  return img


def decode(raw, image_size):
  """Serialized clip -> dict of NumPy arrays (one element of a batch).

  frames float32 [5, H, W, 3] (bilinear resize, ImageNet mean/std);
  masks float32 [5, H, W] in {0, 1} (nearest resize); labelled bool [5];
  log_mel float32 [5, 96, 64]; valid bool []; id, category str.
  """
  h, w = image_hw(image_size)
  ex = example_proto.parse(raw)
  if 'frame_mask' in ex:
    return decode_avss(ex, (h, w))
  frames = np.empty((NUM_FRAMES, h, w, 3), np.uint8)
  masks = np.empty((NUM_FRAMES, h, w), np.uint8)
  for i, (f, m) in enumerate(zip(ex['frames'], ex['masks'])):
    img = _decode_png(f).convert('RGB')
    if img.size != (w, h):
      img = img.resize((w, h), Image.BILINEAR)
    frames[i] = np.asarray(img)
    mask = _decode_png(m)
    if mask.size != (w, h):
      mask = mask.resize((w, h), Image.NEAREST)
    masks[i] = np.asarray(mask).reshape(h, w)
  scale = 1.0 / (255.0 * IMAGENET_STD)
  return dict(
      frames=frames * scale - IMAGENET_MEAN / IMAGENET_STD,
      masks=(masks > 0).astype(np.float32),
      labelled=np.array(ex['labelled'], bool),
      log_mel=np.frombuffer(ex['log_mel'][0], '<f4')
      .reshape(NUM_FRAMES, 96, 64)
      .copy(),
      valid=np.array(True),
      id=ex['id'][0].decode(),
      category=ex['category'][0].decode(),
  )


def _resized(data, hw, mode, resample):
  """PNG bytes -> uint8 array of size `hw` in PIL `mode`."""
  img = _decode_png(data)
  img = img.convert(mode) if img.mode != mode else img
  if img.size != (hw[1], hw[0]):
    img = img.resize((hw[1], hw[0]), resample)
  return np.asarray(img)


def decode_avss(ex, hw):
  """A parsed AVSS record -> one clip (T = 10 frames).

  frames float32 [T, H, W, 3] (bilinear, ImageNet mean/std; 0 on padded
  frames, as the reference pads its normalised frames with zeros); labels
  int32 [T, H, W] class indices (nearest resize); gt_mask float32 [T]
  (annotated frames); frame_mask float32 [T] (real frames); log_mel float32
  [T, 96, 64]; valid bool []; id, category (the subset: v1s, v1m, v2) str.
  """
  t = AVSS_FRAMES
  frame_mask = np.array(ex['frame_mask'], np.float32)
  frames = np.stack(
      [_resized(f, hw, 'RGB', Image.BILINEAR) for f in ex['frames']]
  )
  labels = np.stack([_resized(m, hw, 'L', Image.NEAREST) for m in ex['masks']])
  scale = 1.0 / (255.0 * IMAGENET_STD)
  frames = frames * scale - IMAGENET_MEAN / IMAGENET_STD
  return dict(
      frames=(frames * frame_mask[:, None, None, None]).astype(np.float32),
      labels=labels.astype(np.int32),
      gt_mask=np.array(ex['labelled'], np.float32),
      frame_mask=frame_mask,
      log_mel=np.frombuffer(ex['log_mel'][0], '<f4').reshape(t, 96, 64).copy(),
      valid=np.array(True),
      id=ex['id'][0].decode(),
      category=ex['category'][0].decode(),
  )


def padding(image_size, setting='s4'):
  """The element that fills an evaluation batch: all zeros, valid=False."""
  h, w = image_hw(image_size)
  if setting == 'avss':
    t = AVSS_FRAMES
    return dict(
        frames=np.zeros((t, h, w, 3), np.float32),
        labels=np.zeros((t, h, w), np.int32),
        gt_mask=np.zeros(t, np.float32),
        frame_mask=np.zeros(t, np.float32),
        log_mel=np.zeros((t, 96, 64), np.float32),
        valid=np.array(False),
        id='',
        category='',
    )
  return dict(
      frames=np.zeros((NUM_FRAMES, h, w, 3), np.float32),
      masks=np.zeros((NUM_FRAMES, h, w), np.float32),
      labelled=np.zeros(NUM_FRAMES, bool),
      log_mel=np.zeros((NUM_FRAMES, 96, 64), np.float32),
      valid=np.array(False),
      id='',
      category='',
  )


def eval_positions(num, batch_size, process_index, process_count):
  """This process's clip positions, in evaluation order; >= num: padding.

  Global position p goes to process p % process_count; every process gets
  ceil(num / (batch_size * process_count)) full batches.
  """
  steps = math.ceil(num / (batch_size * process_count))
  return list(
      range(process_index, steps * batch_size * process_count, process_count)
  )
