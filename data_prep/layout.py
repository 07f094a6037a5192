"""The AVSBench-object layout: list its clips and read one clip into a record.

Single-source (S4), under `ROOT/Single-source/`:
  s4_meta_data.csv                      columns include name, category, split
  s4_data/visual_frames/{split}/{category}/{name}/{name}_{1..5}.png
  s4_data/audio_wav/{split}/{category}/{name}.wav
  s4_data/gt_masks/{split}/{category}/{name}/{name}_{i}.png
      train: only `_1` (the first frame is labelled); val/test: `_1`..`_5`
Multi-sources (MS3), under `ROOT/Multi-sources/`:
  ms3_meta_data.csv                     first column: clip id; a split column
  ms3_data/visual_frames/{name}/{name}.mp4_{1..5}.png   (no split folder)
  ms3_data/audio_wav/{split}/{name}.wav
  ms3_data/gt_masks/{split}/{name}/{name}_{1..5}.png

Masks are foreground where the grayscale image is >= 128 (0/255 grayscale or
palette PNGs). The wav files are the audio's source of truth (`audio_log_mel`
pickles, if present, are not read). No TensorFlow here.
"""

import csv
import dataclasses
import io
import os

import numpy as np
from PIL import Image

from avs_jax import audio

SETTINGS = ('s4', 'ms3')
SPLITS = ('train', 'val', 'test')
NUM_FRAMES = 5


class LayoutError(Exception):
  """The root, its CSV or the setting is wrong (the whole run is impossible)."""


class ClipError(Exception):
  """One clip cannot be read: `file` and `reason` say why."""

  def __init__(self, file, reason):
    super().__init__(f'{file}: {reason}')
    self.file, self.reason = file, reason


@dataclasses.dataclass(frozen=True)
class Clip:
  """Where one clip's files are. `masks[i]` is None for unlabelled frames."""

  id: str
  category: str  # '' for MS3 (it has no category)
  split: str
  frames: tuple
  masks: tuple
  wav: str


def csv_path(root, setting):
  if setting == 's4':
    return os.path.join(root, 'Single-source', 's4_meta_data.csv')
  return os.path.join(root, 'Multi-sources', 'ms3_meta_data.csv')


def _read_rows(path, required):
  try:
    with open(path, newline='') as f:
      reader = csv.DictReader(f)
      fields = reader.fieldnames or []
      missing = [c for c in required if c not in fields]
      if missing:
        raise LayoutError(
            f'{path}: missing column(s) {", ".join(missing)} '
            f'(has {", ".join(fields) or "no header"})'
        )
      return fields, list(reader)
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise LayoutError(f'cannot read {path}: {e}') from e


def _s4_clip(root, row):
  name, category, split = row['name'], row['category'], row['split']
  base = os.path.join(root, 'Single-source', 's4_data')
  frame_dir = os.path.join(base, 'visual_frames', split, category, name)
  mask_dir = os.path.join(base, 'gt_masks', split, category, name)
  num_masks = 1 if split == 'train' else NUM_FRAMES
  return Clip(
      id=name,
      category=category,
      split=split,
      frames=tuple(
          os.path.join(frame_dir, f'{name}_{i}.png')
          for i in range(1, NUM_FRAMES + 1)
      ),
      masks=tuple(
          os.path.join(mask_dir, f'{name}_{i}.png') if i <= num_masks else None
          for i in range(1, NUM_FRAMES + 1)
      ),
      wav=os.path.join(base, 'audio_wav', split, category, name + '.wav'),
  )


def _ms3_clip(root, name, split):
  base = os.path.join(root, 'Multi-sources', 'ms3_data')
  return Clip(
      id=name,
      category='',
      split=split,
      frames=tuple(
          os.path.join(base, 'visual_frames', name, f'{name}.mp4_{i}.png')
          for i in range(1, NUM_FRAMES + 1)
      ),
      masks=tuple(
          os.path.join(base, 'gt_masks', split, name, f'{name}_{i}.png')
          for i in range(1, NUM_FRAMES + 1)
      ),
      wav=os.path.join(base, 'audio_wav', split, name + '.wav'),
  )


