"""Training end to end on a tiny synthetic AVSBench (CPU).

One run of the README's demo command (`run.py --config=configs/synthetic.py`,
made tiny by flags) is the reference for the other tests:
  * 4 simulated devices (replicated and FSDP) give the 1-device numbers;
  * a run stopped by SIGTERM and re-run resumes to the same final state;
  * evaluating a restored checkpoint gives the val J the trainer logged;
  * a converted PyTorch checkpoint restores and evaluates;
  * broken audio (shuffled, silent) evaluates and writes its files;
  * a NaN loss stops training, naming the step, with no bad checkpoint.

The runs share a persistent XLA compilation cache (in pytest's cache
directory) so that only the first session pays for compiling the model.
"""

import gc
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import procs
from avs_jax import checkpoint as ckpt_lib
from avs_jax import data as data_lib
from avs_jax import evaluate
from avs_jax import runtime
from avs_jax import torch_weights
from avs_jax import train
from configs import synthetic as synthetic_config
from data_prep import synthetic

STEPS = 6  # 16 train clips / batch 4: 4 steps per epoch, val at 4, 6
CKPT_EVERY = 2  # checkpoints at 2, 4, 6 (all kept: keep=3)
TINY = {
    'data.synthetic.clips': 24,  # 16 train / 4 val / 4 test
    'data.synthetic.size': 32,
    'data.image_size': 32,
    'model.backbone': 'pvt_v2_b0',  # drop-path: rng under sharding
    'model.channels': 16,
    'train.batch_size': 4,
    'eval.batch_size': 4,
    'train.num_steps': STEPS,
    'train.schedule': 'constant',  # lr independent of num_steps
    'train.warmup_steps': 0,
    'train.log_every': 1,
    'train.checkpoint_every': CKPT_EVERY,
    'train.eval_every_epochs': 1,
    'train.keep': 3,
}
SUBPROCESS_TIMEOUT = procs.TIMEOUT
REPO = procs.REPO


# ---------------------------------------------------------------------------
# Shared set-up: data, configs, compilation cache, the runs.


@pytest.fixture(scope='module')
def jax_cache(request, tmp_path_factory):
  """A persistent compilation cache for this module and its subprocesses."""
  cache = getattr(request.config, 'cache', None)
  path = str(
      cache.mkdir('jax_compilation_cache')
      if cache is not None
      else tmp_path_factory.mktemp('jax_compilation_cache')
  )
  names = (
      'jax_compilation_cache_dir',
      'jax_persistent_cache_min_compile_time_secs',
      'jax_persistent_cache_min_entry_size_bytes',
  )
  previous = {n: getattr(jax.config, n) for n in names}
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  yield path
  for n, v in previous.items():
    jax.config.update(n, v)
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top

  compilation_cache.reset_cache()


@pytest.fixture(scope='module')
def overrides(tmp_path_factory, jax_cache):
  """TINY plus data paths; the data is generated here (once)."""
  del jax_cache
  base = tmp_path_factory.mktemp('train_data')
  o = dict(TINY)
  o['data.dir'] = str(base / 'tfds')
  o['data.synthetic.root'] = str(base / 'raw')
  synthetic.ensure_synthetic_data(make_config(o))
  yield o
  gc.collect()  # frees grain's shared-memory batches


def make_config(o, **extra):
  """configs/synthetic.py with the overrides (dotted keys) applied."""
  c = synthetic_config.get_config()
  c.update_from_flattened_dict(
      dict(o, **{k.replace('__', '.'): v for k, v in extra.items()})
  )
  return c


def run_py(workdir, o, log, cache):
  return procs.run_py(workdir, o, log, procs.env(cache))


