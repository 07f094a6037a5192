"""XLA flags for speed on the CPU; call before JAX initialises its backends.

XLA:CPU (jax 0.10) hands convolutions to YNNPACK unless told otherwise; its
weight-gradient convolutions run at ~25 GFLOP/s on the development machine
against ~130 for XLA's own (Eigen) ones, and a ResNet-50 train step takes
about twice the CPU time (docs/PERFORMANCE.md). An explicitly empty list of
YNN fusion types turns that off. Only XLA:CPU reads these flags, so they are
harmless on GPU and TPU. This module imports nothing from JAX.
"""

import os

CPU_XLA_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=',)


def set_xla_flags(devices=None, cpu_defaults=False):
  """Adds `CPU_XLA_FLAGS` (unless `cpu_defaults`) to XLA_FLAGS.

  A flag the user already set in XLA_FLAGS wins. `devices`: simulate that
  many CPU devices (and use the CPU platform).
  """
  flags = os.environ.get('XLA_FLAGS', '').split()
  if devices:
    flags = [
        f
        for f in flags
        if not f.startswith('--xla_force_host_platform_device_count')
    ]
    flags.append(f'--xla_force_host_platform_device_count={devices}')
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  if not cpu_defaults:
    for extra in CPU_XLA_FLAGS:
      if not any(f.split('=')[0] == extra.split('=')[0] for f in flags):
        flags.append(extra)
  if flags:
    os.environ['XLA_FLAGS'] = ' '.join(flags)
