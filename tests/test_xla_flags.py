"""avs_jax.xla_flags: what run.py sets before JAX starts, and why.

The instruction-set cap is checked on the demo model itself: its eval
forward must give the same bits with the project's flags as with AVX2 named
explicitly (what a host without AVX-512 compiles), and, on a host with
AVX-512, other bits without the cap (the machine dependence the cap
removes).
"""

import os
import platform
import subprocess
import sys

import pytest

import procs
from avs_jax import xla_flags

X86 = platform.machine().lower() in ('x86_64', 'amd64')

FORWARD = r"""
import hashlib, sys
from avs_jax.xla_flags import set_xla_flags
set_xla_flags()
import jax, numpy as np
from avs_jax import runtime
from configs import synthetic
c = synthetic.get_config()
model, _ = runtime.build(c)
v = runtime.init_variables(c, model)
r = np.random.RandomState(0)
f = r.standard_normal((1, 5, 64, 64, 3)).astype(np.float32)
a = r.standard_normal((1, 5, 128)).astype(np.float32)
y = jax.jit(lambda v, f, a: model.apply(v, f, a, train=False)['logits'])(v, f, a)
print('digest', hashlib.md5(np.asarray(y).tobytes()).hexdigest())
"""


def forward_digest(tmp_path, xla_flags_env):
  env = procs.env(str(tmp_path / 'cache'), XLA_FLAGS=xla_flags_env)
  out = subprocess.run(
      [sys.executable, '-c', FORWARD],
      env=env,
      cwd=procs.REPO,
      capture_output=True,
      text=True,
      timeout=600,
      check=True,
  ).stdout
  return [l.split()[1] for l in out.splitlines() if l.startswith('digest')][0]


def has_avx512():
  try:
    with open('/proc/cpuinfo') as f:
      return ' avx512f' in f.read()
  except OSError:
    return False


def test_user_flags_win_and_device_count(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_max_isa=AVX --foo=1')
  xla_flags.set_xla_flags(devices=4)
  flags = os.environ['XLA_FLAGS'].split()
  assert '--xla_cpu_max_isa=AVX' in flags and '--foo=1' in flags
  assert '--xla_cpu_max_isa=AVX2' not in flags
  assert '--xla_force_host_platform_device_count=4' in flags
  assert '--xla_cpu_experimental_ynn_fusion_type=' in flags
  monkeypatch.setenv('XLA_FLAGS', '')
  xla_flags.set_xla_flags(cpu_defaults=True)
  assert os.environ.get('XLA_FLAGS', '') == ''


@pytest.mark.skipif(not X86, reason='the cap is an x86-64 flag')
def test_instruction_set_cap_makes_the_model_host_independent(tmp_path):
  capped = forward_digest(tmp_path, '')  # set_xla_flags adds the cap
  assert capped == forward_digest(tmp_path, '--xla_cpu_max_isa=AVX2')
  if has_avx512():  # without the cap this host compiles other code
    native = forward_digest(tmp_path, '--xla_cpu_max_isa=AVX512')
    assert native != capped
