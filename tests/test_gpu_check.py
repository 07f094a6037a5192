"""bench/gpu_check.py: its CPU mode end to end (every job kind at tiny sizes,
so that the first GPU call cannot die on a typo), the turns that keep timed
sections apart, the junit reading that names failures, bad input."""

import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'bench'))
import gpu_check  # pylint: disable=g-import-not-at-top,wrong-import-position


def run_check(*args, timeout=1500):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return subprocess.run(
      [sys.executable, os.path.join(REPO, 'bench', 'gpu_check.py'), *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )


def test_cpu_mode_runs_every_job_kind(tmp_path):
  proc = run_check('--cpu', '--out', str(tmp_path), '--slots', '2')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(tmp_path / 'gpu_check.json') as f:
    jobs = json.load(f)['jobs']
  assert {n: j['status'] for n, j in jobs.items()} == {n: 'ok' for n in jobs}
  assert set(jobs) == set(gpu_check.CPU_JOBS)
  probe = jobs['probe']['result']
  assert probe['platform'] == 'cpu'
  assert probe['matmul_f32_default_is'] == 'float32'  # the CPU has no TF32
  assert probe['versions']['jax']
  tests = jobs['tests_avs']['result']
  assert tests['passed'] > 0 and tests['failed'] == 0
  r = jobs['speed_resnet50_bfloat16']['result']
  assert r['dtype'] == 'bfloat16' and r['backbone'] == 'resnet_tiny'
  fill = r['fill']
  plans = {int(k): v for k, v in fill['plans_bytes'].items()}
  # One compile (as on the GPU): the batch is the line from (0, state and
  # code) through its plan, not compiled; at least the start batch, which
  # fits.
  assert list(plans) == [2] and plans[2] <= fill['limit_bytes']
  assert not fill['compiled'] and fill['per_device_batch'] >= 2
  assert r['global_batch'] == fill['per_device_batch']
  assert r['clips_per_s'] > 0
  assert r['flops_per_step'] > 0
  r = jobs['reference_resnet50_float32']['result']
  assert r['dtype'] == 'float32' and r['backbone'] == 'resnet_tiny'
  assert r['jax']['median_wall_s'] > 0  # no reference source in CI
  r = jobs['avsegformer_resnet50_bfloat16']['result']
  assert r['model'] == 'avsegformer' and r['channels'] == 32
  assert r['step_s'] > 0 and r['flops_per_step'] > 0
  assert 0 < r['first_step_metrics']['loss'] < 10
  log = (tmp_path / 'gpu_check.log').read_text()
  for name in jobs:
    assert f'===== {name}: ok' in log
  out = proc.stdout
  assert 'train step (MS3' in out and 'jobs not ok: none' in out
  assert 'float32 at XLA default precision: matmul rel err' in out


def test_turns_keep_timed_sections_apart(tmp_path):
  """Three processes take turns: each holds the lock for 1 s; their
  sections, stamped inside the lock, never overlap, and none starts
  before the go."""
  code = (
      'import sys, time; sys.path.insert(0, sys.argv[1]); import turns; '
      'turns.take_turn(sys.argv[2]); t = time.time(); time.sleep(1.0); '
      'print(t, time.time())'
  )
  bench = os.path.join(REPO, 'bench')
  procs = [
      subprocess.Popen(
          [sys.executable, '-c', code, bench, str(tmp_path / f'job{i}')],
          stdout=subprocess.PIPE,
          text=True,
      )
      for i in range(3)
  ]
  deadline = time.time() + 60
  while not all(os.path.exists(tmp_path / f'job{i}.ready') for i in range(3)):
    assert time.time() < deadline
    time.sleep(0.05)
  time.sleep(0.3)
  assert all(p.poll() is None for p in procs)  # waiting for the go
  go = time.time()
  (tmp_path / 'go').touch()
  outs = [p.communicate()[0].splitlines() for p in procs]
  assert all(o[0].startswith('turn job') for o in outs)  # said when it got it
  spans = sorted(tuple(map(float, o[-1].split())) for o in outs)
  assert spans[0][0] >= go - 0.01
  for (_, end), (start, _) in zip(spans, spans[1:]):
    assert start >= end - 1e-3


def test_junit_names_failures_with_their_message(tmp_path):
  (tmp_path / 'test_x.py').write_text(
      'def test_ok():\n  pass\n\n'
      'def test_bad():\n  assert 1 == 2, "golden logits differ"\n'
  )
  xml = tmp_path / 'out.xml'
  subprocess.run(
      [
          sys.executable,
          '-m',
          'pytest',
          '-q',
          '-p',
          'no:cacheprovider',
          f'--junitxml={xml}',
          str(tmp_path / 'test_x.py'),
      ],
      cwd=tmp_path,
      capture_output=True,
      check=False,
  )
  res = gpu_check.junit(str(xml))
  assert (res['passed'], res['failed']) == (1, 1)
  assert res['failures'][0]['test'].endswith('test_bad')
  assert 'golden logits differ' in res['failures'][0]['message']


@pytest.mark.parametrize(
    'err,name',
    [(3e-7, 'float32'), (4e-4, 'tf32'), (5e-3, 'bfloat16')],
)
def test_precision_classes(err, name):
  # float32 rounding ~1e-7; TF32's 10-bit mantissa ~5e-4; bf16's 7 ~4e-3.
  assert gpu_check.precision_class(err) == name


def test_unknown_job_is_one_clear_error():
  proc = run_check('--cpu', '--only', 'speed_resnet51', '--list')
  assert proc.returncode != 0
  assert 'unknown job(s)' in proc.stderr and 'speed_resnet50' in proc.stderr
