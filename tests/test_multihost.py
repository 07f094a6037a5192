"""Several processes for real: 2 processes x 2 CPU devices on localhost.

`run.py --coordinator_address=localhost:PORT --num_processes=2
--process_id=i` is a pod slice in miniature: real cross-process collectives
(gloo), per-process input shards, Orbax multi-process checkpoints. Compared
with one process of 4 devices on the same tiny synthetic data:
  * the training losses agree to float32 summation noise: the global
    batches, the data order and every computation are the same, only the
    order in which the collectives add the partial sums differs (1e-5 at
    step 1; Adam amplifies that noise, so 2e-3 over 12 steps);
  * test J agrees within 0.02 (in practice to ~1e-6);
  * a process killed with -9 after a checkpoint makes its peer exit within
    the heartbeat timeout, and relaunching both ends exactly like the
    uninterrupted 2-process run;
  * the 2-process checkpoint evaluates in one process (1 device) to the
    same test J.
"""

import json
import subprocess
import sys
import os
import time

import numpy as np
import pytest

import procs
from configs import synthetic as synthetic_config
from data_prep import synthetic

STEPS = 12  # 16 train clips / batch 4: 4 steps per epoch; val at 4, 8, 12
HEARTBEAT = 60  # seconds: a dead peer is noticed after this
PEER_EXIT_BOUND = 300  # seconds: the survivor must be gone by then
TINY = {
    'data.synthetic.clips': 24,  # 16 train / 4 val / 4 test
    'data.synthetic.size': 32,
    'data.image_size': 32,
    'model.channels': 16,
    'model.head_channels': 8,
    'train.batch_size': 4,
    'eval.batch_size': 4,
    'train.num_steps': STEPS,
    'train.schedule': 'constant',
    'train.warmup_steps': 0,
    'train.log_every': 1,
    'train.checkpoint_every': 2,
    'train.eval_every_epochs': 1,
    'train.keep': 2,
    'eval.save_overlays': False,
}


@pytest.fixture(scope='module')
def cache(request, tmp_path_factory):
  c = getattr(request.config, 'cache', None)
  return str(
      c.mkdir('jax_compilation_cache')
      if c is not None
      else tmp_path_factory.mktemp('jax_compilation_cache')
  )


@pytest.fixture(scope='module')
def overrides(tmp_path_factory):
  base = tmp_path_factory.mktemp('multihost_data')
  o = dict(TINY)
  o['data.dir'] = str(base / 'tfds')
  o['data.synthetic.root'] = str(base / 'raw')
  c = synthetic_config.get_config()
  c.update_from_flattened_dict(o)
  synthetic.ensure_synthetic_data(c)
  return o


def launch_pair(workdir, overrides, cache, log_prefix, port=None):
  """The two processes of one 2 x 2-device run."""
  port = port or procs.free_port()
  return [
      procs.run_py(
          workdir,
          overrides,
          f'{log_prefix}{i}.log',
          procs.env(cache, devices=2),
          f'--coordinator_address=localhost:{port}',
          '--num_processes=2',
          f'--process_id={i}',
          f'--heartbeat_timeout={HEARTBEAT}',
      )
      for i in range(2)
  ]


def wait_all(ps):
  for p in ps:
    rc = p.wait()
    assert rc == 0, p.tail(6000)


def rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def losses(workdir):
  out = [r for r in rows(workdir) if 'loss' in r]
  assert len(out) == len({r['step'] for r in out}), 'a step logged twice'
  return {r['step']: r for r in out}


def result(workdir, name='eval_test.json'):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def runs(overrides, cache, tmp_path_factory):
  """2 processes x 2 devices, then one process x 4 devices."""
  base = tmp_path_factory.mktemp('multihost_runs')
  one, two = str(base / 'one'), str(base / 'two')
  pair = launch_pair(two, overrides, cache, str(base / 'two'))
  try:
    wait_all(pair)
  finally:
    for p in pair:
      p.kill()
  single = procs.run_py(
      one, overrides, str(base / 'one.log'), procs.env(cache, devices=4)
  )
  try:
    wait_all([single])
  finally:
    single.kill()
  return dict(base=base, one=one, two=two, logs=[p.output() for p in pair])


def test_two_processes_match_one_process(runs):
  assert '4 devices / 2 processes' in runs['logs'][0]
  one, two = losses(runs['one']), losses(runs['two'])
  assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
  # Step 1 starts from the same state on the same batch: only the order in
  # which the cross-process reductions add up differs (~1e-7 seen). Adam
  # then turns such noise into lr-sized weight differences where a gradient
  # is ~0 (see test_train.py), so later steps drift apart slowly (~6e-4
  # after 12 steps seen); the bound grows with the step.
  for step in one:
    rtol = 1e-5 if step == 1 else 2e-3
    for k in ('loss', 'bce', 'avm', 'grad_norm'):
      np.testing.assert_allclose(
          two[step][k], one[step][k], rtol=rtol, err_msg=f'{k} at step {step}'
      )
  r1, r2 = result(runs['one']), result(runs['two'])
  assert r1['num_clips'] == r2['num_clips'] == 4  # every test clip once
  assert r1['checkpoint_step'] == r2['checkpoint_step']
  assert abs(r1['miou'] - r2['miou']) <= 0.02
  # Only process 0 writes: one metrics file, one report, no duplicate rows.
  for name in ('report.md', 'eval_test_shuffled.json', 'eval_test_silent.json'):
    assert os.path.exists(os.path.join(runs['two'], name)), name