DEVICES_SCRIPT = r"""
import json, os, sys
import jax
from avs_jax import runtime, train
from configs import synthetic
overrides, out, devices = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
assert jax.device_count() == devices, jax.devices()
info = {}
for fsdp in (False, True):
  c = synthetic.get_config()
  c.update_from_flattened_dict(overrides)
  c.train.fsdp = fsdp
  c.train.num_steps = 2
  train.train_and_evaluate(c, os.path.join(out, f'fsdp{int(fsdp)}'))
  model, _ = runtime.build(c)
  abstract = jax.eval_shape(lambda: runtime.init_variables(c, model))
  shardings = runtime.state_shardings(abstract, runtime.make_mesh(), fsdp)
  info[f'sharded_leaves_fsdp{int(fsdp)}'] = sum(
      'data' in s.spec for s in jax.tree_util.tree_leaves(shardings))
with open(os.path.join(out, 'info.json'), 'w') as f:
  json.dump(info, f)
"""


@pytest.fixture(scope='module')
def launched(overrides, jax_cache, tmp_path_factory):
  """Starts the demo run (1 device) and the 4-device runs side by side."""
  base = tmp_path_factory.mktemp('train_runs')
  a = str(base / 'A')
  d4 = str(base / 'devices4')
  os.makedirs(d4)
  running = {
      'A': run_py(a, overrides, str(base / 'A.log'), jax_cache),
      'D4': procs.Proc(
          [
              sys.executable,
              '-c',
              DEVICES_SCRIPT,
              json.dumps(overrides),
              d4,
              '4',
          ],
          str(base / 'devices4.log'),
          procs.env(jax_cache, devices=4),
      ),
  }
  yield dict(base=base, A=a, D4=d4, procs=running)
  for p in running.values():
    if p.popen.poll() is None:
      p.popen.kill()
      p.popen.wait()


@pytest.fixture(scope='module')
def run_a(launched):
  """The uninterrupted demo run: `python run.py --config=configs/synthetic.py`."""
  p = launched['procs']['A']
  rc = p.wait()
  assert rc == 0, p.tail()
  return launched['A']


def metrics_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def losses_by_step(workdir):
  return {r['step']: r for r in metrics_rows(workdir) if 'loss' in r}


def val_by_step(workdir):
  return {r['step']: r for r in metrics_rows(workdir) if 'val_miou' in r}


def read_json(path):
  with open(path) as f:
    return json.load(f)


