"""data_prep.avss: the AVSBench-semantic layout on a tiny synthetic tree."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from avs_jax import avss
from avs_jax import data
from avs_jax.data import records
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


# ---------------------------------------------------------------------------
# Shards: `python -m data_prep.avsbench --setting avss`, read back by the
# input pipeline.


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSETS = (
    ('v2', 'train'),
    ('v1s', 'train'),
    ('v1m', 'train'),
    ('v2', 'val'),
    ('v1m', 'test'),
    ('v1s', 'test'),
    ('v2', 'test'),
)


def prepare_cli(*args):
  return subprocess.run(
      [sys.executable, '-m', 'data_prep.avsbench', *args],
      capture_output=True,
      text=True,
      cwd=REPO,
      timeout=300,
  )


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  """A synthetic AVSBench-semantic tree with one broken clip, prepared by
  the command line (the broken clip left out and reported)."""
  base = tmp_path_factory.mktemp('avss_shards')
  root, out = str(base / 'raw'), str(base / 'out')
  truth = prep.make_synthetic_tree(root, clips=SUBSETS, size=(48, 32), seed=1)
  bad = os.path.join(root, 'v1m', 'clip2_v1m', 'labels_rgb', '3.png')
  with open(bad, 'wb') as f:
    f.write(b'not a png')
  p = prepare_cli('--root', root, '--setting', 'avss', '--out', out)
  return dict(root=root, out=out, truth=truth, bad=bad, proc=p)


def test_shards_round_trip_the_tree(shards):
  out, truth = shards['out'], shards['truth']
  assert data.num_examples(out, 'avss', 'train') == 2  # clip2_v1m left out
  assert data.num_examples(out, 'avss', 'test') == 3
  names = records.class_names(out, 'avss')
  assert len(names) == 71 and names[0] == 'background'
  seen = set()
  for split in ('train', 'val', 'test'):
    for b in data.eval_dataset(
        out,
        'avss',
        split,
        batch_size=2,
        image_size=(32, 48),
        process_index=0,
        process_count=1,
    ):
      for i, cid in enumerate(b['id']):
        if not b['valid'][i]:
          assert not b['frame_mask'][i].any() and not b['labels'][i].any()
          continue
        seen.add(str(cid))
        subset = str(b['category'][i])
        k = len(truth[cid])
        n = 10 if subset == 'v2' else 5
        # The labels are the generator's class indices, background elsewhere.
        np.testing.assert_array_equal(b['labels'][i, :k], truth[cid])
        assert not b['labels'][i, k:].any()
        vid, gt = avss.temporal_masks(subset)
        np.testing.assert_array_equal(b['frame_mask'][i], vid)
        np.testing.assert_array_equal(b['gt_mask'][i], gt)
        assert b['frames'].shape[1:] == (10, 32, 48, 3)
        assert np.abs(b['frames'][i, :n]).mean(axis=(1, 2, 3)).min() > 0.1
        assert not b['frames'][i, n:].any()  # padded frames are zeros
        assert b['log_mel'][i, :n].std() > 0 and not b['log_mel'][i, n:].any()
  assert seen == set(truth) - {'clip2_v1m'}


def test_frames_decode_to_the_source_jpegs(shards):
  """At the stored size the frames are the JPEGs' pixels, normalised."""
  root, out = shards['root'], shards['out']
  (b,) = list(
      data.eval_dataset(
          out,
          'avss',
          'val',
          batch_size=1,
          image_size=(32, 48),
          process_index=0,
          process_count=1,
      )
  )
  jpg = os.path.join(root, 'v2', 'clip3_v2', 'frames', '7.jpg')
  rgb = np.asarray(Image.open(jpg).convert('RGB'), np.float32) / 255.0
  want = (rgb - data.IMAGENET_MEAN) / data.IMAGENET_STD
  np.testing.assert_allclose(b['frames'][0, 7], want, atol=1e-5)


def test_bad_clip_is_reported_by_path(shards):
  p = shards['proc']
  assert p.returncode == 1, p.stderr
  assert '1 clip(s) left out' in p.stdout
  # One summary line per bad clip (and one as it happens, above the bar).
  line = [l for l in p.stdout.splitlines() if l.startswith('  train clip2')]
  assert len(line) == 1 and shards['bad'] in line[0], p.stdout
  with open(os.path.join(shards['out'], 'errors.jsonl')) as f:
    (err,) = [json.loads(l) for l in f]
  assert err['setting'] == 'avss' and err['file'] == shards['bad']
  assert 'unreadable label' in err['reason']


