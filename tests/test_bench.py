"""Smoke test: bench/train_step.py runs in a CI-sized setting and prints its figures."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, 'bench', 'train_step.py')


TPAVI_TINY = (
    '--backbone',
    'pvt_v2_b0',
    '--image_size',
    '32',
    '--config.model.channels=16',
)


def run_bench(tmp_path, *args, model=TPAVI_TINY):
  out = tmp_path / 'bench.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(
      [
          sys.executable,
          BENCH,
          *model,
          '--frames',
          '2',
          '--steps',
          '1',
          '--warmup',
          '0',
          '--init',
          'host',
          '--json',
          str(out),
          *args,
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  with open(out) as f:
    return proc.stdout, json.load(f)


def test_train_and_eval_step_on_two_simulated_devices(tmp_path):
  stdout, res = run_bench(
      tmp_path, '--devices', '2', '--per_device_batch', '1', '--eval'
  )
  assert 'device: cpu x 2' in stdout
  assert '--xla_cpu_experimental_ynn_fusion_type=' in res['xla_flags']
  assert res['devices'] == 2 and res['global_batch'] == 2
  for name in ('train', 'eval'):
    line = re.search(
        rf'^{name} step: ([\d.]+) ms median \(([\d.]+) clips/s\)', stdout, re.M
    )
    assert line, stdout
    assert float(line.group(1)) > 0 and float(line.group(2)) > 0
  flops = re.findall(r'FLOPs/step ([\d.]+) GFLOP', stdout)
  assert len(flops) == 2 and all(float(f) > 0 for f in flops), stdout
  assert re.search(r'achieved [\d.]+ TFLOP/s', stdout)
  assert 'MFU n/a' in stdout  # CPU: no vendor peak
  assert re.search(r'process peak RSS [\d.]+ GiB', stdout)
  assert res['step_s'] > 0 and res['clips_per_s'] == pytest.approx(
      2 / res['step_s']
  )
  assert res['flops_per_step'] > res['eval_flops_per_step'] > 0
  assert res['train_memory']['temp_size_in_bytes'] > 0
  assert res['eval_clips_per_s'] > 0
  for k in ('loss', 'grad_norm'):
    assert res['first_step_metrics'][k] > 0


def test_peak_table():
  sys.path.insert(0, os.path.join(ROOT, 'bench'))
  try:
    import train_step  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  assert train_step.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.0
  assert train_step.peak_tflops('NVIDIA H100 PCIe', 'bfloat16') == 756.0
  assert train_step.peak_tflops('NVIDIA H200', 'bfloat16') == 989.0
  assert train_step.peak_tflops('NVIDIA A100-SXM4-80GB', 'bfloat16') == 312.0
  assert train_step.peak_tflops('TPU v5 lite', 'bfloat16') == 197.0
  assert train_step.peak_tflops('TPU v4', 'bfloat16') == 275.0
  assert train_step.peak_tflops('TPU v5p', 'bfloat16') == 459.0
  assert train_step.peak_tflops('cpu', 'float32') is None


def test_gpu_flop_count_includes_convolutions():
  """On GPUs the count comes from a CPU lowering of the unsharded function:
  it must see the convolutions (XLA:GPU's own count omits cuDNN's) and
  divide the whole batch's FLOPs over the devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, os.path.join(ROOT, 'bench'))
  try:
    import train_step  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)

  def fn(x, w):
    y = jax.lax.conv_general_dilated(
        x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    return jnp.sum(y * y)

  args = (jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 4)))
  compiled = jax.jit(fn).lower(*args).compile()
  conv = 2 * 2 * 16 * 16 * 4 * 3 * 3 * 8  # multiply-adds x 2 (XLA leaves
  # out the taps on the zero padding: ~7% fewer here)
  on_cpu = train_step.flops_of(compiled, fn, args, 1, platform='cpu')
  as_gpu = train_step.flops_of(compiled, fn, args, 1, platform='gpu')
  assert 0.85 * conv < as_gpu < 1.1 * conv
  assert abs(as_gpu - on_cpu) < 0.01 * conv
  assert train_step.flops_of(compiled, fn, args, 4, platform='gpu') == (
      as_gpu / 4
  )


def test_bf16_agreement_figures():
  sys.path.insert(0, ROOT)
  try:
    from bench import bf16_agreement  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  ref = {
      'loss': np.float32(2.0),
      'grads': [rng.standard_normal((3, 4)), rng.standard_normal(5)],
      'logits': rng.standard_normal((1, 5, 8, 8)),
  }
  same = bf16_agreement.compare(ref, ref)
  assert same['loss_rel_diff'] == 0 and same['grad_rel_l2'] == 0
  assert same['grad_cosine'] == pytest.approx(1.0)
  assert same['mask_pixels_agree'] == 1.0 and same['mask_iou'] == 1.0
  flipped = {
      'loss': np.float32(2.2),
      'grads': [-g for g in ref['grads']],
      'logits': -ref['logits'],
  }
  c = bf16_agreement.compare(flipped, ref)
  assert c['loss_rel_diff'] == pytest.approx(0.1)
  assert c['grad_rel_l2'] == pytest.approx(2.0)
  assert c['grad_cosine'] == pytest.approx(-1.0)
  assert c['logits_rel_l2'] == pytest.approx(2.0)
  assert c['mask_pixels_agree'] == 0.0 and c['mask_iou'] == 0.0
