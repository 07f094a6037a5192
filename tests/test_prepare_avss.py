"""data_prep.avss: the AVSBench-semantic layout on a tiny synthetic tree."""

import os

import numpy as np
import pytest

from avs_jax import avss
from data_prep import avss as prep
from data_prep import layout


@pytest.fixture()
def tree(tmp_path):
  root = str(tmp_path / 'avss')
  return root, prep.make_synthetic_tree(root)


def test_clips_records_and_padding(tree):
  root, truth = tree
  names = prep.read_class_names(root)
  assert len(names) == 71 and names[0] == 'background'
  clips, problems = prep.read_clips(root)
  assert not problems
  assert [(c.subset, c.split) for c in clips] == [
      ('v2', 'train'),
      ('v1s', 'train'),
      ('v1m', 'test'),
  ]
  for clip in clips:
    r = prep.load_clip(clip)
    k = len(truth[clip.id])
    assert r['num_labels'] == k
    np.testing.assert_array_equal(r['labels'][:k], truth[clip.id])
    assert not r['labels'][k:].any()  # padded / unlabelled: background
    vid, gt = avss.temporal_masks(clip.subset)
    np.testing.assert_array_equal(r['frame_mask'], vid)
    np.testing.assert_array_equal(r['gt_mask'], gt)
    n = 10 if clip.subset == 'v2' else 5
    assert len(r['frames']) == n
    assert r['log_mel'].shape == (10, 96, 64)
    assert r['log_mel'][:n].std() > 0
    assert not r['log_mel'][n:].any()  # zero-padded as the reference


def test_bad_rows_and_files_are_named(tree):
  root, _ = tree
  with open(os.path.join(root, 'metadata.csv'), 'a') as f:
    f.write('9,clip0_v2,train,v2\n8,x,train,v3\n7,y,dev,v2\n')
  clips, problems = prep.read_clips(root)
  assert len(clips) == 3
  reasons = [p['reason'] for p in problems]
  assert 'listed twice' in reasons[0] and 'unknown subset' in reasons[1]
  assert 'unknown split' in reasons[2]

  v2 = clips[0]
  os.remove(os.path.join(v2.folder, 'frames', '3.jpg'))
  with pytest.raises(layout.ClipError, match='without gaps') as e:
    prep.load_clip(v2)
  assert e.value.file.endswith('frames')

  from PIL import Image

  v1m = clips[2]
  path = os.path.join(v1m.folder, 'labels_rgb', '2.png')
  Image.new('RGB', (10, 10)).save(path)
  with pytest.raises(layout.ClipError, match='label size 10x10 differs'):
    prep.load_clip(v1m)


def test_layout_errors(tmp_path):
  with pytest.raises(layout.LayoutError, match='metadata.csv'):
    prep.read_clips(str(tmp_path))
  (tmp_path / 'label2idx.json').write_text('{"background": 0, "a": 2}')
  with pytest.raises(layout.LayoutError, match='indices'):
    prep.read_class_names(str(tmp_path))
