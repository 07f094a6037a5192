r"""The AVSBench-semantic layout (AVSS): list its clips, read one clip.

As the official dataloader (`avs_scripts/avss/color_dataloader.py`) reads it:
  ROOT/metadata.csv          columns include uid, label (the subset: v1s, v1m
                             or v2) and split (train, val, test)
  ROOT/label2idx.json        {class name: index}, 71 entries (0: background)
  ROOT/{label}/{uid}/frames/{0..n-1}.jpg       n = 5 (v1s, v1m) or 10 (v2)
  ROOT/{label}/{uid}/labels_rgb/{0..k-1}.png   colour labels (the palette of
                             `avs_jax.avss.palette`); k <= n: v1s train clips
                             label only their first frame
  ROOT/{label}/{uid}/audio.wav

A clip becomes a record of 10 frames: v1 clips are padded (frame mask 0, no
frame, label all background), `gt_mask` is the subset's annotated-frame mask
(`avss.temporal_masks`), the log-mel examples are the first 10 of the wav,
zero-padded to 10 as the reference's VGGish wrapper does. Label colours map
to class indices as the reference (`color_mask_to_label`: a colour outside
the palette becomes 0); a label of another size than its frame, a missing or
unreadable file, or a frame/label count that does not fit the subset raises
`layout.ClipError` naming the file. CSV rows that are not clips are
reported by `read_clips` and left out. No TensorFlow here: the shards are
written by `python -m data_prep.avsbench --setting avss --root ROOT --out
OUT` (`load_example` gives its records).
"""

import csv
import dataclasses
import json
import os

import numpy as np

from avs_jax import audio
from avs_jax import avss
from data_prep import layout

SPLITS = ('train', 'val', 'test')
CSV_FIELDS = ('uid', 'label', 'split')


@dataclasses.dataclass(frozen=True)
class Clip:
  """Where one AVSS clip's files are."""

  id: str
  subset: str  # v1s | v1m | v2
  split: str
  folder: str


def read_class_names(root):
  """Class names by index from ROOT/label2idx.json (checked: 0..K-1)."""
  path = os.path.join(root, 'label2idx.json')
  try:
    with open(path) as f:
      table = json.load(f)
  except OSError as e:
    raise layout.LayoutError(f'{path}: cannot read: {e.strerror}') from e
  except ValueError as e:
    raise layout.LayoutError(f'{path}: not JSON: {e}') from e
  if not isinstance(table, dict) or sorted(table.values()) != list(
      range(len(table))
  ):
    raise layout.LayoutError(
        f'{path}: expected {{name: index}} with indices '
        f'0..{len(table) - 1 if table else 0}'
    )
  if len(table) != avss.NUM_CLASSES:
    raise layout.LayoutError(
        f'{path}: {len(table)} classes, AVSBench-'
        f'semantic has {avss.NUM_CLASSES}'
    )
  names = [''] * len(table)
  for name, i in table.items():
    names[i] = name
  return names


def read_clips(root):
  """([Clip], [problem dict]) from ROOT/metadata.csv.

  A problem (split, id, file, reason) per row that is not a clip: unknown
  subset or split, an id listed twice, a uid that is not a folder name.
  Raises layout.LayoutError when the CSV is missing or lacks a column.
  """
  path = os.path.join(root, 'metadata.csv')
  try:
    with open(path, newline='', encoding='utf-8') as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise layout.LayoutError(f'{path}: cannot read: {e.strerror}') from e
  except UnicodeDecodeError as e:
    raise layout.LayoutError(f'{path}: not UTF-8 text ({e.reason})') from e
  missing = [c for c in CSV_FIELDS if rows and c not in rows[0]]
  if not rows or missing:
    raise layout.LayoutError(
        f'{path}: no rows'
        if not rows
        else f'{path}: missing column(s) {missing}'
    )
  clips, problems, seen = [], [], set()
  for n, row in enumerate(rows, start=2):
    uid, subset, split = (row[c] or '' for c in CSV_FIELDS)
    bad = None
    if subset not in avss.SUBSETS:
      bad = f'unknown subset (label) {subset!r}, expected {avss.SUBSETS}'
    elif split not in SPLITS:
      bad = f'unknown split {split!r}, expected {SPLITS}'
    elif not uid or os.sep in uid or uid in ('.', '..'):
      bad = f'clip uid {uid!r} is not a folder name'
    elif uid in seen:
      bad = f'clip {uid!r} listed twice'
    if bad:
      problems.append(dict(split=split, id=uid, file=f'{path}:{n}', reason=bad))
      continue
    seen.add(uid)
    clips.append(Clip(uid, subset, split, os.path.join(root, subset, uid)))
  return clips, problems


def _numbered(folder, ext, what):
  """Paths `0.ext, 1.ext, ...` of a folder (contiguous from 0)."""
  if not os.path.isdir(folder):
    raise layout.ClipError(folder, f'missing {what} folder')
  names = {n for n in os.listdir(folder) if n.endswith(ext)}
  count = 0
  while f'{count}{ext}' in names:
    count += 1
  if count != len(names):
    raise layout.ClipError(
        folder,
        f'{what} files must be named 0{ext}, '
        f'1{ext}, ... without gaps; found {sorted(names)}',
    )
  return [os.path.join(folder, f'{i}{ext}') for i in range(count)]


def read_label(path, frame_size, pal):
  """[H, W] uint8 class indices of a colour label PNG of size `frame_size`."""
  _, img = layout._open_image(path, 'label')  # pylint: disable=protected-access
  if img.size != frame_size:
    raise layout.ClipError(
        path,
        f'label size {img.width}x{img.height} differs from its frame '
        f'({frame_size[0]}x{frame_size[1]})',
    )
  return avss.color_to_label(np.asarray(img.convert('RGB')), pal).astype(
      np.uint8
  )