def ckpt_steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def flat(tree):
  return {
      '/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
      for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def assert_trees_close(actual, expected, rtol, atol, what):
  a, e = flat(actual), flat(expected)
  assert sorted(a) == sorted(e), what
  assert a, what
  for k in e:
    np.testing.assert_allclose(
        a[k], e[k], rtol=rtol, atol=atol, err_msg=f'{what}: {k}'
    )


def evaluate_path(config, workdir, path, **kw):
  os.makedirs(workdir, exist_ok=True)
  return evaluate.evaluate_checkpoint(config, workdir, path, **kw)


# ---------------------------------------------------------------------------
# 6. The README's demo command.


def test_demo_command_end_to_end(run_a, overrides):
  """Exit 0; metrics, checkpoints, test J with three audios, report, PNGs."""
  assert ckpt_steps(run_a) == [2, 4, 6]
  losses = losses_by_step(run_a)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert all(np.isfinite(r['loss']) and r['loss'] > 0 for r in losses.values())
  val = val_by_step(run_a)
  assert sorted(val) == [4, STEPS]

  num_test = data_lib.num_examples(overrides['data.dir'], 'ms3', 'test')
  best = max((val[s]['val_miou'], s) for s in val)[1]
  for audio, name in (
      ('true', 'eval_test.json'),
      ('shuffled', 'eval_test_shuffled.json'),
      ('silent', 'eval_test_silent.json'),
  ):
    res = read_json(os.path.join(run_a, name))
    assert res['audio'] == audio and res['split'] == 'test'
    assert res['checkpoint_step'] == best
    assert res['num_clips'] == num_test
    for k in ('miou', 'fscore', 'miou_per_frame', 'fscore_per_frame'):
      assert 0.0 <= res[k] <= 1.0, (name, k, res[k])
  for name in ('report.md', 'training_curve.png', 'test_grid.png'):
    assert os.path.getsize(os.path.join(run_a, name)) > 0, name
  overlays = [
      os.path.join(d, f)
      for d, _, fs in os.walk(os.path.join(run_a, 'predictions_test'))
      for f in fs
      if f.endswith('_overlay.png')
  ]
  assert len(overlays) == num_test * 5
  # They show the true audio's masks: the broken-audio evaluations that
  # follow write none (they used to overwrite them).
  assert max(map(os.path.getmtime, overlays)) <= os.path.getmtime(
      os.path.join(run_a, 'eval_test_shuffled.json')
  )
  assert not any(n.startswith('predictions_test_') for n in os.listdir(run_a))


# ---------------------------------------------------------------------------
# 1. 4 simulated devices == 1 device (replicated and FSDP).


@pytest.mark.parametrize('fsdp', [False, True])
def test_four_devices_match_one(launched, run_a, overrides, fsdp, tmp_path):
  p = launched['procs']['D4']
  rc = p.wait()
  assert rc == 0, p.tail()
  info = read_json(os.path.join(launched['D4'], 'info.json'))
  if fsdp:  # the FSDP comparison is not vacuous: something is sharded
    assert info['sharded_leaves_fsdp1'] > 10, info
  else:
    assert info['sharded_leaves_fsdp0'] == 0, info
  d = os.path.join(launched['D4'], f'fsdp{int(fsdp)}')
  assert '4 devices' in p.output()

  # The loss of both steps, and the state after them.
  one, four = losses_by_step(run_a), losses_by_step(d)
  assert sorted(four) == [1, 2]
  for step in (1, 2):
    for k in ('loss', 'bce', 'avm', 'grad_norm'):
      np.testing.assert_allclose(
          four[step][k], one[step][k], rtol=1e-4, err_msg=f'{k} at step {step}'
      )
  s1, step1 = ckpt_lib.load_state(os.path.join(run_a, 'checkpoints', '2'))
  s4, step4 = ckpt_lib.load_state(os.path.join(d, 'checkpoints', '2'))
  assert step1 == step4 == 2 and int(s4['step']) == 2
  # Adam's first steps move every weight by about lr * sign(gradient): where
  # a gradient is ~0 (e.g. a bias before a BatchNorm), summation-order noise
  # flips the sign. So: all weights within 2 lr per step, and all but a few
  # (<0.01%; ~0.001% seen) within float noise.
  p1, p4 = flat(s1['params']), flat(s4['params'])
  assert sorted(p1) == sorted(p4)
  lr = make_config(overrides).train.lr
  total = sum(v.size for v in p1.values())
  off = 0
  for k in p1:
    np.testing.assert_allclose(p4[k], p1[k], rtol=0, atol=2 * lr * 2, err_msg=k)
    off += int(np.sum(np.abs(p4[k] - p1[k]) > 1e-5 + 1e-4 * np.abs(p1[k])))
  assert off <= 1e-4 * total, f'{off} of {total} weights differ'
  assert_trees_close(
      s4['batch_stats'], s1['batch_stats'], 1e-4, 1e-5, 'batch_stats'
  )
  assert_trees_close(s4['opt_state'], s1['opt_state'], 1e-3, 1e-7, 'opt_state')

  # Validation on 4 devices == the 1-device evaluation of the same step.
  val4 = val_by_step(d)[2]
  res = evaluate_path(
      make_config(overrides),
      str(tmp_path),
      os.path.join(run_a, 'checkpoints', '2'),
      split='val',
  )
  np.testing.assert_allclose(val4['val_miou'], res['miou'], atol=1e-5)
  np.testing.assert_allclose(val4['val_fscore'], res['fscore'], atol=1e-5)


# ---------------------------------------------------------------------------
# 2. SIGTERM, then the same command again: the same run as without a stop.


@pytest.fixture(scope='module')
def run_b(launched, run_a, overrides, jax_cache):
  """Workdir B: stopped by SIGTERM after its first checkpoint, then re-run."""
  del run_a  # after A: its compiled programs are in the cache
  base = launched['base']
  b = str(base / 'B')
  first = run_py(b, overrides, str(base / 'B1.log'), jax_cache)
  ckpts = os.path.join(b, 'checkpoints')
  first_ckpt = re.compile(rf'{CKPT_EVERY}(\.|$)')  # being written, or done

  def saving():
    return os.path.isdir(ckpts) and any(
        first_ckpt.match(n) for n in os.listdir(ckpts)
    )

  deadline = time.time() + SUBPROCESS_TIMEOUT
  while not saving():
    assert first.popen.poll() is None, first.tail()
    assert time.time() < deadline, 'no first checkpoint'
    time.sleep(0.05)
  first.popen.send_signal(signal.SIGTERM)
  rc = first.wait()
  assert rc == 0, first.tail()
  out1 = first.output()
  m = re.search(r'preempted: saved step (\d+)', out1)
  assert m, first.tail()
  stopped = int(m.group(1))
  files_after_stop = sorted(os.listdir(b))
  steps_after_stop = ckpt_steps(b)

  second = run_py(b, overrides, str(base / 'B2.log'), jax_cache)
  rc = second.wait()
  assert rc == 0, second.tail()
  return dict(
      workdir=b,
      stopped=stopped,
      files_after_stop=files_after_stop,
      steps_after_stop=steps_after_stop,
      log2=second.output(),
  )


def test_preempted_run_resumes_to_the_same_result(run_a, run_b):
  stopped = run_b['stopped']
  assert CKPT_EVERY <= stopped < STEPS, f'stopped at {stopped}'
  assert run_b['steps_after_stop'][0] == CKPT_EVERY
  assert run_b['steps_after_stop'][-1] == stopped
  # A stopped run neither evaluates the test split nor writes a report.
  for name in ('eval_test.json', 'report.md'):
    assert name not in run_b['files_after_stop']
  assert f'at step {stopped}' in run_b['log2']  # "resumed from ... at step k"

  b = run_b['workdir']
  # The steps after the restart see the same batches and state as A's.
  la, lb = losses_by_step(run_a), losses_by_step(b)
  assert sorted(lb) == list(range(1, STEPS + 1))
  # The re-run steps are logged once (metrics.jsonl is cut at the resume).
  assert len([r for r in metrics_rows(b) if 'loss' in r]) == STEPS
  for step in range(1, STEPS + 1):
    for k in ('loss', 'bce', 'avm', 'grad_norm'):
      np.testing.assert_allclose(
          lb[step][k], la[step][k], rtol=1e-6, err_msg=f'{k} at step {step}'
      )
  va, vb = val_by_step(run_a), val_by_step(b)
  assert sorted(vb) == sorted(va)
  for step in va:
    np.testing.assert_allclose(
        vb[step]['val_miou'], va[step]['val_miou'], rtol=1e-6
    )
    np.testing.assert_allclose(
        vb[step]['val_fscore'], va[step]['val_fscore'], rtol=1e-6
    )

  sa, step_a = ckpt_lib.load_state(
      os.path.join(run_a, 'checkpoints', str(STEPS))
  )
  sb, step_b = ckpt_lib.load_state(os.path.join(b, 'checkpoints', str(STEPS)))
  assert step_a == step_b == STEPS
  for k in ('params', 'batch_stats', 'opt_state'):
    assert_trees_close(sb[k], sa[k], 1e-6, 1e-8, k)

  for name in (
      'eval_test.json',
      'eval_test_shuffled.json',
      'eval_test_silent.json',
  ):
    ra, rb = (read_json(os.path.join(w, name)) for w in (run_a, b))
    assert rb['checkpoint_step'] == ra['checkpoint_step'], name
    assert rb['num_clips'] == ra['num_clips'], name
    for k in ('miou', 'fscore', 'miou_per_frame', 'fscore_per_frame'):
      np.testing.assert_allclose(rb[k], ra[k], rtol=1e-6, err_msg=f'{name} {k}')


# ---------------------------------------------------------------------------
# 3. Evaluating a restored checkpoint == the trainer's validation.


def test_restored_checkpoint_gives_logged_val_j(run_a, overrides, tmp_path):
  config = make_config(overrides, eval__split='val')
  val = val_by_step(run_a)
  for step in sorted(val):
    res = evaluate_path(
        config, str(tmp_path), os.path.join(run_a, 'checkpoints', str(step))
    )
    assert res['checkpoint_step'] == step and res['split'] == 'val'
    np.testing.assert_allclose(
        res['miou'], val[step]['val_miou'], rtol=1e-6, err_msg=f'step {step}'
    )
    np.testing.assert_allclose(
        res['fscore'],
        val[step]['val_fscore'],
        rtol=1e-6,
        err_msg=f'step {step}',
    )
    assert read_json(os.path.join(tmp_path, 'eval_val.json')) == res
  # The workdir itself resolves to the best step by val J.
  best = max((val[s]['val_miou'], s) for s in val)[1]
  assert ckpt_lib.load_state(run_a)[1] == best


# ---------------------------------------------------------------------------
# 5. Broken audio at evaluation.


@pytest.mark.parametrize('audio', ['shuffled', 'silent'])
def test_eval_audio_modes(run_a, overrides, audio, tmp_path):
  """`eval.audio` runs, names its file, and agrees with the demo's report."""
  config = make_config(overrides, eval__audio=audio)
  path = os.path.join(run_a, 'checkpoints', str(STEPS))
  res = evaluate_path(config, str(tmp_path), path)
  assert res['audio'] == audio and res['checkpoint_step'] == STEPS
  assert [f for f in os.listdir(tmp_path) if f.endswith('.json')] == [
      f'eval_test_{audio}.json'
  ]
  assert read_json(os.path.join(tmp_path, f'eval_test_{audio}.json')) == res
  report = read_json(os.path.join(run_a, f'eval_test_{audio}.json'))
  if report['checkpoint_step'] == STEPS:
    for k in ('miou', 'fscore', 'miou_per_frame', 'fscore_per_frame'):
      np.testing.assert_allclose(res[k], report[k], rtol=1e-6)


# ---------------------------------------------------------------------------
# 4. A converted PyTorch checkpoint.


def test_converted_torch_checkpoint_restores_and_evaluates(
    overrides, tmp_path, jax_cache
):
  config = make_config(overrides, seed=7)
  model, vggish = runtime.build(config)
  variables = jax.device_get(runtime.init_variables(config, model))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(np.asarray, variables)
  # Non-trivial BatchNorm statistics, so that their conversion shows.
  variables['batch_stats'] = jax.tree_util.tree_map(
      lambda x: (rng.uniform(0.5, 1.5, x.shape) if x.ndim else x).astype(
          np.float32
      ),
      variables['batch_stats'],
  )
  sd = torch_weights.flax_to_torch(variables, config.model)
  src = str(tmp_path / 'avs_random.npz')
  np.savez(src, **sd)
  cfg_file = tmp_path / 'tiny_config.py'
  cfg_file.write_text(
      f'import sys\nsys.path.insert(0, {REPO!r})\n'
      'from configs import synthetic\n\n'
      'def get_config(arg=None):\n'
      '  c = synthetic.get_config(arg)\n'
      f'  c.update_from_flattened_dict({dict(TINY)!r})\n'
      '  return c\n'
  )
  out = str(tmp_path / 'converted')
  p = subprocess.run(
      [
          sys.executable,
          '-m',
          'avs_jax.convert',
          f'--src={src}',
          f'--config={cfg_file}',
          f'--out={out}',
      ],
      cwd=REPO,
      env=procs.env(jax_cache),
      capture_output=True,
      text=True,
      timeout=SUBPROCESS_TIMEOUT,
  )
  assert p.returncode == 0, p.stdout + p.stderr

  restored, step = ckpt_lib.load_state(out)
  expected = torch_weights.torch_to_flax(
      torch_weights.load_state_dict(src), config.model
  )
  assert_trees_close(restored['params'], expected['params'], 0, 0, 'params')
  assert_trees_close(
      restored['batch_stats'], expected['batch_stats'], 0, 0, 'batch_stats'
  )
  assert_trees_close(
      restored['params'], variables['params'], 0, 0, 'round trip'
  )

  # `--mode eval` restores it: the same numbers as the variables themselves.
  res = evaluate_path(config, str(tmp_path / 'eval'), out)
  assert res['checkpoint_step'] == step
  mesh = runtime.make_mesh()
  evaluator = evaluate.Evaluator(
      config, model, vggish, mesh, runtime.audio_variables(config, vggish, mesh)
  )
  direct = evaluator.run(variables, 'ms3', 'test')
  for k in (
      'miou',
      'fscore',
      'miou_per_frame',
      'fscore_per_frame',
      'num_clips',
  ):
    np.testing.assert_allclose(res[k], direct[k], rtol=1e-6, err_msg=k)


# ---------------------------------------------------------------------------
# 7. A NaN loss stops the run.


def test_nan_loss_stops_with_the_step_and_no_bad_checkpoint(
    run_a, overrides, tmp_path
):
  state, _ = ckpt_lib.load_state(os.path.join(run_a, 'checkpoints', '2'))
  params = jax.tree_util.tree_map(np.array, state['params'])
  leaf = jax.tree_util.tree_leaves(params)[0]
  leaf.flat[0] = np.nan
  bad = ckpt_lib.save_variables(
      {'params': params, 'batch_stats': state['batch_stats']},
      str(tmp_path / 'nan_init'),
  )
  # The loss is NaN from step 1; it is checked one step late (log_every is
  # large) but before anything is saved (a checkpoint every step).
  config = make_config(
      overrides,
      train__init_from=bad,
      train__num_steps=3,
      train__log_every=100,
      train__checkpoint_every=1,
  )
  workdir = str(tmp_path / 'work')
  with pytest.raises(FloatingPointError, match=r'loss is nan at step 1\b'):
    train.train_and_evaluate(config, workdir)
  ckpts = os.path.join(workdir, 'checkpoints')
  for step in (ckpt_steps(workdir) if os.path.isdir(ckpts) else []):
    restored, _ = ckpt_lib.load_state(os.path.join(ckpts, str(step)))
    assert all(
        np.isfinite(x).all()
        for x in jax.tree_util.tree_leaves(restored['params'])
    ), f'checkpoint {step} holds the diverged state'


@pytest.mark.parametrize('value', [np.nan, np.inf, -np.inf])
def test_check_finite_names_the_first_bad_step(value):
  with pytest.raises(FloatingPointError, match=r'at step 17\b'):
    train.check_finite(17, [np.float32(value)])
  with pytest.raises(FloatingPointError, match=r'at step 19\b'):
    train.check_finite(17, np.float32([0.5, 0.4, value, np.nan]))
  train.check_finite(17, [np.float32(0.5), np.float32(0.4)])


# ---------------------------------------------------------------------------
# audio.precompute: VGGish once per clip gives the per-step VGGish's step.


def test_precomputed_audio_gives_the_same_step(overrides):
  config = make_config(overrides)
  dc = config.data
  model, vggish = runtime.build(config)
  audio_vars = runtime.audio_variables(config, vggish, runtime.make_mesh())
  table = runtime.embedding_table(config, vggish, audio_vars)
  assert len(table) == data_lib.num_examples(dc.dir, dc.setting, 'train')
  assert all(e.shape == (5, 128) for e in table.values())

  batch = next(
      iter(
          data_lib.train_dataset(
              dc.dir, dc.setting, batch_size=4, image_size=dc.image_size, seed=1
          )
      )
  )
  fast = runtime.with_audio(batch, table)
  assert 'log_mel' not in fast and fast['audio'].shape == (4, 5, 128)
  optimizer, _ = train.make_optimizer(config.train, 10)
  state = runtime.new_state(runtime.init_variables(config, model), optimizer)
  step = jax.jit(
      lambda s, b: train.train_step(
          s,
          b,
          audio_vars,
          model=model,
          vggish=vggish,
          optimizer=optimizer,
          config=config,
      )
  )
  keep = lambda b: {k: v for k, v in b.items() if k in runtime.DEVICE_KEYS}
  s1, m1 = step(state, keep(batch))
  s2, m2 = step(state, keep(fast))
  for k in m1:
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)
  assert_trees_close(s2.params, s1.params, 1e-5, 1e-6, 'params')
  # The embeddings are the audio's: a different clip's row differs.
  ids = [str(i) for i in batch['id']]
  assert not np.allclose(table[ids[0]], table[ids[1]])


