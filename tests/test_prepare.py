"""data_prep.avsbench on a synthetic tree with injected faults."""

import json
import os
import shutil
import subprocess
import sys

import librosa
import numpy as np
from PIL import Image
import pytest
import soundfile as sf

from avs_jax import audio
from data_prep import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 40
CLIPS = 10  # per subset: train 0-5, val 6-7, test 8-9
MS3 = 'Multi-sources/ms3_data'
S4 = 'Single-source/s4_data'


def prepare(*args):
  return subprocess.run(
      [sys.executable, '-m', 'data_prep.avsbench', *args],
      capture_output=True,
      text=True,
      cwd=REPO,
      timeout=300,
  )


def truncate(path):
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[: len(data) // 2])


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
  """Synthetic tree with faults; the clean originals are kept aside."""
  base = tmp_path_factory.mktemp('prepare')
  clean, root = str(base / 'clean'), str(base / 'root')
  synthetic.generate(clean, CLIPS, seed=3, size=SIZE, workers=1)
  shutil.copytree(clean, root)
  faults = dict(  # (setting, id) -> (file, reason word)
      truncated_png=f'{MS3}/visual_frames/ms3_00001/ms3_00001.mp4_3.png',
      missing_wav=f'{MS3}/audio_wav/val/ms3_00007.wav',
      short_wav=f'{MS3}/audio_wav/train/ms3_00002.wav',
      stereo_wav=f'{MS3}/audio_wav/test/ms3_00008.wav',
  )
  truncate(os.path.join(root, faults['truncated_png']))
  os.remove(os.path.join(root, faults['missing_wav']))
  pcm, sr = sf.read(os.path.join(clean, faults['short_wav']), dtype='int16')
  sf.write(os.path.join(root, faults['short_wav']), pcm[: 3 * sr], sr, 'PCM_16')
  pcm, sr = sf.read(os.path.join(clean, faults['stereo_wav']), dtype='float32')
  hi = librosa.resample(pcm, orig_sr=sr, target_sr=44100)
  sf.write(
      os.path.join(root, faults['stereo_wav']),
      np.stack([hi, 0.5 * hi], axis=1),
      44100,
      'PCM_16',
  )
  # S4: a missing frame and a truncated mask of a val clip.
  s4_dirs = {row['name']: row for row in _csv_rows(clean, 's4')}
  row = s4_dirs['s4_00003']
  faults['s4_missing_frame'] = (
      f'{S4}/visual_frames/{row["split"]}/'
      f'{row["category"]}/s4_00003/s4_00003_5.png'
  )
  row = s4_dirs['s4_00006']
  faults['s4_truncated_mask'] = (
      f'{S4}/gt_masks/{row["split"]}/'
      f'{row["category"]}/s4_00006/s4_00006_4.png'
  )
  os.remove(os.path.join(root, faults['s4_missing_frame']))
  truncate(os.path.join(root, faults['s4_truncated_mask']))
  out = str(base / 'out')
  runs = dict(
      ms3=prepare(
          '--root',
          root,
          '--setting',
          'ms3',
          '--out',
          out,
          '--workers',
          '2',
          '--clips_per_shard',
          '2',
      ),
      s4=prepare(
          '--root',
          root,
          '--setting',
          's4',
          '--out',
          out,
          '--workers',
          '1',
          '--clips_per_shard',
          '3',
      ),
  )
  return dict(clean=clean, root=root, out=out, faults=faults, runs=runs)


def _csv_rows(root, setting):
  import csv  # pylint: disable=g-import-not-at-top

  sub = 'Single-source' if setting == 's4' else 'Multi-sources'
  with open(os.path.join(root, sub, f'{setting}_meta_data.csv')) as f:
    return list(csv.DictReader(f))


BAD = {
    ('ms3', 'ms3_00001'): ('truncated_png', 'unreadable frame'),
    ('ms3', 'ms3_00007'): ('missing_wav', 'missing audio'),
    ('s4', 's4_00003'): ('s4_missing_frame', 'missing frame'),
    ('s4', 's4_00006'): ('s4_truncated_mask', 'unreadable mask'),
}


def load_split(out, setting, split):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder_from_directory(f'{out}/avs_bench/{setting}/1.0.0')
  return builder, list(tfds.as_numpy(builder.as_dataset(split=split)))


def test_exit_status_and_error_report(tree):
  for setting, run in tree['runs'].items():
    assert run.returncode == 1, run.stderr
    assert 'Traceback' not in run.stderr
    for (s, clip), (fault, _) in BAD.items():
      if s == setting:
        assert clip in run.stdout and tree['faults'][fault] in run.stdout
  with open(os.path.join(tree['out'], 'errors.jsonl')) as f:
    errors = [json.loads(line) for line in f]
  assert len(errors) == len(BAD)  # both settings' errors are kept
  for e in errors:
    fault, reason = BAD[(e['setting'], e['id'])]
    assert e['file'] == os.path.join(tree['root'], tree['faults'][fault])
    assert e['reason'].startswith(reason)


@pytest.mark.parametrize('setting', ['s4', 'ms3'])
def test_shards_match_source_files(tree, setting):
  rows = _csv_rows(tree['root'], setting)
  id_col = 'name' if setting == 's4' else 'video_id'
  for split in ('train', 'val', 'test'):
    expected = {
        r[id_col]: r
        for r in rows
        if r['split'] == split and (setting, r[id_col]) not in BAD
    }
    builder, examples = load_split(tree['out'], setting, split)
    assert builder.info.splits[split].num_examples == len(expected)
    assert sorted(e['id'].decode() for e in examples) == sorted(expected)
    for ex in examples:
      row = expected[ex['id'].decode()]
      files = clip_files(tree['root'], setting, row)
      assert ex['category'].decode() == (
          row['category'] if setting == 's4' else ''
      )
      for i in range(5):
        frame = np.asarray(Image.open(files['frames'][i]).convert('RGB'))
        np.testing.assert_array_equal(ex['frames'][i], frame)
      labelled = [i < len(files['masks']) for i in range(5)]
      np.testing.assert_array_equal(ex['labelled'], labelled)
      for i in range(5):
        want = (
            np.zeros((SIZE, SIZE))
            if not labelled[i]
            else np.asarray(Image.open(files['masks'][i]).convert('L')) >= 128
        )
        np.testing.assert_array_equal(ex['masks'][i, ..., 0], want)
      assert ex['log_mel'].shape == (5, 96, 64)
      np.testing.assert_allclose(
          ex['log_mel'], audio.clip_examples(files['wav']), atol=1e-5
      )
  if setting == 's4':  # S4 train labels the first frame only, val/test all 5.
    _, train = load_split(tree['out'], setting, 'train')
    assert all(list(e['labelled']) == [1, 0, 0, 0, 0] for e in train)


def clip_files(root, setting, row):
  if setting == 's4':
    n, c, s = row['name'], row['category'], row['split']
    return dict(
        frames=[
            f'{root}/{S4}/visual_frames/{s}/{c}/{n}/{n}_{i}.png'
            for i in range(1, 6)
        ],
        masks=[
            f'{root}/{S4}/gt_masks/{s}/{c}/{n}/{n}_{i}.png'
            for i in range(1, 2 if s == 'train' else 6)
        ],
        wav=f'{root}/{S4}/audio_wav/{s}/{c}/{n}.wav',
    )
  n, s = row['video_id'], row['split']
  return dict(
      frames=[
          f'{root}/{MS3}/visual_frames/{n}/{n}.mp4_{i}.png' for i in range(1, 6)
      ],
      masks=[f'{root}/{MS3}/gt_masks/{s}/{n}/{n}_{i}.png' for i in range(1, 6)],
      wav=f'{root}/{MS3}/audio_wav/{s}/{n}.wav',
  )


def find(out, setting, split, clip_id):
  _, examples = load_split(out, setting, split)
  return next(e for e in examples if e['id'].decode() == clip_id)


def test_short_wav_repeats_last_second(tree):
  ex = find(tree['out'], 'ms3', 'train', 'ms3_00002')
  pcm, sr = sf.read(
      os.path.join(tree['clean'], tree['faults']['short_wav']), dtype='int16'
  )
  head = audio.waveform_to_examples(pcm[: 3 * sr], sr)
  assert head.shape[0] == 3
  np.testing.assert_allclose(ex['log_mel'][:3], head, atol=1e-5)
  np.testing.assert_array_equal(ex['log_mel'][3], ex['log_mel'][2])
  np.testing.assert_array_equal(ex['log_mel'][4], ex['log_mel'][2])


def test_stereo_44k_is_resampled_and_mixed(tree):
  ex = find(tree['out'], 'ms3', 'test', 'ms3_00008')
  pcm, sr = sf.read(
      os.path.join(tree['clean'], tree['faults']['stereo_wav']), dtype='int16'
  )
  # The mix (L + R) / 2 is 0.75 x the original: log-mel shifts by log(0.75)
  # where the sound is well above the log offset.
  ref = audio.waveform_to_examples(pcm, sr) + np.log(0.75)
  loud = ref > 0.0
  assert loud.mean() > 0.05
  np.testing.assert_allclose(ex['log_mel'][loud], ref[loud], atol=0.05)


def test_rerun_skips_finished_shards_and_retries_failed(tree):
  directory = f'{tree["out"]}/avs_bench/ms3/1.0.0'
  shards = sorted(f for f in os.listdir(directory) if '.tfrecord-' in f)
  before = {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in shards}
  fixed = tree['faults']['missing_wav']
  shutil.copy(
      os.path.join(tree['clean'], fixed), os.path.join(tree['root'], fixed)
  )
  run = prepare(
      '--root',
      tree['root'],
      '--setting',
      'ms3',
      '--out',
      tree['out'],
      '--workers',
      '1',
      '--clips_per_shard',
      '2',
  )
  assert run.returncode == 1  # the truncated frame is still there
  after = {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in shards}
  rewritten = {f for f in shards if after[f] != before[f]}
  # Clips 0-5 train (2 per shard), 6-7 val, 8-9 test: only the shards that had
  # a failed clip (ms3_00001: train shard 0; ms3_00007: val) are written again.
  assert rewritten == {
      'avs_bench-train.tfrecord-00000-of-00003',
      'avs_bench-val.tfrecord-00000-of-00001',
  }
  find(tree['out'], 'ms3', 'val', 'ms3_00007')  # now present
  with open(os.path.join(tree['out'], 'errors.jsonl')) as f:
    errors = {(e['setting'], e['id']) for e in map(json.loads, f)}
  assert errors == set(BAD) - {('ms3', 'ms3_00007')}


@pytest.mark.parametrize('case', ['wrong_root', 'missing_csv', 'bad_setting'])
def test_bad_arguments_are_one_line(tree, tmp_path, case):
  root, setting = tree['root'], 'ms3'
  if case == 'wrong_root':
    root = str(tmp_path / 'nope')
  elif case == 'missing_csv':
    root = str(tmp_path)
    os.makedirs(os.path.join(root, 'Multi-sources'))
  else:
    setting = 'avss'
  run = prepare(
      '--root', root, '--setting', setting, '--out', str(tmp_path / 'o')
  )
  assert run.returncode == 2
  assert 'Traceback' not in run.stderr
  assert len(run.stderr.strip().splitlines()) == 1, run.stderr
  assert 'error' in run.stderr


def test_tfds_builder_writes_the_same_records(tree, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from avs_jax import data  # pylint: disable=g-import-not-at-top
  from data_prep import tfds_builder  # pylint: disable=g-import-not-at-top

  builder = tfds_builder.AvsBench(config='ms3', data_dir=str(tmp_path))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=tree['clean'])
  )
  ours = find(tree['out'], 'ms3', 'test', 'ms3_00009')
  theirs = next(
      e
      for e in tfds.as_numpy(builder.as_dataset(split='test'))
      if e['id'] == b'ms3_00009'
  )
  assert sorted(ours) == sorted(theirs)
  for key in ours:
    np.testing.assert_array_equal(ours[key], theirs[key])
  assert data.num_examples(str(tmp_path), 'ms3', 'train') == 6
