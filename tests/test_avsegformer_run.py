"""AVSegFormer through `run.py`: training and evaluation end to end on a tiny
synthetic MS3 tree (configs/synthetic_avsegformer.py made small), the frozen
backbone of the first epochs, and the model/loss mismatch as one line."""

import functools
import json

import jax
import numpy as np
import pytest

import procs
from avs_jax import runtime
from avs_jax import train
from avs_jax.projects.avsegformer import family as avsegformer_family
from configs import synthetic_avsegformer

TINY = {
    'data.synthetic.clips': 12,
    'data.synthetic.size': 32,
    'data.image_size': 32,
    'model.query_num': 4,
    'model.num_layers': 1,
    'model.generator_layers': 1,
    'model.ffn_dim': 32,
    'model.mlp_dim': 16,
    'train.batch_size': 2,
    'train.num_steps': 3,
    'train.log_every': 1,
    'train.freeze_backbone_epochs': 1,
    'eval.batch_size': 2,
    'eval.save_overlays': False,
}


def run_py(tmp, *args, config='configs/synthetic_avsegformer.py'):
  return procs.run_config(config, str(tmp / 'cache'), *args)


def test_run_py_trains_and_evaluates(tmp_path):
  """run.py trains the tiny AVSegFormer (dice + mix losses logged, finite)
  and evaluates its best checkpoint on the test split."""
  o = dict(
      TINY,
      **{
          'data.dir': str(tmp_path / 'tfds'),
          'data.synthetic.root': str(tmp_path / 'raw'),
      },
  )
  wd = tmp_path / 'wd'
  p = run_py(tmp_path, f'--workdir={wd}', *procs.flags(o))
  assert p.returncode == 0, p.stderr[-3000:]
  rows = [json.loads(l) for l in open(wd / 'metrics.jsonl')]
  steps = [r for r in rows if 'iou' in r]
  assert [r['step'] for r in steps] == [1, 2, 3]
  for r in steps:
    assert all(np.isfinite(r[k]) for k in ('loss', 'iou', 'mix')), r
    assert r['loss'] == pytest.approx(r['iou'] + 0.1 * r['mix'], rel=1e-5)
  assert any('val_miou' in r for r in rows)
  with open(wd / 'eval_test.json') as f:
    res = json.load(f)
  assert res['checkpoint_step'] in (1, 2, 3) and res['num_clips'] > 0
  assert 0.0 <= res['miou'] <= 1.0 and np.isfinite(res['fscore'])


def tiny_config():
  c = synthetic_avsegformer.get_config()
  for k, v in TINY.items():
    section, key = k.split('.', 1)
    if '.' not in key:
      c[section][key] = v
  c.train.lr = 1e-2
  c.train.schedule, c.train.warmup_steps = 'constant', 0
  return c


def _subtree_changed(a, b):
  return any(
      not np.array_equal(x, y)
      for x, y in zip(
          jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
      )
  )


def test_frozen_backbone_then_trained():
  """Optimizer steps 1-2 (frozen) leave the backbone's parameters as they
  were (its BatchNorm statistics and the rest of the model move); step 3
  changes them. `head/fpn` and `head/attn_fc_*` (unused) never change."""
  c = tiny_config()
  model, vggish = runtime.build(c)
  optimizer, _ = train.make_optimizer(
      c.train, 10, model_name='avsegformer', frozen_steps=2
  )
  state = runtime.new_state(runtime.init_variables(c, model), optimizer)
  rng = np.random.default_rng(0)
  batch = {
      'frames': rng.standard_normal((2, 5, 32, 32, 3)).astype(np.float32),
      'audio': rng.standard_normal((2, 5, 128)).astype(np.float32),
      'masks': (rng.random((2, 5, 32, 32)) > 0.5).astype(np.float32),
  }
  step = jax.jit(
      functools.partial(
          train.train_step,
          model=model,
          vggish=vggish,
          optimizer=optimizer,
          config=c,
      )
  )
  states = [jax.device_get(state)]
  for _ in range(3):
    state, metrics = step(state, batch, None)
    assert np.isfinite(float(metrics['loss']))
    states.append(jax.device_get(state))
  p = [s.params for s in states]
  for i in (1, 2):
    assert not _subtree_changed(p[0]['backbone'], p[i]['backbone'])
    assert _subtree_changed(p[i - 1]['head'], p[i]['head'])
    assert _subtree_changed(p[i - 1]['audio_proj'], p[i]['audio_proj'])
  assert _subtree_changed(states[0].batch_stats, states[1].batch_stats)
  assert _subtree_changed(p[2]['backbone'], p[3]['backbone'])
  for unused in ('fpn', 'attn_fc_0', 'attn_fc_2', 'attn_fc_4'):
    assert not _subtree_changed(p[0]['head'][unused], p[3]['head'][unused])
  labels = avsegformer_family.param_labels(p[0])['head']
  assert labels['fc_0']['kernel'] == 'rest'
  assert labels['attn_fc_0']['kernel'] == 'unused'


def test_frozen_backbone_steps_from_epochs():
  c = tiny_config()
  c.train.freeze_backbone_epochs = 3
  assert train.frozen_backbone_steps(c, per_epoch=5) == 15
  c.train.accum_steps = 2
  assert train.frozen_backbone_steps(c, per_epoch=5) == 8


@pytest.mark.parametrize(
    'config,overrides,message',
    [
        (
            'configs/synthetic.py',
            ['--config.loss.kind=avsegformer'],
            "loss.kind='avsegformer' does not fit model.name='avs'",
        ),
        (
            'configs/synthetic_avsegformer.py',
            ['--config.loss.kind=bce'],
            "loss.kind='bce' does not fit model.name='avsegformer'",
        ),
        (
            'configs/synthetic_avsegformer.py',
            ['--config.model.name=tpavi'],
            "model.name='tpavi': choose one of",
        ),
    ],
)
def test_model_loss_mismatch_is_one_line(tmp_path, config, overrides, message):
  p = run_py(
      tmp_path, f'--workdir={tmp_path / "wd"}', *overrides, config=config
  )
  assert p.returncode == 1, p.stderr[-2000:]
  errors = [l for l in p.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and message in errors[0], p.stderr[-2000:]
  assert 'Traceback' not in p.stderr