def test_train_batches_of_the_avss_setting(shards):
  it = iter(
      data.train_dataset(
          shards['out'],
          'avss',
          batch_size=2,
          image_size=32,
          seed=0,
          process_index=0,
          process_count=1,
      )
  )
  b = next(it)
  assert b['labels'].shape == (2, 10, 32, 32) and b['labels'].dtype == np.int32
  assert b['frame_mask'].shape == (2, 10) and b['gt_mask'].shape == (2, 10)
  assert 'masks' not in b


def test_setting_mismatch_is_one_line(shards, tmp_path):
  out = shards['out']
  version = records.version_dir(out, 'avss')
  moved = str(tmp_path / 'moved')  # AVSS shards where MS3 ones belong
  shutil.copytree(
      os.path.join(out, 'avs_bench', 'avss'),
      os.path.join(moved, 'avs_bench', 'ms3'),
  )
  for data_dir, setting in ((version, 'ms3'), (moved, 'ms3'), (out, 's4')):
    with pytest.raises(data.DataError) as e:
      data.num_examples(data_dir, setting, 'train')
    msg = str(e.value)
    assert '\n' not in msg
    if data_dir != out:
      assert "holds the 'avss' setting, not 'ms3'" in msg, msg
    else:
      assert "no prepared 's4' dataset" in msg, msg


def test_prepare_of_a_wrong_root_is_one_line(tmp_path):
  p = prepare_cli(
      '--root', str(tmp_path), '--setting', 'avss', '--out', str(tmp_path / 'o')
  )
  assert p.returncode == 2
  assert p.stderr.count('\n') == 1 and 'label2idx.json' in p.stderr


def test_synthetic_avss_labels_only_the_sounding_objects():
  """In the AVSS demo's clips, a class is labelled in a second exactly when
  its sound band carries energy in that second's audio (the labels need
  the audio), and the subsets have their frame counts."""
  from data_prep import synthetic  # pylint: disable=g-import-not-at-top
  from data_prep import synthetic_avss  # pylint: disable=g-import-not-at-top

  checked = 0
  for index in range(9):
    clip = synthetic_avss.make_clip(0, index, 64)
    t = 10 if clip['subset'] == 'v2' else 5
    assert clip['subset'] == ('v1s', 'v1m', 'v2')[index % 3]
    assert clip['frames'].shape == (t, 64, 64, 3)
    assert len(clip['audio']) == t * 16000
    if clip['subset'] == 'v1s':  # one source for the whole clip
      assert len(set(np.unique(clip['labels'])) - {0}) <= 1
    audio = clip['audio'].astype(np.float64) / 32767
    hop = int(0.96 * 16000)
    for s in range(t):
      seg = audio[s * hop + 800 : (s + 1) * hop - 800]  # away from ramps
      spec = np.abs(np.fft.rfft(seg)) ** 2
      freqs = np.fft.rfftfreq(len(seg), 1 / 16000)
      labelled = set(np.unique(clip['labels'][s]).tolist()) - {0}
      for i, cls in enumerate(synthetic.CLASSES, start=1):
        lo, hi = cls.band
        # The band's power (Parseval); the noise floor is ~1e-7 in all.
        power = 2 * spec[(freqs >= lo) & (freqs <= hi)].sum() / len(seg) ** 2
        if i in labelled:
          assert power > 1e-4, (index, s, cls.name, power)
          checked += 1
        else:
          assert power < 1e-5, (index, s, cls.name, power)
  assert checked > 20


def test_tfds_builder_writes_the_same_avss_records(shards, tmp_path):
  """`tfds build` (the TFDS builder's avss config) and the command line
  write the same features: the pipeline decodes the same clip."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from data_prep import tfds_builder  # pylint: disable=g-import-not-at-top

  clean = str(tmp_path / 'clean')
  shutil.copytree(shards['root'], clean)
  shutil.rmtree(os.path.join(clean, 'v1m', 'clip2_v1m'))  # the broken clip
  with open(os.path.join(clean, 'metadata.csv')) as f:
    rows = [l for l in f if 'clip2_v1m' not in l]
  with open(os.path.join(clean, 'metadata.csv'), 'w') as f:
    f.writelines(rows)
  builder = tfds_builder.AvsBench(config='avss', data_dir=str(tmp_path / 'o'))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=clean)
  )
  kw = dict(batch_size=3, image_size=(32, 48), process_index=0, process_count=1)
  (ours,) = list(data.eval_dataset(shards['out'], 'avss', 'test', **kw))
  (theirs,) = list(data.eval_dataset(str(tmp_path / 'o'), 'avss', 'test', **kw))
  order = np.argsort(theirs['id'])
  assert sorted(ours['id']) == sorted(theirs['id'])
  for key in ('frames', 'labels', 'gt_mask', 'frame_mask', 'log_mel'):
    np.testing.assert_array_equal(
        ours[key][np.argsort(ours['id'])], theirs[key][order]
    )
