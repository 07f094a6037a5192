"""`run.py` in the AVSS setting, end to end on a tiny synthetic
AVSBench-semantic (configs/synthetic_avss.py made small): the tree and its
shards made on demand, training with the AVSS loss, validation and test with
the official metric and its per-class table, coloured masks, the report."""

import json
import os

import numpy as np
from PIL import Image
import pytest

import procs
from avs_jax import avss
from data_prep import synthetic_avss

TINY = {
    'data.synthetic.clips': 12,  # train 0-7, val 8-9, test 10 (v1m), 11 (v2)
    'data.synthetic.size': 32,
    'data.image_size': 32,
    'model.channels': 16,
    'model.head_channels': 8,
    'train.batch_size': 2,
    'train.num_steps': 3,
    'train.log_every': 1,
    'eval.batch_size': 2,
    'eval.save_masks': True,
}


def run_py(tmp, *args, config='configs/synthetic_avss.py'):
  return procs.run_config(config, str(tmp / 'cache'), *args)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('avss_run')
  o = dict(
      TINY,
      **{
          'data.dir': str(tmp / 'tfds'),
          'data.synthetic.root': str(tmp / 'raw'),
      },
  )
  p = run_py(tmp, f'--workdir={tmp / "wd"}', *procs.flags(o))
  assert p.returncode == 0, p.stderr[-3000:]
  return dict(tmp=tmp, wd=tmp / 'wd', o=o, stderr=p.stderr)


def read(path):
  with open(path) as f:
    return json.load(f)


def test_train_then_test_with_the_official_metric(trained):
  wd = trained['wd']
  rows = [json.loads(l) for l in open(wd / 'metrics.jsonl')]
  steps = [r for r in rows if 'ce' in r]
  assert [r['step'] for r in steps] == [1, 2, 3]
  assert all(np.isfinite(r['ce']) and np.isfinite(r['avm']) for r in steps)
  assert any('val_miou' in r for r in rows)
  res = read(wd / 'eval_test.json')
  assert res['num_clips'] == 2 and res['checkpoint_step'] == 3
  table = res['per_class']
  assert len(table) == 71
  # Names come from the tree's label2idx.json, through the shards.
  assert [c['name'] for c in table[:9]] == synthetic_avss.class_names()[:9]
  # Every frame of the two test clips (10 each, padding included) shows
  # background somewhere: the class occurs in all 20 frames' unions.
  assert table[0]['frames'] == 20
  # The official mean is over all 71 classes, absent ones counting 0.
  assert res['miou'] == pytest.approx(
      sum(c['miou'] for c in table) / 71, abs=1e-6
  )
  assert 'mIoU' in trained['stderr'] and 'over all 71 classes' in (
      trained['stderr']
  )


def test_report_with_broken_audio(trained):
  wd = trained['wd']
  for audio in ('shuffled', 'silent'):
    assert read(wd / f'eval_test_{audio}.json')['audio'] == audio
  report = open(wd / 'report.md').read()
  for audio in ('true', 'shuffled', 'silent'):
    assert f'| {audio} |' in report
  assert '| background |' in report
  assert os.path.getsize(wd / 'test_grid.png') > 0


def test_coloured_masks_of_the_real_frames(trained):
  pred = trained['wd'] / 'predictions_test'
  clips = sorted(os.listdir(pred))
  assert clips == ['avss_00010', 'avss_00011']  # v1m, v2
  pal = {tuple(c) for c in avss.palette().tolist()}
  for clip, frames in zip(clips, (5, 10)):  # padded frames: no files
    masks = sorted(
        f for f in os.listdir(pred / clip) if f.endswith('_mask.png')
    )
    overlays = [
        f for f in os.listdir(pred / clip) if f.endswith('_overlay.png')
    ]
    assert len(masks) == frames and len(overlays) == frames
    img = np.asarray(Image.open(pred / clip / masks[0]))
    assert img.shape == (32, 32, 3)
    assert {tuple(x) for x in img.reshape(-1, 3)} <= pal


def test_mismatched_settings_are_one_line(trained):
  tmp = trained['tmp']
  version = tmp / 'tfds' / 'avs_bench' / 'avss' / '1.0.0'
  for config, args, expect in (
      (
          'configs/synthetic_avss.py',
          ['--config.loss.kind=bce'],
          'do not fit together',
      ),
      (  # the MS3 demo pointed at AVSS shards
          'configs/synthetic.py',
          [
              '--config.data.synthetic.enabled=False',
              f'--config.data.dir={version}',
          ],
          "holds the 'avss' setting, not 'ms3'",
      ),
  ):
    p = run_py(tmp, f'--workdir={tmp / "bad"}', *args, config=config)
    assert p.returncode == 1, p.stderr[-2000:]
    errors = [l for l in p.stderr.splitlines() if l.startswith('error:')]
    assert len(errors) == 1 and expect in errors[0], p.stderr[-2000:]
    assert 'Traceback' not in p.stderr
