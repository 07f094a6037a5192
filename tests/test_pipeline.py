"""avs_jax.data: batches vs source files, eval coverage, train order, state."""

from concurrent import futures
import csv
import gc
import os
import shutil
import subprocess
import sys

import etils.epath
import grain
import numpy as np
from PIL import Image
import pytest

from avs_jax import audio
from avs_jax import data
from avs_jax.data import records
from data_prep import avsbench
from data_prep import layout
from data_prep import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 40
CLIPS = 12  # per subset: 8 train (3 shards of 3, 3, 2), 2 val, 2 test
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  base = tmp_path_factory.mktemp('pipeline')
  root, out = str(base / 'root'), str(base / 'out')
  synthetic.generate(root, CLIPS, seed=5, size=SIZE, workers=1)
  for setting in ('s4', 'ms3'):
    errors, _ = avsbench.prepare(
        root, setting, out, workers=1, clips_per_shard=3
    )
    assert not errors
  yield dict(root=root, out=out)
  gc.collect()  # frees grain's shared-memory batches before exit


def rows(root, setting, split):
  sub = 'Single-source' if setting == 's4' else 'Multi-sources'
  with open(os.path.join(root, sub, f'{setting}_meta_data.csv')) as f:
    return [r for r in csv.DictReader(f) if r['split'] == split]


def ids(root, setting, split):
  return sorted(
      r['name' if setting == 's4' else 'video_id']
      for r in rows(root, setting, split)
  )


def take(ds, n):
  it = iter(ds)
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def source(root, setting, row, i):
  """Frame i (RGB), mask i (grayscale or None) and wav path of a CSV row."""
  clip = layout.locate(
      root,
      setting,
      row['name' if setting == 's4' else 'video_id'],
      row['split'],
      row.get('category', ''),
  )
  mask = clip.masks[i]
  return (
      Image.open(clip.frames[i]).convert('RGB'),
      Image.open(mask).convert('L') if mask else None,
      clip.wav,
  )


@pytest.mark.parametrize(
    'setting,split,image_size',
    [('ms3', 'val', SIZE), ('ms3', 'test', (32, 24)), ('s4', 'train', 32)],
)
def test_batches_match_source_files(env, setting, split, image_size):
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  by_id = {
      r['name' if setting == 's4' else 'video_id']: r
      for r in rows(env['root'], setting, split)
  }
  batches = list(
      data.eval_dataset(
          env['out'],
          setting,
          split,
          batch_size=2,
          image_size=image_size,
          process_index=0,
          process_count=1,
      )
  )
  seen = []
  for b in batches:
    assert (
        b['frames'].shape == (2, 5, h, w, 3) and b['frames'].dtype == np.float32
    )
    assert b['masks'].shape == (2, 5, h, w) and b['masks'].dtype == np.float32
    assert b['log_mel'].shape == (2, 5, 96, 64) and b['labelled'].dtype == bool
    for j, clip_id in enumerate(b['id']):
      if not b['valid'][j]:
        continue
      seen.append(clip_id)
      row = by_id[clip_id]
      assert b['category'][j] == (row['category'] if setting == 's4' else '')
      for i in range(5):
        frame, mask, wav = source(env['root'], setting, row, i)
        want = np.asarray(frame.resize((w, h), Image.BILINEAR), np.float32)
        np.testing.assert_allclose(
            b['frames'][j, i], (want / 255 - MEAN) / STD, atol=1e-5
        )
        labelled = mask is not None
        assert b['labelled'][j, i] == labelled
        want = (
            np.asarray(mask.resize((w, h), Image.NEAREST)) >= 128
            if labelled
            else np.zeros((h, w))
        )
        np.testing.assert_array_equal(b['masks'][j, i], want)
      np.testing.assert_allclose(
          b['log_mel'][j], audio.clip_examples(wav), atol=1e-5
      )
  assert sorted(seen) == sorted(by_id)


@pytest.mark.parametrize('count', [1, 2, 3])
def test_eval_covers_every_clip_once(env, count):
  per_process = [
      list(
          data.eval_dataset(
              env['out'],
              'ms3',
              'train',
              batch_size=2,
              image_size=32,
              process_index=p,
              process_count=count,
          )
      )
      for p in range(count)
  ]
  assert len({len(b) for b in per_process}) == 1  # same number of batches
  valid = [
      i
      for batches in per_process
      for b in batches
      for i, v in zip(b['id'], b['valid'])
      if v
  ]
  assert sorted(valid) == ids(env['root'], 'ms3', 'train')
  for batches in per_process:
    for b in batches:
      assert b['frames'].shape[0] == 2
      pad = ~b['valid']
      assert not b['labelled'][pad].any() and not b['masks'][pad].any()
      assert all(i == '' for i in b['id'][pad])
  assert data.num_examples(env['out'], 'ms3', 'train') == 8


