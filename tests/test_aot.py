"""`run.py --mode=compile` (`avs_jax.aot`): XLA:TPU compiles for a TPU slice.

libtpu is in requirements-test.txt; no TPU is needed. One tiny model
(resnet_tiny, 16 channels, 32x32, VGGish precomputed) compiled for a v5e-4
slice, train step only: it compiles; FSDP shards the train state over the
chips; a batch too large for v5e's 16 GiB is reported as not fitting. And
every bad input of the mode is one `error:` line.
"""

import importlib.metadata
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import procs
from avs_jax import aot
from avs_jax import runtime
from avs_jax import train
from avs_jax import xla_flags
from configs import synthetic

TOPOLOGY = 'v5e-4'


def tiny(fsdp):
  c = synthetic.get_config()
  c.model.channels = 16
  c.model.head_channels = 8
  c.model.tpavi_stages = ()
  c.loss.avm_weight = 0.0
  c.loss.avm_stages = ()
  c.data.image_size = 32
  c.train.fsdp = fsdp
  c.train.batch_size = c.eval.batch_size = 4
  return c


def unsharded_state_bytes(config):
  """The train state's bytes, whole (from its shapes, not from `aot`)."""
  model, _ = runtime.build(config)
  optimizer, _ = train.make_optimizer(config.train, 100)
  abstract = jax.eval_shape(
      lambda: runtime.new_state(
          runtime.init_variables(config, model), optimizer
      )
  )
  return sum(
      x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract)
  )


@pytest.fixture(scope='module')
def fsdp_target():
  sl = aot.parse_topology(TOPOLOGY)
  return aot.Target(tiny(fsdp=True), sl, aot.slice_devices(sl).devices)


def test_fsdp_train_step_compiles_and_shards_the_state(fsdp_target):
  """XLA:TPU compiles the FSDP train step for 4 v5e chips; each chip holds
  a share of the state (params + Adam), not all of it."""
  assert fsdp_target.sl.chips == 4
  assert fsdp_target.mesh.devices.size == 4
  assert 'TPU v5' in fsdp_target.mesh.devices.flat[0].device_kind
  r = fsdp_target.train(1)
  assert r['fits']
  assert r['cost']['flops'] > 0 and r['cost']['bytes'] > 0
  state = unsharded_state_bytes(tiny(fsdp=True))
  m = r['memory']
  # Arguments per chip: the state's share and the batch's (no audio
  # weights: VGGish precomputed). Replicated they hold the whole state, and
  # more (XLA:TPU pads small arrays to its tiles: 18.6 MB against 13.2 MB of
  # state, measured); FSDP shards the leaves of 2**14 elements or more.
  assert m['argument'] < state, (m['argument'], state)
  assert m['argument'] > state / 4
  assert m['alias'] > 0  # the donated state is updated in place
  assert 0 < m['total'] < aot.CHIPS['v5e'].hbm_bytes


def test_a_batch_too_large_does_not_fit():
  """64 clips per chip at 512x512 need more than v5e's 16 GiB: XLA:TPU
  refuses the train step, and the report says it does not fit."""
  c = tiny(fsdp=True)
  c.data.image_size = 512
  sl = aot.parse_topology(TOPOLOGY)
  r = aot.Target(c, sl, aot.slice_devices(sl).devices).train(64)
  assert not r['fits']
  if 'memory' in r:  # planned, over the chip's HBM
    assert r['memory']['total'] > aot.CHIPS['v5e'].hbm_bytes
  else:  # XLA:TPU refused it
    assert 'RESOURCE_EXHAUSTED' in r['compile_error'], r['compile_error']
    assert r['required_bytes'] > r['available_bytes'] > 15 * aot.GiB


def test_roofline():
  chip = aot.CHIPS['v5e']
  r = aot.roofline({'flops': 197e12, 'bytes': 819e9 / 2}, chip, 8)
  assert r['step_s'] == pytest.approx(1.0)
  assert r['bound'] == 'compute'
  assert r['clips_per_s_per_chip'] == pytest.approx(8.0)
  r = aot.roofline({'flops': 1e12, 'bytes': 819e9 * 2}, chip, 8)
  assert r['step_s'] == pytest.approx(2.0)
  assert r['bound'] == 'HBM bandwidth'


def test_topology_names():
  assert aot.parse_topology('v5e-8').shape == '2x4'
  assert aot.parse_topology('v5e:4x8').chips == 32
  assert aot.parse_topology('v5p-8').chips == 4  # v5p names count cores
  assert aot.parse_topology('v4:2x2x2').chips == 8
  assert aot.parse_topology('v5p-8').topology_args()['topology_name'] == (
      'v5:2x2x1'
  )


