"""Synthetic AVSBench: layout, determinism, the audio decides the mask; the
demo's data is made once and refused when made with other parameters.
"""

import csv
import hashlib
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest
import soundfile as sf

from avs_jax import audio
from avs_jax import data
from data_prep import synthetic

SIZE = 48
CLIPS = 10  # per subset -> 6 train / 2 val / 2 test


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('synth'))
  synthetic.generate(path, CLIPS, seed=0, size=SIZE, workers=1)
  return path


def read_csv(root, setting):
  sub = 'Single-source' if setting == 's4' else 'Multi-sources'
  with open(
      os.path.join(root, sub, f'{setting}_meta_data.csv'), newline=''
  ) as f:
    return list(csv.DictReader(f))


def clip_files(root, setting, row):
  """(frames, masks, wav) paths of the documented AVSBench layout.

  Stated here independently of `data_prep.layout.locate` (which the generator
  writes with and the preparation reads with), so a wrong path fails here.
  """
  if setting == 's4':
    name, cat, split = row['name'], row['category'], row['split']
    base = f'{root}/Single-source/s4_data'
    frames = [
        f'{base}/visual_frames/{split}/{cat}/{name}/{name}_{i}.png'
        for i in range(1, 6)
    ]
    n = 1 if split == 'train' else 5
    masks = [
        f'{base}/gt_masks/{split}/{cat}/{name}/{name}_{i}.png'
        for i in range(1, n + 1)
    ]
    return frames, masks, f'{base}/audio_wav/{split}/{cat}/{name}.wav'
  name, split = row['video_id'], row['split']
  base = f'{root}/Multi-sources/ms3_data'
  frames = [
      f'{base}/visual_frames/{name}/{name}.mp4_{i}.png' for i in range(1, 6)
  ]
  masks = [
      f'{base}/gt_masks/{split}/{name}/{name}_{i}.png' for i in range(1, 6)
  ]
  return frames, masks, f'{base}/audio_wav/{split}/{name}.wav'


def gray_mask(path):
  return np.asarray(Image.open(path).convert('L')) >= 128


def near(img, color, tol=40):
  return np.linalg.norm(img.astype(float) - color, axis=-1) < tol


@pytest.mark.parametrize('setting', ['s4', 'ms3'])
def test_layout_and_splits(root, setting):
  rows = read_csv(root, setting)
  assert [r['split'] for r in rows] == ['train'] * 6 + ['val'] * 2 + [
      'test'
  ] * 2
  id_col = 'name' if setting == 's4' else 'video_id'
  assert list(rows[0])[0] == id_col and 'split' in rows[0]
  for row in rows:
    frames, masks, wav = clip_files(root, setting, row)
    for path in frames:
      img = Image.open(path)
      assert img.mode == 'RGB' and img.size == (SIZE, SIZE)
    for path in masks:
      assert Image.open(path).mode == ('L' if setting == 's4' else 'P')
    data, sr = sf.read(wav, dtype='int16')
    assert sr == 16000 and data.shape == (80000,)
    assert sf.info(wav).subtype == 'PCM_16'
  if setting == 's4':  # no masks beyond the first in S4 train
    frames, masks, _ = clip_files(root, setting, rows[0])
    assert not os.path.exists(masks[0].replace('_1.png', '_2.png'))


def test_splits_70_15_15():
  splits = [synthetic.split_of(i, 100) for i in range(100)]
  assert [splits.count(s) for s in ('train', 'val', 'test')] == [70, 15, 15]