def test_eval_order_fixed_whatever_the_workers(env):
  kw = dict(batch_size=3, image_size=32, process_index=0, process_count=1)
  a = list(data.eval_dataset(env['out'], 'ms3', 'train', **kw))
  b = list(data.eval_dataset(env['out'], 'ms3', 'train', num_workers=2, **kw))
  assert [list(x['id']) for x in a] == [list(x['id']) for x in b]
  assert [i for x in a for i, v in zip(x['id'], x['valid']) if v] == ids(
      env['root'], 'ms3', 'train'
  )
  for x, y in zip(a, b):
    for k in ('frames', 'masks', 'log_mel', 'valid'):
      np.testing.assert_array_equal(x[k], y[k])
  del b
  gc.collect()


def train(env, **kw):
  kw = dict(
      dict(
          batch_size=2, image_size=32, seed=0, process_index=0, process_count=1
      ),
      **kw,
  )
  return data.train_dataset(env['out'], 'ms3', **kw)


def test_train_is_deterministic_and_reshuffled_each_epoch(env):
  first = [list(b['id']) for b in take(train(env), 6)]
  assert first == [list(b['id']) for b in take(train(env), 6)]
  assert first != [list(b['id']) for b in take(train(env, seed=1), 6)]
  # Chained shards and a window of one epoch: each 8 clips are one epoch.
  stream = [
      i
      for b in take(train(env, cycle_length=1, shuffle_window=8), 12)
      for i in b['id']
  ]
  epochs = [stream[k : k + 8] for k in range(0, 24, 8)]
  all_ids = ids(env['root'], 'ms3', 'train')
  assert all(sorted(e) == all_ids for e in epochs)
  assert len({tuple(e) for e in epochs}) == 3
  b = take(train(env), 1)[0]
  assert b['valid'].all() and b['labelled'].all()


