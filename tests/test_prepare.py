"""data_prep.avsbench and data_prep.layout on a synthetic tree with faults."""

import csv
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
import tensorflow_datasets as tfds

from avs_jax import audio
from avs_jax import data
from data_prep import layout
from data_prep import synthetic
from data_prep import tfds_builder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 40
CLIPS = 10  # per subset: train 0-5, val 6-7, test 8-9
MS3 = 'Multi-sources/ms3_data'
S4 = 'Single-source/s4_data'
MS3_CSV = 'Multi-sources/ms3_meta_data.csv'
S4_CSV = 'Single-source/s4_meta_data.csv'


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
    content = f.read()
  with open(path, 'wb') as f:
    f.write(content[: len(content) // 2])


def shrink(path):
  """The image at `path`, 10 pixels narrower (same format)."""
  img = Image.open(path)
  img.resize((img.width - 10, img.height)).save(path)


def clean_rows(tree, setting):
  """The CSV rows of the clean tree (no injected rows)."""
  path = layout.csv_path(tree['clean'], setting)
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def files(tree, which, setting, clip_id):
  """The Clip of `clip_id` (a row of the clean CSV) under tree[which]."""
  row = next(
      r
      for r in clean_rows(tree, setting)
      if r['name' if setting == 's4' else 'video_id'] == clip_id
  )
  return layout.locate(
      tree[which], setting, clip_id, row['split'], row.get('category', '')
  )


def break_ms3(tree):
  """Injects MS3 faults (shards of 2 clips); returns the expected errors.

  [(setting, id, file, start of the reason)]: a truncated frame, a missing
  wav (val), a mask of another size, a wav cut to half its bytes, CSV rows
  with a name that is not UTF-8 and with another split. A 3 s wav and a
  44.1 kHz stereo wav are fine.
  """
  clip = lambda i: files(tree, 'root', 'ms3', f'ms3_{i:05d}')
  truncate(clip(1).frames[2])
  os.remove(clip(7).wav)
  shrink(clip(4).masks[1])
  truncate(clip(9).wav)
  pcm, sr = sf.read(files(tree, 'clean', 'ms3', 'ms3_00002').wav, dtype='int16')
  sf.write(clip(2).wav, pcm[: 3 * sr], sr, 'PCM_16')
  pcm, sr = sf.read(
      files(tree, 'clean', 'ms3', 'ms3_00008').wav, dtype='float32'
  )
  hi = librosa.resample(pcm, orig_sr=sr, target_sr=44100)
  sf.write(clip(8).wav, np.stack([hi, 0.5 * hi], axis=1), 44100, 'PCM_16')
  table = os.path.join(tree['root'], MS3_CSV)
  with open(table, 'ab') as f:
    f.write(b'caf\xe9_clip,train,,\r\nms3_00099,validation,,\r\n')
  # fmt: off
  return [
      ('ms3', 'ms3_00001', clip(1).frames[2], 'unreadable frame'),
      ('ms3', 'ms3_00007', clip(7).wav, 'missing audio'),
      ('ms3', 'ms3_00004', clip(4).masks[1],
       'mask size 30x40 differs from its frame (40x40, ms3_00004.mp4_2.png)'),
      ('ms3', 'ms3_00009', clip(9).wav,
       'truncated audio: its header declares 160000 bytes (5.00 s) of '
       'samples, the file holds 79978 bytes (2.50 s)'),
      ('ms3', 'caf\\xe9_clip', table,
       "line 12: clip name 'caf\\xe9_clip' is not UTF-8 text"),
      ('ms3', 'ms3_00099', table,
       "line 13: split 'validation' is not train, val or test"),
  ]
  # fmt: on


def break_s4(tree):
  """Injects S4 faults (shards of 3 clips); returns the expected errors.

  A missing frame, a truncated mask (val), a frame that is not an image, a
  wav that is not audio, a mask of another size; the CSV saved with a
  byte-order mark and one id listed twice.
  """
  clip = lambda i: files(tree, 'root', 's4', f's4_{i:05d}')
  os.remove(clip(3).frames[4])
  truncate(clip(6).masks[3])
  with open(clip(4).frames[1], 'wb') as f:
    f.write(b'this is not an image' * 18)
  with open(clip(0).wav, 'wb') as f:
    f.write(b'this is not audio' * 100)
  shrink(clip(8).masks[0])
  table = os.path.join(tree['root'], S4_CSV)
  with open(table, encoding='utf-8') as f:
    lines = f.read().splitlines(keepends=True)
  with open(table, 'w', encoding='utf-8-sig') as f:
    f.writelines(lines + [lines[6]])  # s4_00005 again
  # fmt: off
  return [
      ('s4', 's4_00003', clip(3).frames[4], 'missing frame'),
      ('s4', 's4_00006', clip(6).masks[3], 'unreadable mask'),
      ('s4', 's4_00004', clip(4).frames[1],
       'unreadable frame: not an image format PIL knows (360 bytes, '
       "starting b'this is ')"),
      ('s4', 's4_00000', clip(0).wav,
       'unreadable audio: Format not recognised (libsndfile)'),
      ('s4', 's4_00008', clip(8).masks[0], 'mask size 30x40 differs'),
  ] + [
      ('s4', 's4_00005', table,
       f"line {line}: clip id 's4_00005' is listed 2 times (lines 7, 12)")
      for line in (7, 12)
  ]
  # fmt: on


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
  """Synthetic tree with faults, prepared; the clean originals kept aside."""
  base = tmp_path_factory.mktemp('prepare')
  tree = dict(
      clean=str(base / 'clean'), root=str(base / 'root'), out=str(base / 'out')
  )
  synthetic.generate(tree['clean'], CLIPS, seed=3, size=SIZE, workers=1)
  shutil.copytree(tree['clean'], tree['root'])
  tree['bad'] = break_ms3(tree) + break_s4(tree)
  tree['runs'] = {
      setting: prepare(
          '--root',
          tree['root'],
          '--setting',
          setting,
          '--out',
          tree['out'],
          '--workers',
          workers,
          '--clips_per_shard',
          per_shard,
      )
      for setting, workers, per_shard in (('ms3', '2', '2'), ('s4', '1', '3'))
  }
  return tree


def bad_ids(tree, setting):
  return {clip_id for s, clip_id, _, _ in tree['bad'] if s == setting}


def load_split(out, setting, split):
  builder = tfds.builder_from_directory(f'{out}/avs_bench/{setting}/1.0.0')
  return builder, list(tfds.as_numpy(builder.as_dataset(split=split)))


def test_faults_were_injected(tree):
  with open(os.path.join(tree['root'], S4_CSV), 'rb') as f:
    assert f.read(3) == b'\xef\xbb\xbf'  # the byte-order mark
  with open(os.path.join(tree['root'], MS3_CSV), 'rb') as f:
    assert b'caf\xe9_clip' in f.read()
  assert len(tree['bad']) == 13


def test_every_bad_clip_reported_by_file_and_reason(tree):
  for setting, run in tree['runs'].items():
    assert run.returncode == 1, run.stderr
    assert 'Traceback' not in run.stderr
    summary = run.stdout.split('left out', 1)[1]
    for s, clip_id, file, reason in tree['bad']:
      if s == setting:
        line = f'{clip_id}: {file}: {reason}'
        assert line in summary, (line, summary)
  with open(os.path.join(tree['out'], 'errors.jsonl')) as f:
    errors = [json.loads(line) for line in f]
  got = sorted((e['setting'], e['id'], e['file']) for e in errors)
  want = sorted((s, i, f) for s, i, f, _ in tree['bad'])
  assert got == want  # both settings' errors are kept, one per clip or row
  reasons = {(e['setting'], e['id'], e['reason']) for e in errors}
  for s, clip_id, _, reason in tree['bad']:
    assert any(
        r.startswith(reason) for t, i, r in reasons if (t, i) == (s, clip_id)
    ), (s, clip_id, reason)


def test_reasons_are_words(tree):
  """No object reprs, no bare exception names, one line each."""
  with open(os.path.join(tree['out'], 'errors.jsonl')) as f:
    for e in map(json.loads, f):
      assert '<_io.' not in e['reason'] and ' at 0x' not in e['reason']
      assert not e['reason'].rstrip().endswith(':'), e
      assert 'Error' not in e['reason'], e  # an exception name: no words
      assert '\n' not in e['reason'] and e['file']


@pytest.mark.parametrize('setting', ['s4', 'ms3'])
def test_shards_match_source_files(tree, setting):
  id_col = 'name' if setting == 's4' else 'video_id'
  skipped = bad_ids(tree, setting)
  for split in ('train', 'val', 'test'):
    expected = [
        r[id_col]
        for r in clean_rows(tree, setting)
        if r['split'] == split and r[id_col] not in skipped
    ]
    builder, examples = load_split(tree['out'], setting, split)
    assert builder.info.splits[split].num_examples == len(expected)
    assert sorted(e['id'].decode() for e in examples) == sorted(expected)
    for ex in examples:
      clip = files(tree, 'root', setting, ex['id'].decode())
      assert ex['category'].decode() == clip.category
      for i in range(5):
        frame = np.asarray(Image.open(clip.frames[i]).convert('RGB'))
        np.testing.assert_array_equal(ex['frames'][i], frame)
      labelled = [m is not None for m in clip.masks]
      np.testing.assert_array_equal(ex['labelled'], labelled)
      for i, mask in enumerate(clip.masks):
        want = (
            np.zeros((SIZE, SIZE))
            if mask is None
            else np.asarray(Image.open(mask).convert('L')) >= 128
        )
        np.testing.assert_array_equal(ex['masks'][i, ..., 0], want)
      assert ex['log_mel'].shape == (5, 96, 64)
      np.testing.assert_allclose(
          ex['log_mel'], audio.clip_examples(clip.wav), atol=1e-5
      )
  if setting == 's4':  # S4 train labels the first frame only, val/test all 5.
    _, train = load_split(tree['out'], setting, 'train')
    assert train and all(list(e['labelled']) == [1, 0, 0, 0, 0] for e in train)


def find(out, setting, split, clip_id):
  _, examples = load_split(out, setting, split)
  return next(e for e in examples if e['id'].decode() == clip_id)


def test_short_wav_repeats_last_second(tree):
  ex = find(tree['out'], 'ms3', 'train', 'ms3_00002')
  pcm, sr = sf.read(files(tree, 'clean', 'ms3', 'ms3_00002').wav, dtype='int16')
  head = audio.waveform_to_examples(pcm[: 3 * sr], sr)
  assert head.shape[0] == 3
  np.testing.assert_allclose(ex['log_mel'][:3], head, atol=1e-5)
  np.testing.assert_array_equal(ex['log_mel'][3], ex['log_mel'][2])
  np.testing.assert_array_equal(ex['log_mel'][4], ex['log_mel'][2])


def test_stereo_44k_is_resampled_and_mixed(tree):
  ex = find(tree['out'], 'ms3', 'test', 'ms3_00008')
  pcm, sr = sf.read(files(tree, 'clean', 'ms3', 'ms3_00008').wav, dtype='int16')
  # The mix (L + R) / 2 is 0.75 x the original: log-mel shifts by log(0.75)
  # where the sound is well above the log offset.
  ref = audio.waveform_to_examples(pcm, sr) + np.log(0.75)
  loud = ref > 0.0
  assert loud.mean() > 0.05
  np.testing.assert_allclose(ex['log_mel'][loud], ref[loud], atol=0.05)


def test_wav_cut_short_is_refused_however_it_is_cut(tmp_path):
  """The header declares more samples than the file holds."""
  wav = str(tmp_path / 'a.wav')
  sf.write(wav, np.zeros(16000 * 5, np.int16), 16000, 'PCM_16')
  layout.check_wav_length(wav)  # whole: fine
  with open(wav, 'rb') as f:
    whole = f.read()
  for keep in (len(whole) - 1, 100, 40):
    with open(wav, 'wb') as f:
      f.write(whole[:keep])
    with pytest.raises(layout.ClipError, match='truncated audio'):
      layout.check_wav_length(wav)


@pytest.mark.parametrize(
    'samples,reason',
    [
        (8000, 'audio too short: 0.50 s, less than one VGGish example'),
        (0, 'audio too short: 0.00 s'),
        (None, 'unreadable audio: empty file (0 bytes)'),
    ],
)
def test_short_or_empty_wav_is_refused(tmp_path, samples, reason):
  wav = str(tmp_path / 'a.wav')
  if samples is None:
    open(wav, 'wb').close()
  else:
    sf.write(wav, np.zeros(samples, np.int16), 16000, 'PCM_16')
  with pytest.raises(layout.ClipError) as e:
    layout.read_log_mel(wav)
  assert e.value.file == wav and e.value.reason.startswith(reason)


def test_rerun_skips_finished_shards_and_retries_failed(tree):
  directory = f'{tree["out"]}/avs_bench/ms3/1.0.0'
  shards = sorted(f for f in os.listdir(directory) if '.tfrecord-' in f)
  before = {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in shards}
  fixed = files(tree, 'root', 'ms3', 'ms3_00007').wav
  shutil.copy(files(tree, 'clean', 'ms3', 'ms3_00007').wav, fixed)
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
  assert run.returncode == 1  # the other faults are still there
  after = {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in shards}
  rewritten = {f for f in shards if after[f] != before[f]}
  # Clips 0-5 train (2 per shard), 6-7 val, 8-9 test: only the shards that had
  # a failed clip (ms3_00001: train shard 0; ms3_00004: train shard 2;
  # ms3_00007: val; ms3_00009: test) are written again.
  assert rewritten == {
      'avs_bench-train.tfrecord-00000-of-00003',
      'avs_bench-train.tfrecord-00002-of-00003',
      'avs_bench-val.tfrecord-00000-of-00001',
      'avs_bench-test.tfrecord-00000-of-00001',
  }
  find(tree['out'], 'ms3', 'val', 'ms3_00007')  # now present
  with open(os.path.join(tree['out'], 'errors.jsonl')) as f:
    errors = sorted((e['setting'], e['id']) for e in map(json.loads, f))
  assert errors == sorted(
      (s, i) for s, i, _, _ in tree['bad'] if i != 'ms3_00007'
  )


@pytest.mark.parametrize(
    'case', ['wrong_root', 'missing_csv', 'bad_setting', 'no_clip']
)
def test_bad_arguments_are_one_line(tree, tmp_path, case):
  root, setting = tree['root'], 'ms3'
  if case == 'wrong_root':
    root = str(tmp_path / 'nope')
  elif case == 'missing_csv':
    root = str(tmp_path)
    os.makedirs(os.path.join(root, 'Multi-sources'))
  elif case == 'no_clip':
    root = str(tmp_path)
    os.makedirs(os.path.join(root, 'Multi-sources'))
    with open(os.path.join(root, MS3_CSV), 'w') as f:
      f.write('video_id,split\nx,dev\n')
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
  builder = tfds_builder.AvsBench(config='ms3', data_dir=str(tmp_path))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=tree['clean'])
  )
  ours = find(tree['out'], 'ms3', 'val', 'ms3_00006')
  theirs = next(
      e
      for e in tfds.as_numpy(builder.as_dataset(split='val'))
      if e['id'] == b'ms3_00006'
  )
  assert sorted(ours) == sorted(theirs)
  for key in ours:
    np.testing.assert_array_equal(ours[key], theirs[key])
  assert data.num_examples(str(tmp_path), 'ms3', 'train') == 6