def test_multi_host_slice_devices():
  """v5e:4x8 is 32 chips on 8 hosts of 4 (Cloud TPU's v5litepod-32)."""
  devices = aot.slice_devices(aot.parse_topology('v5e:4x8')).devices
  assert len(devices) == 32
  assert len({d.process_index for d in devices}) == 8


def test_libtpu_problem_lines():
  pin = aot.libtpu_pin()
  assert pin == '==0.0.42.*'
  assert aot.libtpu_problem('0.0.42.1', pin, '0.10.2') is None
  missing = aot.libtpu_problem(None, pin, '0.10.2')
  assert missing.startswith('libtpu is not installed')
  assert "pip install 'libtpu==0.0.42.*'" in missing
  wrong = aot.libtpu_problem('0.0.17', pin, '0.10.2')
  assert 'libtpu 0.0.17 does not match jax 0.10.2' in wrong


def run_compile(tmp_path, *args, python=(), **env):
  p = subprocess.run(
      [sys.executable, *python, 'run.py', '--mode=compile', *args],
      cwd=procs.REPO,
      env=procs.env(str(tmp_path / 'cache'), **env),
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  return p.returncode, lines


def test_unknown_topology_is_one_line(tmp_path):
  rc, lines = run_compile(
      tmp_path, '--config=configs/synthetic.py', '--topology=v5x-8'
  )
  assert rc == 1
  assert lines == [
      "error: --topology='v5x-8': unknown TPU slice; use e.g. v5e-8, "
      'v5e:4x8, v5p-8 or v4:2x2x2 (v4-N, v5e-N, v5p-N, v6e-N)'
  ]


def test_batch_not_dividing_over_the_chips_is_one_line(tmp_path):
  rc, lines = run_compile(
      tmp_path,
      '--config=configs/synthetic.py',
      '--topology=v5e-8',
      '--config.train.batch_size=12',
  )
  assert rc == 1
  assert lines == [
      'error: train.batch_size=12 must be a positive multiple of the 8 '
      'devices (global batch); e.g. --config.train.batch_size=8'
  ]


def test_mismatched_libtpu_is_one_line(tmp_path):
  """A libtpu (its metadata) of another version first on the path."""
  fake = tmp_path / 'fake'
  (fake / 'libtpu').mkdir(parents=True)
  (fake / 'libtpu' / '__init__.py').write_text('')
  info = fake / 'libtpu-0.0.17.dist-info'
  info.mkdir()
  (info / 'METADATA').write_text(
      'Metadata-Version: 2.1\nName: libtpu\nVersion: 0.0.17\n'
  )
  rc, lines = run_compile(
      tmp_path,
      '--config=configs/synthetic.py',
      '--topology=v5e-8',
      PYTHONPATH=os.pathsep.join([str(fake), procs.REPO]),
  )
  assert rc == 1
  assert lines == [
      f'error: libtpu 0.0.17 does not match jax {jax.__version__} (it wants '
      "libtpu==0.0.42.*): pip install 'libtpu==0.0.42.*' (or -r "
      'requirements-tpu.txt)'
  ]


def test_missing_libtpu_is_one_line(tmp_path):
  """This venv's packages less libtpu (symlinks), without site-packages."""
  site = os.path.dirname(os.path.dirname(np.__file__))
  pkgs = tmp_path / 'site'
  pkgs.mkdir()
  for name in os.listdir(site):
    if not name.startswith('libtpu'):
      os.symlink(os.path.join(site, name), pkgs / name)
  assert importlib.metadata.version('libtpu')  # here it is installed
  rc, lines = run_compile(
      tmp_path,
      '--config=configs/synthetic.py',
      '--topology=v5e-8',
      python=('-S',),
      PYTHONPATH=os.pathsep.join([procs.REPO, str(pkgs)]),
  )
  assert rc == 1, lines
  assert lines == [
      'error: libtpu is not installed (--mode=compile needs it): pip '
      "install 'libtpu==0.0.42.*' (or -r requirements-tpu.txt)"
  ]


@pytest.mark.skipif(
    xla_flags.tpu_chips() > 0, reason='a TPU machine: libtpu is meant to run'
)
def test_installed_libtpu_is_quiet_without_a_tpu(tmp_path):
  """JAX started as run.py starts it prints nothing of libtpu's (without
  `set_xla_flags`, libtpu warns: 'could not determine TPU accelerator
  type', `libtpu_init_utils.cc`)."""
  env = procs.env(str(tmp_path / 'cache'))
  del env['JAX_PLATFORMS']
  code = (
      'from avs_jax.xla_flags import set_xla_flags; set_xla_flags(); '
      'import jax; print(jax.devices()[0].platform)'
  )
  p = subprocess.run(
      [sys.executable, '-c', code],
      cwd=procs.REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert p.returncode == 0, p.stderr
  assert p.stdout.strip() == 'cpu'
  assert 'TPU' not in p.stderr and 'libtpu' not in p.stderr, p.stderr