@pytest.mark.parametrize('count', [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(env, count):
  """Process p decodes rows [p*b, (p+1)*b) of the one-process global batch."""
  single = take(train(env, batch_size=count), 8)
  parts = [
      take(train(env, process_index=p, process_count=count, batch_size=1), 8)
      for p in range(count)
  ]
  for k, whole in enumerate(single):
    rows = [parts[p][k] for p in range(count)]
    assert [i for r in rows for i in r['id']] == list(whole['id'])
    for key in ('frames', 'masks', 'log_mel'):
      np.testing.assert_array_equal(
          np.concatenate([r[key] for r in rows]), whole[key]
      )


def assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert list(x['id']) == list(y['id'])
    for k in ('frames', 'masks', 'log_mel', 'labelled', 'valid'):
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize('workers', [0, 2])
def test_restored_iterator_yields_the_same_batches(env, workers):
  ds = train(env, num_workers=workers)
  it = iter(ds)
  for _ in range(3):  # mid-epoch (4 batches per epoch)
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  it.close()
  restored = iter(ds)
  restored.set_state(state)
  assert_same_batches([next(restored) for _ in range(4)], expected)
  restored.close()
  del expected
  gc.collect()


def test_grain_checkpoint_handler_round_trip(env, tmp_path):
  it = iter(train(env))
  next(it)
  grain.checkpoint.CheckpointHandler().save(etils.epath.Path(tmp_path), item=it)
  expected = [next(it) for _ in range(3)]
  restored = iter(train(env))
  grain.checkpoint.CheckpointHandler().restore(
      etils.epath.Path(tmp_path), item=restored
  )
  assert_same_batches([next(restored) for _ in range(3)], expected)


def test_pipeline_does_not_import_tensorflow(env):
  code = (
      'import sys; from avs_jax import data; '
      f'it = iter(data.train_dataset({env["out"]!r}, "s4", batch_size=2, '
      'image_size=32, seed=0, process_index=0, process_count=1)); '
      'next(it); it.close(); '
      'assert "tensorflow" not in sys.modules, "tensorflow imported"'
  )
  run = subprocess.run(
      [sys.executable, '-c', code],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert run.returncode == 0, run.stderr[-2000:]


def test_bad_requests(env, tmp_path):
  with pytest.raises(FileNotFoundError, match='data_prep.avsbench'):
    data.num_examples(str(tmp_path), 'ms3', 'train')
  with pytest.raises(data.DataError, match='no prepared'):
    data.num_examples(str(tmp_path), 'ms3', 'train')
  with pytest.raises(data.DataError, match="unknown setting 'ms4'"):
    data.num_examples(env['out'], 'ms4', 'train')
  with pytest.raises(data.DataError, match="no prepared 'avss' dataset"):
    data.num_examples(env['out'], 'avss', 'train')  # known, not prepared
  with pytest.raises(ValueError, match='split'):
    data.eval_dataset(
        env['out'],
        'ms3',
        'dev',
        batch_size=2,
        image_size=32,
        process_index=0,
        process_count=1,
    )
  with pytest.raises(ValueError, match='batch_size'):
    train(env, batch_size=16)


def test_random_access_is_thread_safe(env):
  """grain reads a MapDataset with many threads: records must not get mixed."""
  source = records.TFRecordSource(
      *records.split_files(env['out'], 'ms3', 'train')
  )
  expected = [source[i] for i in range(len(source))]
  order = np.random.default_rng(0).integers(0, len(source), 2000)
  with futures.ThreadPoolExecutor(8) as pool:
    got = list(pool.map(source.__getitem__, order))
  assert all(g == expected[i] for g, i in zip(got, order))


def one_line_error(make):
  with pytest.raises(data.DataError) as e:
    make()
  assert '\n' not in str(e.value)
  return str(e.value)


def test_shards_of_another_setting_are_refused(env, tmp_path):
  """Wherever S4 shards are found, asking for MS3 is one clear error."""
  s4_version = os.path.join(env['out'], 'avs_bench', 's4', '1.0.0')
  moved = str(tmp_path / 'moved')  # S4 shards copied where MS3 ones belong
  shutil.copytree(
      os.path.join(env['out'], 'avs_bench', 's4'),
      os.path.join(moved, 'avs_bench', 'ms3'),
  )
  kw = dict(batch_size=2, image_size=32, process_index=0, process_count=1)
  for data_dir in (s4_version, moved):
    for make in (
        lambda: data.num_examples(data_dir, 'ms3', 'train'),
        lambda: data.train_dataset(data_dir, 'ms3', seed=0, **kw),
        lambda: data.eval_dataset(data_dir, 'ms3', 'test', **kw),
    ):
      message = one_line_error(make)
      assert "holds the 's4' setting, not 'ms3'" in message, message
      assert 'data_prep.avsbench --setting ms3' in message
  assert data.num_examples(s4_version, 's4', 'train') == 8  # as S4: fine


def test_newest_version_folder_is_read(env, tmp_path):
  base = tmp_path / 'avs_bench' / 'ms3'
  shutil.copytree(
      os.path.join(env['out'], 'avs_bench', 'ms3', '1.0.0'), base / '1.0.0'
  )
  shutil.copytree(
      os.path.join(env['out'], 'avs_bench', 's4', '1.0.0'), base / '0.9.0'
  )
  (base / '1.0.0.old').mkdir()  # a copy put aside: not a version
  (base / '1.0.0.old' / 'dataset_info.json').write_text('{}')
  assert data.num_examples(str(tmp_path), 'ms3', 'train') == 8
  shutil.rmtree(base / '1.0.0')  # now 0.9.0, S4 shards: refused
  with pytest.raises(data.DataError, match="holds the 's4' setting"):
    data.num_examples(str(tmp_path), 'ms3', 'train')


def test_missing_or_truncated_shard_is_one_clear_error(env, tmp_path):
  copy = str(tmp_path / 'ms3')
  shutil.copytree(os.path.join(env['out'], 'avs_bench', 'ms3', '1.0.0'), copy)
  shard = os.path.join(copy, 'avs_bench-train.tfrecord-00001-of-00003')
  with open(shard, 'rb') as f:
    content = f.read()
  with open(shard, 'wb') as f:
    f.write(content[:-100])
  kw = dict(batch_size=2, image_size=32, process_index=0, process_count=1)
  message = one_line_error(
      lambda: list(data.eval_dataset(copy, 'ms3', 'train', **kw))
  )
  assert shard in message and 'truncated' in message
  os.remove(shard)
  message = one_line_error(
      lambda: data.train_dataset(copy, 'ms3', seed=0, **kw)
  )
  assert f'{shard} is missing' in message