def read_clips(root, setting):
  """All clips of `setting` listed in the CSV, sorted by (split, id).

  Rows whose split is not train/val/test are ignored. Raises LayoutError
  (one line) for an unknown setting, a missing root or a missing/bad CSV.
  """
  if setting not in SETTINGS:
    raise LayoutError(f'unknown setting {setting!r} (expected s4 or ms3)')
  if not os.path.isdir(root):
    raise LayoutError(f'root {root!r} is not a directory')
  path = csv_path(root, setting)
  if not os.path.isfile(path):
    raise LayoutError(
        f'{path} not found: is --root the AVSBench-object '
        f'directory (holding Single-source/ and Multi-sources/)?'
    )
  if setting == 's4':
    _, rows = _read_rows(path, ('name', 'category', 'split'))
    clips = [_s4_clip(root, r) for r in rows if r['split'] in SPLITS]
  else:
    fields, rows = _read_rows(path, ('split',))
    clips = [
        _ms3_clip(root, r[fields[0]], r['split'])
        for r in rows
        if r['split'] in SPLITS
    ]
  ids = [c.id for c in clips]
  if len(set(ids)) != len(ids):
    dup = sorted({i for i in ids if ids.count(i) > 1})
    raise LayoutError(f'{path}: duplicate clip ids {dup[:5]}')
  return sorted(clips, key=lambda c: (SPLITS.index(c.split), c.id))


def _open_image(path, what):
  if not os.path.isfile(path):
    raise ClipError(path, f'missing {what}')
  try:
    with open(path, 'rb') as f:
      data = f.read()
    img = Image.open(io.BytesIO(data))
    img.load()
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
    raise ClipError(path, f'unreadable {what}: {type(e).__name__}: {e}') from e
  return data, img


def _png(array):
  out = io.BytesIO()
  Image.fromarray(array).save(out, format='PNG', compress_level=1)
  return out.getvalue()


def read_frame(path):
  """PNG bytes of an RGB frame (the file's own bytes when already RGB PNG)."""
  data, img = _open_image(path, 'frame')
  if img.format == 'PNG' and img.mode == 'RGB':
    return data, img.size
  return _png(np.asarray(img.convert('RGB'))), img.size


def mask_array(img):
  """Binary uint8 [H, W] in {0, 1}: grayscale >= 128."""
  return (np.asarray(img.convert('L')) >= 128).astype(np.uint8)


def read_mask(path):
  """PNG bytes of the binary mask (values 0/1, one channel)."""
  _, img = _open_image(path, 'mask')
  return _png(mask_array(img))


def load_clip(clip):
  """Reads and checks one clip; returns its record (the TFDS features' input).

  Returns dict: id, category (str); frames, masks: 5 PNG byte strings each
  (masks 0/1, all-zero where unlabelled); labelled bool [5];
  log_mel float32 [5, 96, 64]. Raises ClipError naming the first bad file.
  """
  frames, sizes = zip(*(read_frame(p) for p in clip.frames))
  masks = []
  for path, (w, h) in zip(clip.masks, sizes):
    masks.append(
        _png(np.zeros((h, w), np.uint8)) if path is None else read_mask(path)
    )
  if not os.path.isfile(clip.wav):
    raise ClipError(clip.wav, 'missing audio')
  try:
    log_mel = audio.clip_examples(clip.wav, num_seconds=NUM_FRAMES)
  except Exception as e:  # decoding errors of soundfile/audioread/librosa.
    raise ClipError(clip.wav, f'unreadable audio: {e}') from e
  return dict(
      id=clip.id,
      category=clip.category,
      frames=list(frames),
      masks=masks,
      labelled=np.array([p is not None for p in clip.masks]),
      log_mel=np.asarray(log_mel, np.float32),
  )
