"""bench/vs_reference.py without the reference: the JAX side, the weights
recipe it shares with the golden fixtures, the ratio, and bad input."""

import json
import mmap
import os
import subprocess
import sys

import numpy as np
import pytest

from golden_weights import rebuild_tensor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'bench'))
import vs_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

# A ResNet-style model small enough for a CI step.
TINY = (
    '--backbone',
    'resnet_tiny',
    '--image_size',
    '32',
    '--set',
    'model.channels=16',
    '--set',
    'model.head_channels=8',
)


def run_bench(*args, script='vs_reference.py'):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  return subprocess.run(
      [sys.executable, os.path.join(REPO, 'bench', script), *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )


@pytest.mark.parametrize(
    'key,shape',
    [
        ('resnet.conv1.weight', (8, 3, 7, 7)),
        ('resnet.bn1.running_var', (8,)),
        ('resnet.bn1.running_mean', (8,)),
        ('path1.resConfUnit1.conv1.bias', (4,)),
        ('encoder_backbone.norm1.weight', (6,)),
    ],
)
def test_weights_are_the_golden_recipe(key, shape):
  np.testing.assert_array_equal(
      vs_reference.golden_tensor(key, shape), rebuild_tensor(key, shape)
  )


def test_ratios_median():
  r, med = vs_reference.ratios([1.0, 2.0, 9.0], [2.0, 2.0, 3.0])
  assert r == [0.5, 1.0, 3.0] and med == 1.0


def test_jax_only_run(tmp_path):
  """No --reference: times the JAX step alone and writes its figures."""
  out = tmp_path / 'r.json'
  p = run_bench(
      *TINY,
      '--alternations',
      '2',
      '--cores',
      '1',
      '--json',
      str(out),
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'median step: jax' in p.stdout, p.stdout
  res = json.loads(out.read_text())
  assert res['backbone'] == 'resnet_tiny' and res['image_size'] == 32
  assert len(res['jax']['wall_s']) == 2
  assert all(t > 0 for t in res['jax']['wall_s'] + res['jax']['cpu_s'])
  assert np.isfinite(res['first_loss']['jax'])
  assert 'reference' not in res and len(res['cores']) == 1
  # What this process had in transparent huge pages after each step.
  huge = res['jax']['anon_huge_pages_mib']
  assert len(huge) == 2
  if os.path.exists('/proc/self/smaps_rollup'):
    assert all(isinstance(m, int) and m >= 0 for m in huge)
  # What the VM handed back to its host while waiting, where it counts it.
  reported = res['jax']['reported_to_host_before_mib']
  assert len(reported) == 2
  if os.path.exists(vs_reference.PAGE_REPORTING):
    assert all(isinstance(m, int) and m >= 0 for m in reported)
  else:
    assert reported == [None, None]


def test_reported_to_host_mib_reads_the_kib_counter(tmp_path):
  path = tmp_path / 'reported_kib'
  path.write_text('3147264\n')  # 3,073.5 MiB
  assert vs_reference.reported_to_host_mib(str(path)) == 3073
  path.write_text('')
  assert vs_reference.reported_to_host_mib(str(path)) is None
  assert vs_reference.reported_to_host_mib(str(tmp_path / 'none')) is None


def test_huge_pages_mib_sees_this_process_memory():
  """64 MiB mapped, advised for huge pages and touched show up in it (where
  the kernel gives transparent huge pages on request)."""
  if not os.path.exists('/proc/self/smaps_rollup'):
    assert vs_reference.huge_pages_mib() is None
    return
  before = vs_reference.huge_pages_mib()
  assert isinstance(before, int) and before >= 0
  thp = '/sys/kernel/mm/transparent_hugepage/enabled'
  if not hasattr(mmap, 'MADV_HUGEPAGE') or not os.path.exists(thp):
    return
  with open(thp) as f:
    if '[never]' in f.read():
      return
  m = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
  try:
    m.madvise(mmap.MADV_HUGEPAGE)
    for i in range(0, len(m), 4096):
      m[i] = 1
    assert vs_reference.huge_pages_mib() >= before + 2
  finally:
    m.close()


def test_bfloat16_jax_only_run(tmp_path):
  out = tmp_path / 'r.json'
  p = run_bench(
      *TINY,
      '--alternations',
      '1',
      '--cores',
      '1',
      '--dtype',
      'bfloat16',
      '--json',
      str(out),
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert '32x32, bfloat16, MS3' in p.stdout, p.stdout
  res = json.loads(out.read_text())
  assert res['dtype'] == 'bfloat16' and res['device'] == 'cpu'
  assert np.isfinite(res['first_loss']['jax'])


def test_cuda_needs_same_process_one_clear_error():
  p = run_bench('--device', 'cuda', '--alternations', '1')
  assert p.returncode != 0
  assert '--same_process' in p.stderr and 'Traceback' not in p.stderr


def test_bad_reference_path_is_one_clear_error(tmp_path):
  p = run_bench(
      '--backbone',
      'resnet50',
      '--reference',
      str(tmp_path),
      '--alternations',
      '1',
  )
  assert p.returncode != 0
  assert str(tmp_path) in p.stderr and 'avs_ms3' in p.stderr, p.stderr[-2000:]
  assert 'Traceback' not in p.stderr


def test_convolutions_parsed_from_hlo_and_timed_alone():
  """bench/convolutions.py reads a convolution's shapes, window and FLOPs
  from compiled HLO, and rebuilds the same convolution from them."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import convolutions  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 9, 7, 4)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)
  dn = ('NHWC', 'HWIO', 'NHWC')

  def f(x, k):
    a = jax.lax.conv_general_dilated(
        x, k, (1, 1), [(2, 2)] * 2, None, (2, 2), dn
    )
    b = jax.lax.conv_general_dilated(x, k, (2, 1), [(1, 1)] * 2, None, None, dn)
    return jnp.sum(a**2) + jnp.sum(b**2)  # the gradient needs both

  hlo = jax.jit(jax.grad(f, (0, 1))).lower(x, k).compile().as_text()
  convs = convolutions.parse_convolutions(hlo)
  forward = [c for c in convs if c['out'] in ((2, 9, 7, 5), (2, 5, 7, 5))]
  assert sorted(c['out'] for c in forward) == [(2, 5, 7, 5), (2, 9, 7, 5)]
  # Forward FLOPs: 2 * output elements * 3 * 3 * 4 inputs.
  for c in forward:
    assert c['gflop'] * 1e9 == pytest.approx(2 * np.prod(c['out']) * 36)
  dilated = [c for c in forward if c['out'] == (2, 9, 7, 5)][0]
  assert (
      dilated['rhs_dilation'] == [2, 2] and dilated['padding'] == [(2, 2)] * 2
  )
  # Every parsed convolution (the gradients' too) rebuilt with lax gives
  # its output shape, and the forward ones their values on ones.
  assert len(convs) >= 4
  for c in convs:
    out = convolutions.conv_fn(c)(jnp.ones(c['lhs']), jnp.ones(c['rhs']))
    assert out.shape == c['out']
  want = jax.lax.conv_general_dilated(
      jnp.ones(x.shape),
      jnp.ones(k.shape),
      (1, 1),
      [(2, 2)] * 2,
      None,
      (2, 2),
      dn,
  )
  got = convolutions.conv_fn(dilated)(jnp.ones(x.shape), jnp.ones(k.shape))
  np.testing.assert_allclose(got, want)
  assert convolutions.time_convolution(dilated, repeats=2) > 0


def test_convolutions_bench_runs(tmp_path):
  out = tmp_path / 'c.json'
  p = run_bench(
      *TINY,
      '--cores',
      '1',
      '--repeats',
      '1',
      '--json',
      str(out),
      script='convolutions.py',
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'convolutions (' in p.stdout and 'GFLOP/s' in p.stdout, p.stdout
  rows = json.loads(out.read_text())
  assert rows and all(r['seconds'] > 0 and r['gflop'] > 0 for r in rows)
  names = ' '.join(r['op_name'] for r in rows)
  assert 'transpose(' in names  # the backward's convolutions are there