def test_precomputed_audio_gives_the_same_evaluation(overrides):
  """Evaluation with VGGish run once per split (`audio.precompute`) gives the
  metrics of VGGish in the eval step, for true, shuffled and silent audio,
  with a padded last batch (3 clips per batch) and one-clip batches."""
  results = {}
  for precompute in (False, True):
    config = make_config(
        overrides, audio__precompute=precompute, eval__batch_size=3
    )
    model, vggish = runtime.build(config)
    mesh = runtime.make_mesh()
    audio_vars = runtime.audio_variables(config, vggish, mesh)
    # TPAVI starts as the identity (its W_z BatchNorm scale is zero): give
    # it a scale so that the audio changes the masks.
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: np.ones_like(x)
        if 'W_z_1' in jax.tree_util.keystr(p)
        and 'scale' in jax.tree_util.keystr(p)
        else x,
        runtime.init_variables(config, model),
    )
    evaluator = evaluate.Evaluator(config, model, vggish, mesh, audio_vars)
    for audio in evaluate.AUDIO_MODES:
      results[precompute, audio] = evaluator.run(
          variables, config.data.setting, 'val', audio=audio
      )
    assert bool(evaluator.tables) == precompute  # one VGGish pass per split
  for audio in evaluate.AUDIO_MODES:
    for k in ('miou', 'fscore', 'miou_per_frame'):
      np.testing.assert_allclose(
          results[True, audio][k],
          results[False, audio][k],
          atol=1e-6,
          err_msg=f'{audio} {k}',
      )
  # The audio modes are told apart by far more than that (else the
  # comparison proves nothing): J 0.1199 / 0.1184 / 0.1191 when written.
  js = [results[False, a]['miou'] for a in evaluate.AUDIO_MODES]
  assert min(abs(a - b) for a, b in itertools.combinations(js, 2)) > 2e-4, js