def read_log_mel(path):
  """[10, 96, 64] float32: the wav's first 10 VGGish examples, zero-padded."""
  layout.read_log_mel(path)  # the checks (missing, truncated, too short)
  ex = audio.waveform_to_examples(audio.load_audio(path), audio.SAMPLE_RATE)
  out = np.zeros((avss.FRAMES_PER_CLIP, 96, 64), np.float32)
  ex = np.asarray(ex, np.float32)[: avss.FRAMES_PER_CLIP]
  out[: len(ex)] = ex
  return out


def load_clip(clip):
  """Reads and checks one clip; returns its record.

  Returns dict: id, subset, split; frames: n PNG byte strings (n = 5 or 10);
  labels uint8 [10, H, W] (class indices; background beyond the labelled
  frames); num_labels (k); frame_mask, gt_mask float32 [10]; log_mel
  float32 [10, 96, 64]. Raises layout.ClipError naming the first bad file.
  """
  n_expected = 10 if clip.subset == 'v2' else 5
  frame_paths = _numbered(os.path.join(clip.folder, 'frames'), '.jpg', 'frame')
  if len(frame_paths) != n_expected:
    raise layout.ClipError(
        os.path.join(clip.folder, 'frames'),
        f'{len(frame_paths)} frames; a {clip.subset} clip has {n_expected}',
    )
  label_paths = _numbered(
      os.path.join(clip.folder, 'labels_rgb'), '.png', 'label'
  )
  if not 1 <= len(label_paths) <= n_expected:
    raise layout.ClipError(
        os.path.join(clip.folder, 'labels_rgb'),
        f'{len(label_paths)} labels; a {clip.subset} clip has 1 to '
        f'{n_expected}',
    )
  frames, sizes = zip(*(layout.read_frame(p) for p in frame_paths))
  if len(set(sizes)) != 1:
    raise layout.ClipError(
        frame_paths[sizes.index(sizes[-1])],
        f'frames of one clip differ in size: {set(sizes)}',
    )
  w, h = sizes[0]
  pal = avss.palette()
  labels = np.zeros((avss.FRAMES_PER_CLIP, h, w), np.uint8)
  for i, p in enumerate(label_paths):
    labels[i] = read_label(p, (w, h), pal)
  frame_mask, gt_mask = avss.temporal_masks(clip.subset)
  return dict(
      id=clip.id,
      subset=clip.subset,
      split=clip.split,
      frames=list(frames),
      labels=labels,
      num_labels=len(label_paths),
      frame_mask=frame_mask,
      gt_mask=gt_mask,
      log_mel=read_log_mel(os.path.join(clip.folder, 'audio.wav')),
  )


def to_example(record):
  """A `load_clip` record -> the `avss` TFDS features' input.

  frames: 10 PNG byte strings (black where a 5-frame clip is padded);
  masks: 10 one-channel PNGs of class indices; labelled = gt_mask > 0;
  frame_mask > 0; log_mel [10, 96, 64]; category: the subset.
  """
  labels = record['labels']
  n = len(record['frames'])
  black = layout._png(  # pylint: disable=protected-access
      np.zeros(labels.shape[1:] + (3,), np.uint8)
  )
  return dict(
      id=record['id'],
      category=record['subset'],
      frames=list(record['frames']) + [black] * (avss.FRAMES_PER_CLIP - n),
      masks=[layout._png(m) for m in labels],  # pylint: disable=protected-access
      labelled=record['gt_mask'] > 0,
      frame_mask=record['frame_mask'] > 0,
      log_mel=record['log_mel'],
  )


def load_example(clip):
  """`to_example(load_clip(clip))`: one clip's record for the shards."""
  return to_example(load_clip(clip))


def make_synthetic_tree(
    root,
    clips=(('v2', 'train'), ('v1s', 'train'), ('v1m', 'test')),
    size=(48, 32),
    seed=0,
):
  """A tiny AVSBench-semantic tree for tests: coloured rectangles of random
  classes, a 440 Hz tone. Returns {uid: labels uint8 [n_labels, H, W]}."""
  import soundfile  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  w, h = size
  pal = avss.palette()
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, 'label2idx.json'), 'w') as f:
    json.dump(
        {
            ('background' if i == 0 else f'class_{i}'): i
            for i in range(avss.NUM_CLASSES)
        },
        f,
    )
  truth = {}
  with open(os.path.join(root, 'metadata.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['vid', 'uid', 'split', 'label'])
    for j, (subset, split) in enumerate(clips):
      uid = f'clip{j}_{subset}'
      writer.writerow([j, uid, split, subset])
      folder = os.path.join(root, subset, uid)
      os.makedirs(os.path.join(folder, 'frames'))
      os.makedirs(os.path.join(folder, 'labels_rgb'))
      n = 10 if subset == 'v2' else 5
      k = 1 if (subset == 'v1s' and split == 'train') else n
      labs = []
      for i in range(n):
        lab = np.zeros((h, w), np.uint8)
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        lab[y0 : y0 + h // 2, x0 : x0 + w // 2] = rng.integers(1, 71)
        img = pal[lab].astype(np.float32) * 0.5 + rng.uniform(0, 60, (h, w, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(
            os.path.join(folder, 'frames', f'{i}.jpg'), quality=95
        )
        if i < k:
          Image.fromarray(pal[lab]).save(
              os.path.join(folder, 'labels_rgb', f'{i}.png')
          )
          labs.append(lab)
      t = np.arange(16000 * n) / 16000
      soundfile.write(
          os.path.join(folder, 'audio.wav'),
          (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
          16000,
          subtype='PCM_16',
      )
      truth[uid] = np.stack(labs)
  return truth