def tree_digest(root):
  h = hashlib.sha256()
  for dirpath, _, files in sorted(os.walk(root)):
    for name in sorted(files):
      path = os.path.join(dirpath, name)
      h.update(os.path.relpath(path, root).encode())
      with open(path, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


def test_deterministic_per_seed(root, tmp_path):
  synthetic.generate(str(tmp_path / 'a'), CLIPS, seed=0, size=SIZE, workers=2)
  synthetic.generate(str(tmp_path / 'b'), CLIPS, seed=1, size=SIZE, workers=1)
  assert tree_digest(str(tmp_path / 'a')) == tree_digest(root)
  assert tree_digest(str(tmp_path / 'b')) != tree_digest(root)


def sounding(row):
  return [set(s.split('+')) - {''} for s in row['sounding'].split('|')]


@pytest.mark.parametrize('setting', ['s4', 'ms3'])
def test_masks_are_the_sounding_objects(root, setting):
  """Silent objects stay visible; masks cover the sounding objects only."""
  seen_empty = seen_two = False
  classes = {c.name: c for c in synthetic.CLASSES}
  for row in read_csv(root, setting):
    frames, masks, _ = clip_files(root, setting, row)
    objects = row['objects'].split()
    per_second = sounding(row)
    assert 2 <= len(objects) <= 4 and len(set(objects)) == len(objects)
    if setting == 's4':
      assert per_second == [{row['category']}] * 5
    for t, path in enumerate(masks):
      img = np.asarray(Image.open(frames[t]).convert('RGB'))
      mask = gray_mask(path)
      seen_empty |= not per_second[t]
      seen_two |= len(per_second[t]) == 2
      assert mask.any() == bool(per_second[t])
      for name in objects:
        pixels = near(img, classes[name].color)
        assert pixels.sum() >= 4, f'{name} not visible in {frames[t]}'
        inside = (pixels & mask).sum() / pixels.sum()
        if name in per_second[t]:
          assert inside > 0.97
        else:
          assert inside < 0.03
  if setting == 'ms3':
    assert seen_empty and seen_two


def class_bins(cls):
  """Mel bands whose centre lies inside the class's frequency band."""
  edges = np.linspace(audio.hertz_to_mel(125.0), audio.hertz_to_mel(7500.0), 66)
  centres = 700.0 * np.expm1(edges[1:-1] / 1127.0)
  return (centres >= cls.band[0]) & (centres <= cls.band[1])


@pytest.mark.parametrize('setting', ['s4', 'ms3'])
def test_audio_tells_which_objects_sound(root, setting):
  """Each second's log-mel has energy in exactly the sounding classes' bands."""
  for row in read_csv(root, setting):
    _, _, wav = clip_files(root, setting, row)
    examples = audio.clip_examples(wav)
    for t, names in enumerate(sounding(row)):
      for cls in synthetic.CLASSES:
        level = examples[t][:, class_bins(cls)].mean()
        if cls.name in names:
          assert level > -1.5, (wav, t, cls.name, level)
        else:
          assert level < -2.5, (wav, t, cls.name, level)


def test_classes_are_distinct():
  assert len(synthetic.CLASSES) >= 6
  for attr in ('name', 'color', 'shape', 'band'):
    values = [getattr(c, attr) for c in synthetic.CLASSES]
    assert len(set(values)) == len(values), attr
  bands = sorted(c.band for c in synthetic.CLASSES)
  assert all(hi < lo for (_, hi), (lo, _) in zip(bands, bands[1:]))


def test_cli_rejects_too_few_clips(tmp_path):
  proc = subprocess.run(
      [
          sys.executable,
          '-m',
          'data_prep.synthetic',
          '--out',
          str(tmp_path),
          '--clips',
          '2',
      ],
      capture_output=True,
      text=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().count('\n') == 0 and 'clips' in proc.stderr


def demo_config(base, setting='ms3', clips=6):
  """The `data` part of a demo config (configs/synthetic.py), tiny."""
  return ml_collections.ConfigDict(
      dict(
          data=dict(
              dir=str(base / 'tfds'),
              setting=setting,
              synthetic=dict(
                  root=str(base / 'raw'), clips=clips, seed=0, size=32
              ),
          )
      )
  )


def test_demo_data_made_once_and_refused_with_other_parameters(tmp_path):
  config = demo_config(tmp_path)
  synthetic.ensure_synthetic_data(config)
  assert data.num_examples(config.data.dir, 'ms3', 'train') == 4
  assert not os.path.exists(f'{tmp_path}/raw/Single-source')  # MS3 only
  raw = os.path.join(config.data.synthetic.root, 'synthetic.json')
  shards = os.path.join(config.data.dir, 'synthetic.json')
  made = os.path.getmtime(raw), os.path.getmtime(shards)
  synthetic.ensure_synthetic_data(config)  # same parameters: reused as is
  assert (os.path.getmtime(raw), os.path.getmtime(shards)) == made
  os.remove(shards)  # as if preparation was interrupted: redone, not the clips
  synthetic.ensure_synthetic_data(config)
  assert os.path.getmtime(raw) == made[0] and os.path.exists(shards)
  with pytest.raises(
      synthetic.SyntheticDataError, match=re.escape(config.data.dir)
  ) as e:
    synthetic.ensure_synthetic_data(demo_config(tmp_path, clips=7))
  assert "'clips': 6" in str(e.value) and "'clips': 7" in str(e.value)
  with pytest.raises(synthetic.SyntheticDataError, match='setting'):
    synthetic.ensure_synthetic_data(demo_config(tmp_path, setting='s4'))
