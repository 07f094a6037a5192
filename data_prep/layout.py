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

Every clip is checked before it becomes a record: all files present and
decodable, each mask the size of its frame, each wav holding the samples its
header declares. A bad clip raises ClipError (its file, the reason in words);
a bad CSV row (a name that is not UTF-8 or not a file name, another split, an
id listed twice) is reported by `read_clips` and the other rows are kept.
"""

import collections
import csv
import dataclasses
import io
import os
import struct

import numpy as np
from PIL import Image
import soundfile

from avs_jax import audio
from avs_jax.data import records

SUBSETS = {'s4': 'Single-source', 'ms3': 'Multi-sources'}
# The columns AVSBench's CSVs begin with (the synthetic CSVs have these too).
# S4 is read by name, category and split; MS3 by its first column and split.
CSV_FIELDS = {
    's4': ('name', 'start_time', 'category', 'split'),
    'ms3': ('video_id', 'split'),
}


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
  """The CSV listing the clips of `setting`."""
  return os.path.join(root, SUBSETS[setting], f'{setting}_meta_data.csv')


def locate(root, setting, name, split, category=''):
  """The Clip `name` of `setting` (its files' paths; they need not exist)."""
  n = records.NUM_FRAMES
  if setting == 's4':
    base = os.path.join(root, SUBSETS[setting], 's4_data')
    frames = os.path.join(base, 'visual_frames', split, category, name)
    masks = os.path.join(base, 'gt_masks', split, category, name)
    wav = os.path.join(base, 'audio_wav', split, category, name + '.wav')
    frame_files = [f'{name}_{i}.png' for i in range(1, n + 1)]
    num_masks = 1 if split == 'train' else n
  else:
    base = os.path.join(root, SUBSETS[setting], 'ms3_data')
    frames = os.path.join(base, 'visual_frames', name)
    masks = os.path.join(base, 'gt_masks', split, name)
    wav = os.path.join(base, 'audio_wav', split, name + '.wav')
    frame_files = [f'{name}.mp4_{i}.png' for i in range(1, n + 1)]
    num_masks = n
  return Clip(
      id=name,
      category=category,
      split=split,
      frames=tuple(os.path.join(frames, f) for f in frame_files),
      masks=tuple(
          os.path.join(masks, f'{name}_{i}.png') if i <= num_masks else None
          for i in range(1, n + 1)
      ),
      wav=wav,
  )


# ----------------------------------------------------------------------------
# The CSV.


def _text(value):
  """A CSV field as printable text: bytes that are not UTF-8 as `\\xNN`."""
  return value.encode('utf-8', 'surrogateescape').decode(
      'utf-8', 'backslashreplace'
  )


def _read_rows(path, setting):
  """[(line, id, category, split)] of the CSV; missing fields are None.

  A byte-order mark is skipped. Bytes that are not UTF-8 are kept as
  surrogates (`surrogateescape`), so only their rows are refused.
  """
  required = ('name', 'category', 'split') if setting == 's4' else ('split',)
  try:
    with open(
        path, newline='', encoding='utf-8-sig', errors='surrogateescape'
    ) as f:
      reader = csv.DictReader(f)
      fields = reader.fieldnames or []
      missing = [c for c in required if c not in fields]
      if missing:
        raise LayoutError(
            f'{path}: missing column(s) {", ".join(missing)} '
            f'(has {", ".join(map(_text, fields)) or "no header"})'
        )
      id_column = 'name' if setting == 's4' else fields[0]
      return [
          (reader.line_num, r[id_column], r.get('category', ''), r['split'])
          for r in reader
      ]
  except (OSError, csv.Error) as e:
    raise LayoutError(f'cannot read {path}: {e}') from e


def _name_problem(value, what):
  """Why `value` cannot be a clip name or category (a folder or file name)."""
  if value is None:
    return f'no {what} (the line has fewer fields than the header)'
  if _text(value) != value:
    return f"{what} '{_text(value)}' is not UTF-8 text"
  if not value.strip():
    return f'empty {what}'
  if '/' in value or '\\' in value or value in ('.', '..'):
    return f'{what} {value!r} is not a file name'
  return None


def _row_problem(setting, name, category, split):
  """Why a CSV row is not a clip to prepare, or None."""
  problem = _name_problem(name, 'clip name')
  if problem is None and setting == 's4':
    problem = _name_problem(category, 'category')
  if problem is None and split not in records.SPLITS:
    problem = (
        f"split '{_text(split)}' is not train, val or test"
        if split is not None
        else 'no split (the line has fewer fields than the header)'
    )
  return problem


def read_clips(root, setting):
  """The clips of `setting` listed in its CSV, and the rows left out.

  Returns (clips sorted by (split, id), problems); a problem is a dict split,
  id, file (the CSV), reason ('line N: ...') for a row that is not a clip:
  a name or S4 category that is not UTF-8 or not a file name, a split other
  than train/val/test, or an id listed more than once (all its rows). Raises
  LayoutError (one line) for an unknown setting, a missing root or a
  missing/unreadable CSV.
  """
  if setting not in records.SETTINGS:
    raise LayoutError(f'unknown setting {setting!r} (expected s4 or ms3)')
  if not os.path.isdir(root):
    raise LayoutError(f'root {root!r} is not a directory')
  path = csv_path(root, setting)
  if not os.path.isfile(path):
    raise LayoutError(
        f'{path} not found: is --root the AVSBench-object '
        f'directory (holding Single-source/ and Multi-sources/)?'
    )
  rows, problems = [], []
  for line, name, category, split in _read_rows(path, setting):
    problem = _row_problem(setting, name, category, split)
    if problem:
      problems.append(
          dict(
              split=_text(split or ''),
              id=_text(name or ''),
              file=path,
              reason=f'line {line}: {problem}',
          )
      )
    else:
      rows.append((line, name, category if setting == 's4' else '', split))
  lines = collections.defaultdict(list)
  for line, name, _, _ in rows:
    lines[name].append(line)
  clips = []
  for line, name, category, split in rows:
    if len(lines[name]) > 1:
      problems.append(
          dict(
              split=split,
              id=name,
              file=path,
              reason=f'line {line}: clip id {name!r} is listed '
              f'{len(lines[name])} times (lines '
              f'{", ".join(map(str, lines[name]))})',
          )
      )
    else:
      clips.append(locate(root, setting, name, split, category))
  clips.sort(key=lambda c: (records.SPLITS.index(c.split), c.id))
  return clips, problems


# ----------------------------------------------------------------------------
# One clip's files.


def _describe(e):
  """An exception in words: its message, or what its type says without one."""
  return str(e) or f'{type(e).__name__} (no reason given)'


def _read_bytes(path, what):
  if not os.path.isfile(path):
    raise ClipError(path, f'missing {what}')
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise ClipError(path, f'unreadable {what}: {e.strerror}') from e
  if not data:
    raise ClipError(path, f'unreadable {what}: empty file (0 bytes)')
  return data


def _open_image(path, what):
  data = _read_bytes(path, what)
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except Image.UnidentifiedImageError as e:
    raise ClipError(
        path,
        f'unreadable {what}: not an image format PIL knows ({len(data)} '
        f'bytes, starting {data[:8]!r})',
    ) from e
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
    raise ClipError(path, f'unreadable {what}: {_describe(e)}') from e
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


def read_mask(path, frame, frame_size):
  """PNG bytes of the binary mask (0/1, one channel: grayscale >= 128).

  Raises ClipError unless the mask has its frame's size `(width, height)`.
  """
  _, img = _open_image(path, 'mask')
  if img.size != frame_size:
    raise ClipError(
        path,
        f'mask size {img.width}x{img.height} differs from its frame '
        f'({frame_size[0]}x{frame_size[1]}, {os.path.basename(frame)})',
    )
  return _png((np.asarray(img.convert('L')) >= 128).astype(np.uint8))


def _amount(num_bytes, byte_rate):
  seconds = f' ({num_bytes / byte_rate:.2f} s)' if byte_rate else ''
  return f'{num_bytes} bytes{seconds}'


def check_wav_length(path):
  """Raises ClipError when a WAVE file holds less than its header declares.

  Decoders read such a file without a word (they stop where the bytes end),
  so a wav cut in half would become 2.5 s of sound padded to 5 s. Files that
  are not RIFF WAVE are left to the decoder.
  """
  size = os.path.getsize(path)
  byte_rate, offset = None, 12
  with open(path, 'rb') as f:
    head = f.read(12)
    if head[:4] != b'RIFF' or head[8:12] != b'WAVE':
      return
    while offset + 8 <= size:
      f.seek(offset)
      chunk, length = struct.unpack('<4sI', f.read(8))
      if chunk == b'fmt ' and length >= 12:
        byte_rate = struct.unpack('<I', f.read(12)[8:12])[0]
      elif chunk == b'data':
        held = size - offset - 8
        # 0 and 0xFFFFFFFF: the size of a stream written without seeking.
        if length not in (0, 0xFFFFFFFF) and held < length:
          raise ClipError(
              path,
              f'truncated audio: its header declares '
              f'{_amount(length, byte_rate)} of samples, the file holds '
              f'{_amount(held, byte_rate)}',
          )
        return
      offset += 8 + length + (length & 1)
  raise ClipError(path, 'truncated audio: the file ends before its samples')


def read_log_mel(path):
  """VGGish log-mel examples float32 [5, 96, 64] of a clip's wav.

  The file must be one libsndfile reads (WAV, FLAC, OGG, MP3). Raises
  ClipError for a missing, truncated, undecodable or too short file.
  """
  if not os.path.isfile(path):
    raise ClipError(path, 'missing audio')
  if not os.path.getsize(path):
    raise ClipError(path, 'unreadable audio: empty file (0 bytes)')
  check_wav_length(path)
  # librosa decodes with libsndfile, falling back to audioread, which says no
  # more than `NoBackendError`: libsndfile's own reason is in words.
  try:
    soundfile.info(path)
  except soundfile.LibsndfileError as e:
    reason = e.error_string.rstrip('.')
    raise ClipError(path, f'unreadable audio: {reason} (libsndfile)') from e
  try:
    samples = audio.load_audio(path)
  except audio.AudioLoadError as e:
    reason = _describe(e.__cause__ or e)
    raise ClipError(path, f'unreadable audio: {reason}') from e
  if len(samples) < audio.MIN_SAMPLES:
    raise ClipError(
        path,
        f'audio too short: {len(samples) / audio.SAMPLE_RATE:.2f} s, less '
        'than one VGGish example (0.96 s)',
    )
  return audio.clip_examples(samples, num_seconds=records.NUM_FRAMES)


def load_clip(clip):
  """Reads and checks one clip; returns its record (the TFDS features' input).

  Returns dict: id, category (str); frames, masks: 5 PNG byte strings each
  (masks 0/1, all-zero where unlabelled); labelled bool [5];
  log_mel float32 [5, 96, 64]. Raises ClipError naming the first bad file.
  """
  frames, sizes = zip(*(read_frame(p) for p in clip.frames))
  masks = [
      _png(np.zeros((h, w), np.uint8))
      if path is None
      else read_mask(path, frame, (w, h))
      for path, frame, (w, h) in zip(clip.masks, clip.frames, sizes)
  ]
  return dict(
      id=clip.id,
      category=clip.category,
      frames=list(frames),
      masks=masks,
      labelled=np.array([p is not None for p in clip.masks]),
      log_mel=np.asarray(read_log_mel(clip.wav), np.float32),
  )
