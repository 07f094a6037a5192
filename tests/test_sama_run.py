"""SAMA-AVS through `run.py` (`configs/synthetic_sama.py` made tiny): it
trains (BCE + IoU logged, the loss its sum), resumes, evaluates a checkpoint
and predicts on a video; S4 feeds the model each clip's first frame only;
the per-epoch cosine; the frozen/trainable split of SAM's recipe; its
mistakes are one line."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import procs
from avs_jax import runtime
from avs_jax import train
from avs_jax.projects.sama import train_mask
from configs import sama_s4
from configs import synthetic_sama

TINY = {
    'data.synthetic.clips': 12,
    'data.synthetic.size': 32,
    'data.image_size': 32,
    'model.image_size': 32,
    'model.window_size': 2,
    'model.depth': 2,
    'model.global_attn': '(1,)',
    'model.embed_dim': 16,
    'model.num_heads': 2,
    'model.prompt_embed_dim': 16,
    'train.batch_size': 2,
    'train.log_every': 1,
    'eval.batch_size': 2,
    'eval.save_overlays': False,
}


def run_py(tmp, *args):
  o = dict(
      TINY,
      **{
          'data.dir': str(tmp / 'tfds'),
          'data.synthetic.root': str(tmp / 'raw'),
      },
  )
  return procs.run_config(
      'configs/synthetic_sama.py',
      str(tmp / 'cache'),
      f'--workdir={tmp / "wd"}',
      *procs.flags(o),
      *args,
  )


def test_run_py_trains_resumes_evaluates_and_predicts(tmp_path):
  wd = tmp_path / 'wd'
  p = run_py(tmp_path, '--config.train.num_steps=2')
  assert p.returncode == 0, p.stderr[-3000:]
  p = run_py(tmp_path, '--config.train.num_steps=3')
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'at step 2' in p.stderr, p.stderr[-3000:]  # resumed, not restarted
  rows = [json.loads(l) for l in open(wd / 'metrics.jsonl')]
  steps = [r for r in rows if 'iou' in r]
  assert [r['step'] for r in steps] == [1, 2, 3]
  for r in steps:  # the recipe's loss: BCE + soft IoU
    assert 0 < r['iou'] < 1 and r['bce'] > 0, r
    assert r['loss'] == pytest.approx(r['bce'] + r['iou'], rel=1e-5), r
  with open(wd / 'eval_test.json') as f:
    res = json.load(f)
  assert res['checkpoint_step'] in (2, 3) and res['num_clips'] > 0

  ckpt = wd / 'checkpoints'
  p = run_py(tmp_path, '--mode=eval', f'--config.eval.restore={ckpt}')
  assert p.returncode == 0, p.stderr[-3000:]
  p = run_py(
      tmp_path,
      '--mode=predict',
      f'--config.predict.video={procs.video(tmp_path / "v.mp4")}',
      f'--config.predict.restore={ckpt}',
  )
  assert p.returncode == 0, p.stderr[-3000:]
  masks = os.listdir(wd / 'predict' / 'v' / 'masks')
  assert sorted(masks) == ['v_0001.png', 'v_0002.png']
  assert os.path.exists(wd / 'predict' / 'v' / 'v_overlay.mp4')


def tiny_config(setting='ms3'):
  c = synthetic_sama.get_config()
  for k, v in TINY.items():
    section, key = k.split('.', 1)
    if '.' not in key and key != 'global_attn':
      c[section][key] = v
  c.model.global_attn = (1,)
  c.data.setting = setting
  return c


def test_s4_trains_on_the_first_frame_only():
  """S4's loss sees frame 0 (the reference's loader): changing the other
  frames' pixels does not change the loss; on MS3 it does."""
  for setting, same in (('s4', True), ('ms3', False)):
    c = tiny_config(setting)
    model, vggish = runtime.build(c)
    optimizer, _ = train.make_optimizer(c.train, 10, model_name='sama')
    state = runtime.new_state(runtime.init_variables(c, model), optimizer)
    rng = np.random.default_rng(0)
    batch = {
        'frames': rng.standard_normal((2, 5, 32, 32, 3)).astype(np.float32),
        'audio': rng.standard_normal((2, 5, 128)).astype(np.float32),
        'masks': (rng.random((2, 5, 32, 32)) > 0.5).astype(np.float32),
    }
    if setting == 's4':
      batch['masks'] = batch['masks'][:, :1]
    loss = lambda b: float(
        train.state_loss(state, b, None, model=model, vggish=vggish, config=c)
    )
    other = dict(batch, frames=batch['frames'].copy())
    other['frames'][:, 1:] += 1.0
    assert (loss(batch) == loss(other)) == same, setting


def test_frozen_split_and_per_epoch_cosine():
  """`train.freeze` (the recipe): only the reference's trainable leaves get
  updates; the learning rate is constant within an epoch and follows
  `CosineAnnealingLR(T_max=epochs, eta_min=lr_min)` across epochs."""
  c = tiny_config()
  c.train.freeze = True
  c.train.schedule, c.train.lr_min = 'cosine_per_epoch', 1e-7
  model, _ = runtime.build(c)
  params = runtime.init_variables(c, model)['params']
  tx, lr = train.make_optimizer(c.train, 40, model_name='sama', per_epoch=10)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = jax.tree_util.tree_map(lambda u: bool(jnp.any(u != 0)), updates)
  assert moved == train_mask.trainable_mask(params)
  lrs = [float(lr(s)) for s in (0, 9, 10, 20, 39)]
  lo, hi = 1e-7, c.train.lr
  cos = lambda e: lo + (hi - lo) * (1 + np.cos(np.pi * e / 4)) / 2
  np.testing.assert_allclose(lrs, [hi, hi, cos(1), cos(2), cos(3)], rtol=1e-6)


def test_recipe_configs_check():
  """The shipped recipes pass the family's checks for every encoder; a wrong
  encoder, frame size or setting is named."""
  for enc in ('vit_b', 'vit_l', 'vit_h'):
    runtime.check_config(sama_s4.get_config(enc), devices=1)
  bad = {
      'model.encoder': ('vit_x', 'model.encoder'),
      'data.image_size': (512, 'data.image_size=512'),
      'data.setting': ('avss', 'data.setting'),
  }
  for field, (value, message) in bad.items():
    c = sama_s4.get_config()
    section, key = field.split('.')
    c[section][key] = value
    with pytest.raises(runtime.ConfigError, match=message):
      runtime.check_config(c, devices=1)
