"""XLA flags (and host memory) for speed on the CPU; call before JAX starts.

XLA:CPU (jax 0.10) hands convolutions to YNNPACK unless told otherwise; its
weight-gradient convolutions run at ~25 GFLOP/s on the development machine
against ~130 for XLA's own (Eigen) ones, and a ResNet-50 train step takes
about twice the CPU time (docs/PERFORMANCE.md). An explicitly empty list of
YNN fusion types turns that off. Only XLA:CPU reads these flags, so they are
harmless on GPU and TPU. This module imports nothing from JAX.

On x86-64 the instruction set XLA:CPU generates code for is capped at AVX2.
Left alone, XLA targets the host's best (AVX-512 on the development
machine), and the vector width sets the float32 summation order of every
fused reduction: the demo's first train step already gives another loss
under AVX-512, AVX2 and AVX (3.00831127, 3.00831056, 3.00830984), and
2,100 steps later another test J. With the cap, every x86-64 machine with
AVX2 (all since 2013-2015) compiles the same code (tests/test_xla_flags.py).
Its cost on the demo's train step: 2-3% (median of 23 steps, 1.94 vs 2.01 s
and 1.34 vs 1.37 s in two alternated runs on a loaded 2-core AVX-512 host).
Set `--xla_cpu_max_isa=...` in XLA_FLAGS to choose another.

`set_xla_flags` also keeps an installed libtpu quiet on machines without a
TPU (`skip_absent_tpu`).
"""

import glob
import importlib.metadata
import importlib.util
import os
import platform
import sys

CPU_XLA_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=',)
if platform.machine().lower() in ('x86_64', 'amd64'):
  CPU_XLA_FLAGS += ('--xla_cpu_max_isa=AVX2',)


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
  skip_absent_tpu()


def tpu_chips():
  """TPU chips on this machine's PCI bus (Google's vendor id), as JAX counts."""
  n = 0
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(vendor) as f:
        n += f.read().strip() == '0x1ae0'
    except OSError:
      pass
  return n


def skip_absent_tpu():
  """With libtpu installed (for `--mode=compile`) on a machine without TPU
  chips and without a JAX GPU plugin, sets JAX_PLATFORMS=cpu.

  Otherwise JAX initialises every backend it knows at start, libtpu's too,
  which finds no TPU and prints its warnings ("could not determine TPU
  accelerator type", `libtpu_init_utils.cc`) before every run. A
  JAX_PLATFORMS already set wins; machines with TPUs or GPUs are left alone.
  """
  if (
      'JAX_PLATFORMS' in os.environ
      or importlib.util.find_spec('libtpu') is None
  ):
    return
  if tpu_chips():
    return
  gpu_plugins = [
      d.metadata['Name']
      for d in importlib.metadata.distributions()
      if (d.metadata['Name'] or '')
      .lower()
      .replace('_', '-')
      .startswith(('jax-cuda', 'jax-rocm'))
  ]
  if not gpu_plugins:
    os.environ['JAX_PLATFORMS'] = 'cpu'


def host_tunables(cores=None):
  """glibc malloc settings for XLA:CPU's per-step temporaries (see
  `use_huge_pages`); `cores`: default, the cores this process may use."""
  cores = cores or len(os.sched_getaffinity(0))
  return ':'.join(
      (
          'glibc.malloc.hugetlb=1',  # transparent huge pages
          'glibc.malloc.mmap_max=0',  # big blocks from the heap, not mmap
          f'glibc.malloc.trim_threshold={1 << 40}',  # never given back
          f'glibc.malloc.arena_max={max(2, cores)}',
      )
  )


def use_huge_pages():
  """Restarts this process with glibc's malloc tuned for XLA:CPU.

  XLA:CPU allocates a step's temporaries with `malloc` from its worker
  threads, and glibc maps such large blocks afresh each time and unmaps them
  after, so every step zero-fills them page by page: ~190,000 page faults
  (0.75 GB) per ResNet-50 train step at 160x160. `host_tunables()`:
  `glibc.malloc.hugetlb=1` (glibc >= 2.35) asks for transparent huge pages
  (~1,700 faults, step 3.57 -> 3.28 s on the development machine), and
  `mmap_max=0`, a trim threshold of 1 TiB and at most one arena per core
  make malloc keep and reuse the blocks instead (~100-400 faults). The
  last part matters when steps do not run back to back: after 5 s idle, a
  step that re-faults its temporaries pays ~25% more (the kernel zeroes
  fresh huge pages: 19% of the step's samples in `clear_page_erms`); with
  reuse it pays nothing (ResNet-50 at 160, 2 cores: 4.0-4.2 s after 5 s
  idle -> 3.3-3.5 s; back to back 3.2-3.4 s either way; measured with 2
  cores only, see docs/PERFORMANCE.md). The cost: freed host memory is not
  returned to the system while the process runs. glibc reads tunables only
  when a process starts, hence the restart (`execv`: same pid, same
  arguments), which must come before anything else. Does nothing if
  GLIBC_TUNABLES is set already (yours win; set it empty to opt out), off
  Linux, or where transparent huge pages are `never`.
  """
  if sys.platform != 'linux' or 'GLIBC_TUNABLES' in os.environ:
    return
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      if '[never]' in f.read():
        return
  except OSError:
    return
  os.environ['GLIBC_TUNABLES'] = host_tunables()
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])