def test_two_process_checkpoint_evaluates_in_one_process(
    runs, overrides, cache, tmp_path
):
  p = procs.Proc(
      [
          sys.executable,
          'run.py',
          '--config=configs/synthetic.py',
          '--mode=eval',
          f'--workdir={tmp_path}',
          f'--config.eval.restore={runs["two"]}',
          *procs.flags(overrides),
      ],
      str(tmp_path / 'eval.log'),
      procs.env(cache, devices=1),
  )
  assert p.wait() == 0, p.tail()
  r1, r2 = result(str(tmp_path)), result(runs['two'])
  assert r1['checkpoint_step'] == r2['checkpoint_step']
  for k in ('miou', 'fscore', 'num_clips'):
    np.testing.assert_allclose(r1[k], r2[k], rtol=1e-5, err_msg=k)


def complete_checkpoints(workdir):
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return []
  return sorted(
      int(n)
      for n in os.listdir(d)
      if n.isdigit()
      and os.path.exists(os.path.join(d, n, '_CHECKPOINT_METADATA'))
  )


def test_killed_process_stops_its_peer_and_relaunch_resumes(
    runs, overrides, cache
):
  base = runs['base']
  work = str(base / 'killed')
  pair = launch_pair(work, overrides, cache, str(base / 'killed'))
  try:
    deadline = time.time() + procs.TIMEOUT
    while not complete_checkpoints(work):
      assert all(p.popen.poll() is None for p in pair), pair[0].tail()
      assert time.time() < deadline, 'no checkpoint'
      time.sleep(0.05)
    pair[1].popen.kill()  # kill -9
    killed_at = time.time()
    pair[1].popen.wait()
    try:
      rc = pair[0].popen.wait(PEER_EXIT_BOUND)
    except subprocess.TimeoutExpired:
      pytest.fail(
          f'process 0 still running {PEER_EXIT_BOUND} s after its '
          f'peer was killed:\n{pair[0].tail()}'
      )
    waited = time.time() - killed_at
  finally:
    for p in pair:
      p.kill()
  out = pair[0].output()
  assert 'evaluating the best checkpoint' not in out, 'finished before kill'
  assert rc != 0, out[-3000:]
  assert 'another process stopped' in out, out[-3000:]  # one clear line
  print(f'process 0 exited {waited:.1f} s after its peer was killed')

  relaunched = launch_pair(work, overrides, cache, str(base / 'relaunch'))
  try:
    wait_all(relaunched)
  finally:
    for p in relaunched:
      p.kill()
  assert 'resumed from' in relaunched[0].output()
  want, got = losses(runs['two']), losses(work)
  assert sorted(got) == sorted(want)
  for step in want:
    np.testing.assert_allclose(
        got[step]['loss'],
        want[step]['loss'],
        rtol=1e-6,
        err_msg=f'loss at step {step}',
    )
  r, w = result(work), result(runs['two'])
  assert r['checkpoint_step'] == w['checkpoint_step']
  np.testing.assert_allclose(r['miou'], w['miou'], rtol=1e-6)


PEER = """
import sys, time
from avs_jax import runtime
runtime.initialize_distributed(
    'localhost:' + sys.argv[1], 2, int(sys.argv[2]), heartbeat_timeout=3
)
print('connected', flush=True)
if sys.argv[2] == sys.argv[3]:
  time.sleep(2)
  import os; os.kill(os.getpid(), 9)
time.sleep(120)  # no collective running: only the heartbeats notice
print('still running', flush=True)
"""


def run_peers(tmp_path, cache, dies):
  """Two processes connect, process `dies` kills itself (-9) 2 s later;
  the exit statuses and outputs of both (each given 100 s)."""
  port = str(procs.free_port())
  pair = [
      procs.Proc(
          [sys.executable, '-c', PEER, port, str(i), str(dies)],
          str(tmp_path / f'{i}.log'),
          procs.env(cache, devices=1),
      )
      for i in range(2)
  ]
  try:
    rcs = [p.wait(100) for p in pair]
  finally:
    for p in pair:
      p.kill()
  return rcs, [p.output() for p in pair]


def test_peer_dying_outside_a_collective_is_one_line(tmp_path, cache):
  """Heartbeats, not gloo, notice it: one line and exit 3, no abort."""
  rcs, (out, dead) = run_peers(tmp_path, cache, dies=1)
  assert rcs == [3, -9], out + dead[-3000:]
  lines = [l for l in out.splitlines() if l.startswith('error:')]
  assert len(lines) == 1, out
  assert 'another process stopped (process 1 sent no heartbeat' in lines[0]
  assert 'Fatal' not in out and 'still running' not in out, out


def test_coordinator_dying_ends_its_peers(tmp_path, cache):
  """Process 0 holds the coordination service; when it dies, JAX itself
  ends the others at once (a fatal log naming the leader, abort): they do
  not wait for it."""
  rcs, (_, out) = run_peers(tmp_path, cache, dies=0)
  assert rcs[0] == -9 and rcs[1] not in (0, None), out
  assert 'leader task was preempted/died' in out, out
  assert 'still running' not in out, out