# ---------------------------------------------------------------------------
# Nothing lost: damaged checkpoints, diverged runs.


def damage(step_dir, kind):
  """Damages a checkpoint as a crash or a disk might."""
  if kind == 'truncated':
    files = [
        os.path.join(d, f)
        for d, _, fs in os.walk(os.path.join(step_dir, 'state'))
        for f in fs
    ]
    big = max(files, key=os.path.getsize)
    with open(big, 'r+b') as f:
      f.truncate(os.path.getsize(big) // 2)
  elif kind == 'no_metadata':
    os.remove(os.path.join(step_dir, 'state', '_METADATA'))
  else:  # the grain iterator state
    data = os.path.join(step_dir, 'data')
    for f in os.listdir(data):
      os.remove(os.path.join(data, f))


def copy_run(src, dst, steps):
  """A workdir holding `src`'s checkpoints `steps` and its metrics."""
  os.makedirs(os.path.join(dst, 'checkpoints'))
  for s in steps:
    shutil.copytree(
        os.path.join(src, 'checkpoints', str(s)),
        os.path.join(dst, 'checkpoints', str(s)),
    )
  shutil.copy(os.path.join(src, 'metrics.jsonl'), dst)
  return dst


@pytest.mark.parametrize('kind', ['truncated', 'no_metadata', 'no_data_state'])
def test_damaged_latest_checkpoint_is_set_aside(
    run_a, overrides, tmp_path, kind, capfd
):
  work = copy_run(run_a, str(tmp_path / 'work'), [2, 4])
  damage(os.path.join(work, 'checkpoints', '4'), kind)
  # --mode=eval names a damaged model state; without the input pipeline's
  # state the model still evaluates (eval does not need it).
  if kind == 'no_data_state':
    assert ckpt_lib.load_state(os.path.join(work, 'checkpoints', '4'))[1] == 4
  else:
    with pytest.raises(ckpt_lib.CheckpointError, match=r'checkpoints/4\b'):
      ckpt_lib.load_state(os.path.join(work, 'checkpoints', '4'))
  # Training resumes from the newest intact one, with one warning.
  config = make_config(overrides)
  mesh = runtime.make_mesh()
  model, _ = runtime.build(config)
  optimizer, _ = train.make_optimizer(config.train, STEPS)
  mngr = ckpt_lib.manager(os.path.join(work, 'checkpoints'))
  _, state, start = train._data_and_state(config, mngr, model, optimizer, mesh)  # pylint: disable=protected-access
  mngr.close()
  assert start == 2 and int(state.step) == 2
  err = capfd.readouterr().err
  assert 'checkpoint step 4' in err and 'damaged' in err, err
  assert err.count('warning:') == 1
  assert sorted(os.listdir(os.path.join(work, 'checkpoints'))) == [
      '2',
      '4.damaged',
  ]  # set aside, not deleted


def test_resume_after_damage_ends_like_the_uninterrupted_run(
    run_a, overrides, tmp_path
):
  work = copy_run(run_a, str(tmp_path / 'work'), [2, 4])
  damage(os.path.join(work, 'checkpoints', '4'), 'truncated')
  res = train.train_and_evaluate(make_config(overrides), work)
  la, lw = losses_by_step(run_a), losses_by_step(work)
  rows = [r for r in metrics_rows(work) if 'loss' in r]
  assert len(rows) == STEPS, 'steps logged twice after the resume'
  for step in range(1, STEPS + 1):
    np.testing.assert_allclose(lw[step]['loss'], la[step]['loss'], rtol=1e-6)
  ref = read_json(os.path.join(run_a, 'eval_test.json'))
  np.testing.assert_allclose(res['miou'], ref['miou'], rtol=1e-6)


def test_diverged_run_keeps_only_finite_checkpoints(overrides, tmp_path):
  work = str(tmp_path / 'work')
  config = make_config(overrides, train__lr=1e6, train__checkpoint_every=1)
  with pytest.raises(FloatingPointError, match=r'step \d+'):
    train.train_and_evaluate(config, work)
  ckpts = os.path.join(work, 'checkpoints')
  for step in (ckpt_steps(work) if os.path.isdir(ckpts) else []):
    restored, _ = ckpt_lib.load_state(os.path.join(ckpts, str(step)))
    assert all(
        np.isfinite(x).all()
        for x in jax.tree_util.tree_leaves(restored['params'])
    ), step
  # The same workdir with a sane learning rate resumes and finishes.
  res = train.train_and_evaluate(make_config(overrides), work)
  assert np.isfinite(res['miou'])
