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


RESTART = r"""
import os, sys
from avs_jax.xla_flags import use_huge_pages
print('start', os.getpid(), repr(os.environ.get('GLIBC_TUNABLES')), sys.argv[1:], flush=True)
use_huge_pages()
print('after', os.getpid(), repr(os.environ.get('GLIBC_TUNABLES')), sys.argv[1:])
"""

FAULTS = r"""
import resource
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x) * 2 + jnp.cos(x)[::-1]).sum())
x = jnp.ones((16 * 1024 * 1024,))  # 64 MiB temporaries
jax.block_until_ready(f(x))
a = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  jax.block_until_ready(f(x))
print('faults', resource.getrusage(resource.RUSAGE_SELF).ru_minflt - a)
"""


def thp_usable():
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      thp = f.read()
  except OSError:
    return False
  libc, version = platform.libc_ver()
  major_minor = tuple(int(v) for v in version.split('.')[:2]) if version else ()
  return (
      sys.platform == 'linux'
      and '[never]' not in thp
      and libc == 'glibc'
      and major_minor >= (2, 35)
  )


def run_script(tmp_path, script, *args, **env):
  base = procs.env(str(tmp_path / 'cache'))
  base.pop('GLIBC_TUNABLES', None)
  return subprocess.run(
      [sys.executable, '-c', script, *args],
      env=dict(base, **env),
      cwd=procs.REPO,
      capture_output=True,
      text=True,
      timeout=600,
      check=True,
  ).stdout.splitlines()


@pytest.mark.skipif(not thp_usable(), reason='needs Linux, glibc>=2.35, THP')
def test_use_huge_pages_restarts_once_with_the_same_arguments(tmp_path):
  lines = run_script(tmp_path, RESTART, 'a', '--b=1')
  pid = lines[0].split()[1]
  tunables = xla_flags.host_tunables()
  assert 'glibc.malloc.hugetlb=1' in tunables
  assert lines == [
      f"start {pid} None ['a', '--b=1']",
      f"start {pid} {tunables!r} ['a', '--b=1']",
      f"after {pid} {tunables!r} ['a', '--b=1']",
  ]


def test_host_tunables_arenas_follow_the_cores():
  assert xla_flags.host_tunables(1).endswith('arena_max=2')
  assert xla_flags.host_tunables(16).endswith('arena_max=16')
  assert 'glibc.malloc.mmap_max=0' in xla_flags.host_tunables(2)


def test_use_huge_pages_leaves_set_tunables_alone(tmp_path):
  lines = run_script(tmp_path, RESTART, 'x', GLIBC_TUNABLES='')
  pid = lines[0].split()[1]
  assert lines == [f"start {pid} '' ['x']", f"after {pid} '' ['x']"]


@pytest.mark.skipif(not thp_usable(), reason='needs Linux, glibc>=2.35, THP')
def test_huge_pages_cut_the_page_faults_of_xla_temporaries(tmp_path):
  """The reason for the tunables: XLA:CPU's temporaries are mapped afresh
  each call; with 4 KiB pages that is a fault per page (at least one 64 MiB
  temporary per call here: ~50,000 faults in 3 calls), with huge pages a
  few hundred."""
  faults = lambda **env: int(run_script(tmp_path, FAULTS, **env)[-1].split()[1])
  small = faults(GLIBC_TUNABLES='')
  huge = faults(GLIBC_TUNABLES='glibc.malloc.hugetlb=1')
  reuse = faults(GLIBC_TUNABLES=xla_flags.host_tunables(2))
  assert small > 3 * (64 << 20) // 4096 * 0.9, small
  assert huge < small / 20, (huge, small)
  # The full settings keep the huge pages. (What they add, reuse across
  # steps, shows in a ResNet-50 step: ~1,400 -> ~100-400 faults per step;
  # not in this small program: ~1,640 faults either way.)
  assert reuse < small / 20, (reuse, small)
