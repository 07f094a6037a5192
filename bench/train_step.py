r"""Train- and eval-step throughput of the AVS model: time, clips/s, FLOPs, MFU.

  python bench/train_step.py --config=configs/s4.py --backbone=resnet50 \
      --image_size 224 --batch 1 --dtype float32 --steps 5
  python bench/train_step.py --backbone pvt_v2_b5 --dtype bfloat16 --batch 16
  python bench/train_step.py --devices 4 --per_device_batch 1 --image_size 64 \
      --backbone pvt_v2_b0 --config.model.channels=64  # simulated CPU devices

Times the real step: `avs_jax.train.train_step` jitted exactly as
`train_and_evaluate` does (state and data shardings over the 1-D `data` mesh,
state buffers donated), and with `--eval` the `avs_jax.evaluate.Evaluator`
step. Inputs are random clips of the config's shapes (frames `[B, T, H, W,
3]`, log-mel `[B, T, 96, 64]`, masks), put on the devices before the loop, so
the figures are the step alone, not the input pipeline (see
bench/input_pipeline.py for that). Each timed step is dispatched and waited
for with `block_until_ready`; the median over `--steps` after `--warmup`
steps is reported, and so is the pipelined rate (all steps dispatched back to
back, one wait at the end), which is what the training loop sees.

FLOPs are XLA's own count for the compiled step (`compiled.cost_analysis()`,
multiply-add = 2 FLOPs, per device); achieved TFLOP/s = FLOPs / step time;
MFU = achieved / the device's dense peak for the compute dtype when the
device kind is in `PEAK_TFLOPS` (on a CPU, `--cpu_gemm` measures a large
float32 GEMM as a practical ceiling instead). Memory: XLA's buffer plan
(`compiled.memory_analysis()`), `device.memory_stats()` peak when the backend
has it, and the process's peak RSS.

On XLA:CPU the script adds `avs_jax.xla_flags.CPU_XLA_FLAGS` (YNNPACK fusions off: about half
the CPU time of a ResNet-50 step) unless `--xla_defaults`; an XLA_FLAGS value
already set for the same flag wins. Use the same flags for CPU training.

`--devices N` simulates N CPU devices (sets XLA_FLAGS before JAX loads);
with `--per_device_batch` the global batch grows with N (weak scaling).
`--aot_tpu v5e:4x4` compiles the step for a TPU slice with XLA:TPU
(`avs_jax.aot`, as `run.py --mode=compile`; needs libtpu,
requirements-tpu.txt) at `--per_device_batch` clips per chip.
`--json FILE` writes every figure.
"""

import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# JAX itself is imported in `main`, after `--devices` has set XLA_FLAGS.
from avs_jax.xla_flags import set_xla_flags, use_huge_pages  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import turns  # pylint: disable=g-import-not-at-top,wrong-import-position

# Dense peak TFLOP/s per chip (vendor figures, no sparsity), by compute dtype.
# Matched against `device.device_kind` by substring, first match wins.
# float32 on GPUs is the TF32 tensor-core rate (XLA's default matmul precision
# on NVIDIA GPUs uses TF32); on TPUs float32 matmuls run as bf16 passes, so no
# float32 peak is listed.
PEAK_TFLOPS = (
    ('H100 PCIe', {'bfloat16': 756.0, 'float32': 378.0}),
    ('H100', {'bfloat16': 989.0, 'float32': 494.5}),  # SXM
    ('H200', {'bfloat16': 989.0, 'float32': 494.5}),
    ('A100', {'bfloat16': 312.0, 'float32': 156.0}),
    ('TPU v5 lite', {'bfloat16': 197.0}),  # v5e
    ('TPU v5e', {'bfloat16': 197.0}),
    ('TPU v5p', {'bfloat16': 459.0}),
    ('TPU v5', {'bfloat16': 459.0}),  # v5p reports 'TPU v5'
    ('TPU v4', {'bfloat16': 275.0}),
)


def peak_tflops(device_kind, dtype):
  for key, peaks in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return peaks.get(dtype)
  return None


# pylint: disable=line-too-long
config_flags.DEFINE_config_file(
    'config',
    os.path.join(ROOT, 'configs', 's4.py'),
    'Config file (`path:arg` passes arg to get_config); `--config.x.y=v` overrides.',
)
flags.DEFINE_string(
    'backbone',
    None,
    "resnet50 | pvt_v2_b0 ... pvt_v2_b5 (default: the config's)",
)
flags.DEFINE_integer('image_size', 224, 'Frame height and width.')
flags.DEFINE_integer('frames', 5, 'Frames per clip.')
flags.DEFINE_integer(
    'batch', None, 'Global batch in clips (default: config train.batch_size).'
)
flags.DEFINE_integer(
    'per_device_batch', None, 'Clips per device; global batch = this x devices.'
)
flags.DEFINE_enum(
    'dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype (train.dtype).'
)
flags.DEFINE_integer('steps', 5, 'Timed steps.')
flags.DEFINE_integer('warmup', 2, 'Untimed steps after the compile.')
flags.DEFINE_bool('remat', False, 'train.remat')
flags.DEFINE_bool('fsdp', False, 'train.fsdp')
flags.DEFINE_bool('eval', False, 'Also time the eval step on the same batch.')
flags.DEFINE_bool('eval_only', False, 'Time only the eval step.')
flags.DEFINE_integer(
    'devices', None, 'Simulate N CPU devices (XLA_FLAGS; CPU only).'
)
flags.DEFINE_bool(
    'xla_defaults',
    False,
    "Keep XLA:CPU's defaults (else CPU_XLA_FLAGS are added).",
)
flags.DEFINE_string(
    'scaling',
    None,
    'Scaling study, e.g. 1,2,4,8: one run per simulated device count with --per_device_batch fixed, and one per count with the global batch fixed (same-result check).',
)
flags.DEFINE_integer('seed', 0, 'Random batch seed.')
flags.DEFINE_enum(
    'init',
    'model',
    ['model', 'host'],
    "model: the model's own init (one more compile); host: numpy random weights of the same shapes (fast).",
)
flags.DEFINE_bool(
    'cpu_gemm', False, 'Measure a 2048^3 float32 GEMM as a CPU ceiling.'
)
flags.DEFINE_string(
    'aot_tpu',
    None,
    'XLA:TPU compile for a TPU slice, e.g. v5e:4x4 (avs_jax.aot).',
)
flags.DEFINE_string(
    'profile',
    None,
    'jax.profiler trace of 2 extra train steps (perfetto) into this dir.',
)
flags.DEFINE_bool(
    'aot_only', False, 'With --aot_tpu: stop after it (no local timing).'
)
flags.DEFINE_float(
    'fill',
    None,
    'Search the largest per-device batch whose XLA memory plan fits this fraction of the device memory limit (--batch/--per_device_batch is the start); at most --max_compiles compiles.',
)
flags.DEFINE_integer('max_compiles', 3, 'Compiles the --fill search may use.')
flags.DEFINE_float(
    'memory_gib',
    None,
    "Device memory limit for --fill where the backend reports none (CPU); default: the device's bytes_limit.",
)
flags.DEFINE_string(
    'turn',
    None,
    'DIR/NAME: compile, then wait for DIR/go and time holding DIR/lock (bench/turns.py; bench/gpu_check.py runs benches side by side).',
)
flags.DEFINE_string('json', None, 'Write every figure here.')
# pylint: enable=line-too-long
FLAGS = flags.FLAGS


def random_batch(rng, batch, frames, h, w, setting):
  """A host batch of the pipeline's keys, shapes and dtypes."""
  del setting  # S4 and MS3 batches have the same entries
  return {
      'frames': rng.standard_normal((batch, frames, h, w, 3), np.float32),
      'log_mel': rng.standard_normal((batch, frames, 96, 64), np.float32),
      'masks': (rng.random((batch, frames, h, w)) < 0.3).astype(np.float32),
      'valid': np.ones((batch,), bool),
  }


def host_state(abstract_state, seed):
  """Numpy weights of the abstract state's shapes: scales and variances 1,
  biases and means 0, kernels N(0, 1/fan_in); Adam moments 0."""
  import jax  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if x.ndim == 0:
      return np.zeros(x.shape, x.dtype)
    if (
        'opt_state' in name
        or name.endswith("['mean']")
        or name.endswith("['bias']")
    ):
      return np.zeros(x.shape, x.dtype)
    if name.endswith("['scale']") or name.endswith("['var']"):
      return np.ones(x.shape, x.dtype)
    fan_in = int(np.prod(x.shape[:-1])) or 1
    return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def flops_of(compiled, fn, args, ndev, platform=None):
  """FLOPs per device per step of the compiled `fn(*args)`.

  XLA's count of the compiled program, except on GPUs (`platform`, default
  the first device's): XLA:GPU's count leaves out the convolutions it hands
  to cuDNN (custom calls: a ResNet-50 train step at 224 counted 9 of 868
  GFLOP per clip on an H100) and its lowered program has no count, so there
  `fn` is lowered for the CPU, unsharded, and that count (the whole batch)
  is divided over the devices.
  """
  import jax  # pylint: disable=g-import-not-at-top  # loaded by then

  if (platform or jax.devices()[0].platform) == 'gpu':
    shapes = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args
    )
    lowered = jax.jit(fn).trace(*shapes).lower(lowering_platforms=('cpu',))
    return _flops(lowered.cost_analysis()) / ndev
  return _flops(compiled.cost_analysis())


def _flops(cost):
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0)) or None


def memory_of(compiled):
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if m is None:
    return {}
  out = {}
  for k in (
      'argument_size_in_bytes',
      'output_size_in_bytes',
      'alias_size_in_bytes',
      'temp_size_in_bytes',
      'generated_code_size_in_bytes',
  ):
    v = getattr(m, k, None)
    if v is not None:
      out[k] = int(v)
  if out:
    out['xla_peak_estimate_bytes'] = (
        out.get('argument_size_in_bytes', 0)
        + out.get('output_size_in_bytes', 0)
        - out.get('alias_size_in_bytes', 0)
        + out.get('temp_size_in_bytes', 0)
    )
  return out


def device_peak_bytes(devices):
  peaks = []
  for d in devices:
    try:
      s = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      s = None
    if s and 'peak_bytes_in_use' in s:
      peaks.append(int(s['peak_bytes_in_use']))
  return max(peaks) if peaks else None


def rss_peak_bytes():
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return r if sys.platform == 'darwin' else r * 1024


def time_steps(run_one, steps, warmup, sync):
  """Per-step times (each waited for) and the pipelined time per step."""
  for _ in range(warmup):
    sync(run_one())
  times = []
  cpu = time.process_time()
  for _ in range(steps):
    t = time.perf_counter()
    sync(run_one())
    times.append(time.perf_counter() - t)
  cpu = (time.process_time() - cpu) / steps
  t = time.perf_counter()
  out = None
  for _ in range(steps):
    out = run_one()
  sync(out)
  pipelined = (time.perf_counter() - t) / steps
  return times, pipelined, cpu


def cpu_gemm_tflops(jax, jnp, n=2048, reps=9):
  """float32 n^3 GEMM: (TFLOP/s wall, median; TFLOP per CPU-second)."""
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  ts = []
  cpu = time.process_time()
  for _ in range(reps):
    t = time.perf_counter()
    f(x).block_until_ready()
    ts.append(time.perf_counter() - t)
  cpu = (time.process_time() - cpu) / reps
  return 2 * n**3 / statistics.median(ts) / 1e12, 2 * n**3 / cpu / 1e12


def fmt_bytes(b):
  return 'n/a' if b is None else f'{b / 2**30:.2f} GiB'


def bench_config(ndev):
  """The config with the command line's settings; `(config, global batch)`."""
  config = FLAGS.config
  if FLAGS.backbone:  # configs that take no argument (synthetic.py) too
    config.model.backbone = FLAGS.backbone
  config.train.dtype = FLAGS.dtype
  config.train.remat = bool(FLAGS.remat or config.train.remat)
  config.train.fsdp = bool(FLAGS.fsdp or config.train.fsdp)
  config.data.image_size = FLAGS.image_size
  if FLAGS.per_device_batch:
    gbs = FLAGS.per_device_batch * ndev
  else:
    gbs = FLAGS.batch or config.train.batch_size
  if gbs % ndev:
    raise SystemExit(f'global batch {gbs} is not a multiple of {ndev} devices')
  config.train.batch_size = config.eval.batch_size = gbs
  return config, gbs


def describe(jax, config, gbs):
  """The run's settings (`res`), printed."""
  from avs_jax import runtime  # pylint: disable=g-import-not-at-top  # see main

  dev, ndev = jax.devices()[0], jax.device_count()
  c = config
  res = {
      'device_kind': dev.device_kind,
      'platform': dev.platform,
      'devices': ndev,
      'config': config_flags.get_config_filename(FLAGS['config']),
      'model': runtime.model_name(c),
      'backbone': c.model.backbone,
      'channels': c.model.get('channels', c.model.get('embed_dim')),
      'tpavi_mode': c.model.get('tpavi_mode'),
      'setting': c.data.setting,
      'image_size': FLAGS.image_size,
      'frames': FLAGS.frames,
      'global_batch': gbs,
      'per_device_batch': gbs // ndev,
      'dtype': FLAGS.dtype,
      'remat': c.train.remat,
      'fsdp': c.train.fsdp,
      'jax': jax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }
  print(
      f'device: {dev.device_kind} x {ndev} ({dev.platform}), jax '
      f'{jax.__version__}, XLA_FLAGS={res["xla_flags"]!r}'
  )
  print(
      f'config: {res["config"]} model={res["model"]} '
      f'backbone={c.model.backbone} channels={res["channels"]} '
      f'tpavi={res["tpavi_mode"]} '
      f'setting={c.data.setting} {FLAGS.image_size}x{FLAGS.image_size}x'
      f'{FLAGS.frames} frames, global batch {gbs} ({gbs // ndev}/device), '
      f'{FLAGS.dtype}, remat={c.train.remat}, fsdp={c.train.fsdp}, VGGish '
      f'{"precomputed" if c.audio.precompute else "in the step"}'
  )
  return res


def main(argv):
  del argv
  if FLAGS.scaling:
    scaling_study()
  else:
    bench()


def bench():
  """Times the steps per the flags; returns (and with --json writes) `res`."""
  set_xla_flags(FLAGS.devices, FLAGS.xla_defaults)
  # pylint: disable=g-import-not-at-top
  import jax  # after set_xla_flags: XLA reads the flags when it starts
  import jax.numpy as jnp
  from avs_jax import runtime
  from avs_jax import train
  # pylint: enable=g-import-not-at-top
  ndev = jax.device_count()
  if FLAGS.devices and ndev != FLAGS.devices:
    raise SystemExit(
        f'asked for {FLAGS.devices} devices, JAX has {ndev} '
        f'({jax.devices()[0].platform}); --devices simulates '
        'CPU devices only'
    )
  config, gbs = bench_config(ndev)
  res = describe(jax, config, gbs)
  if FLAGS.cpu_gemm:
    res['cpu_gemm_tflops'], res['cpu_gemm_tflop_per_cpu_s'] = cpu_gemm_tflops(
        jax, jnp
    )
    print(
        f'float32 2048^3 GEMM on this device: '
        f'{res["cpu_gemm_tflops"] * 1e3:.1f} GFLOP/s wall, '
        f'{res["cpu_gemm_tflop_per_cpu_s"] * 1e3:.1f} GFLOP per CPU-second '
        '(ceiling reference)'
    )

  if FLAGS.aot_tpu:
    res['aot_tpu'] = aot_tpu(
        FLAGS.aot_tpu,
        gbs // ndev,
        config,
        eval_step=FLAGS.eval or FLAGS.eval_only,
    )
    if FLAGS.aot_only:
      if FLAGS.json:
        with open(FLAGS.json, 'w') as f:
          json.dump(res, f, indent=2)
      return res

  # The step exactly as train_and_evaluate builds it.
  mesh = runtime.make_mesh()
  model, vggish = runtime.build(config, remat=config.train.remat)
  optimizer, _ = train.make_optimizer(
      config.train, total_steps=1000, model_name=runtime.model_name(config)
  )
  abstract_state, shardings = runtime.abstract_train_state(
      config, model, optimizer, mesh
  )
  res['params'] = sum(
      int(np.prod(x.shape))
      for x in jax.tree_util.tree_leaves(abstract_state.params)
  )
  res['state_bytes'] = sum(
      x.size * x.dtype.itemsize
      for x in jax.tree_util.tree_leaves(abstract_state)
  )
  print(
      f'model: {res["params"] / 1e6:.2f} M parameters; train state (params '
      f'+ Adam + BN stats) {res["state_bytes"] / 2**20:.0f} MiB float32'
  )
  step = functools.partial(
      train.train_step,
      model=model,
      vggish=vggish,
      optimizer=optimizer,
      config=config,
  )
  audio_vars = jax.jit(
      lambda: vggish.init(jax.random.key(12345), jnp.zeros((1, 96, 64))),
      out_shardings=runtime.replicated(mesh),
  )()
  step_fn = train.jit_train_step(  # as --mode=train jits it
      config, model, vggish, optimizer, mesh, shardings
  )
  if FLAGS.fill:
    gbs = fill_batch(
        jax, config, step_fn, abstract_state, shardings, mesh, audio_vars, res
    )
    config.train.batch_size = config.eval.batch_size = gbs

  if not (FLAGS.aot_tpu and FLAGS.aot_only):
    host = host_batch(config, gbs)
    train_ctx = eval_ctx = None
    if not FLAGS.eval_only:
      train_ctx = compile_train_step(
          jax,
          config,
          mesh,
          step,
          step_fn,
          abstract_state,
          shardings,
          host,
          audio_vars,
          res,
      )
    if FLAGS.eval or FLAGS.eval_only:
      eval_ctx = compile_eval_step(
          jax, config, mesh, model, vggish, train_ctx, host, audio_vars, res
      )
    turns.take_turn(FLAGS.turn)  # compiled: time alone (gpu_check)
    if train_ctx:
      time_train_step(jax, train_ctx, res)
    if eval_ctx:
      time_eval_step(jax, eval_ctx, train_ctx, res)
    res['device_peak_bytes'] = device_peak_bytes(jax.local_devices())
    res['rss_peak_bytes'] = rss_peak_bytes()
    print(
        f'memory: device peak {fmt_bytes(res["device_peak_bytes"])}, '
        f'process peak RSS {fmt_bytes(res["rss_peak_bytes"])}'
    )
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(res, f, indent=2)
  return res


def host_batch(config, gbs):
  """The step's host batch of `gbs` clips; `audio` embeddings `[B, T, 128]`
  in place of `log_mel` when VGGish runs once per clip outside the step."""
  host = random_batch(
      np.random.default_rng(FLAGS.seed),
      gbs,
      FLAGS.frames,
      FLAGS.image_size,
      FLAGS.image_size,
      config.data.setting,
  )
  if config.audio.precompute:
    host = {k: v for k, v in host.items() if k != 'log_mel'}
    host['audio'] = np.abs(
        np.random.default_rng(FLAGS.seed).standard_normal(
            (gbs, FLAGS.frames, 128), np.float32
        )
    )
  return host


def device_memory_limit(jax):
  """Bytes one device may allocate: `--memory_gib`, else its bytes_limit."""
  if FLAGS.memory_gib:
    return int(FLAGS.memory_gib * 2**30)
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'bytes_limit' not in stats:
    raise SystemExit(
        '--fill: this backend reports no memory limit; give --memory_gib'
    )
  return int(stats['bytes_limit'])


class LocalDevices:
  """`avs_jax.aot`'s compile target for this process's devices: `train(p)`
  compiles the benched step at `p` clips per device (on GPUs without
  autotuning: the plan, not the kernels, is wanted) and says whether XLA's
  plan fits `limit` bytes."""

  def __init__(self, jax, config, step_fn, state, audio_vars, mesh, limit):
    from avs_jax import runtime  # pylint: disable=g-import-not-at-top  # see main

    self.jax, self.config, self.step_fn = jax, config, step_fn
    self.state, self.audio_vars, self.limit = state, audio_vars, limit
    self.data = runtime.batch_sharding(mesh)
    self.sl = types.SimpleNamespace(
        chips=jax.device_count(),
        chip=types.SimpleNamespace(hbm_bytes=limit),
    )
    self.options = (
        {'xla_gpu_autotune_level': 0}
        if jax.devices()[0].platform == 'gpu'
        else None
    )

  def batch(self, per_device):
    return {
        k: self.jax.ShapeDtypeStruct(
            (per_device * self.sl.chips,) + v.shape[1:],
            v.dtype,
            sharding=self.data,
        )
        for k, v in host_batch(self.config, 1).items()
    }

  def train(self, per_device):
    from avs_jax import aot  # pylint: disable=g-import-not-at-top  # see main

    t0 = time.perf_counter()
    lowered = self.step_fn.lower(
        self.state, self.batch(per_device), self.audio_vars
    )
    mem = aot.memory(lowered.compile(self.options))
    print(
        f'fill: {per_device} clips/device -> plan {fmt_bytes(mem["total"])} '
        f'of {fmt_bytes(self.limit)} ({time.perf_counter() - t0:.0f} s '
        'compile)',
        flush=True,
    )
    return {
        'per_chip_batch': per_device,
        'memory': mem,
        'fits': mem['total'] <= self.limit,
    }


def fill_batch(
    jax, config, step_fn, abstract_state, shardings, mesh, audio_vars, res
):
  """Largest global batch whose memory plan fits `--fill` x the limit.

  The search of `run.py --mode=compile` (`aot.largest_batch`: lines through
  XLA's plans, at most `--max_compiles` compiles) on this process's
  devices; with one compile, `aot.linear_estimate` of the batch from the
  first plan (state and code fixed, the rest per clip), not compiled.
  """
  from avs_jax import aot  # pylint: disable=g-import-not-at-top  # see main

  limit = int(FLAGS.fill * device_memory_limit(jax))
  state = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_state,
      shardings,
  )
  target = LocalDevices(jax, config, step_fn, state, audio_vars, mesh, limit)
  p0 = FLAGS.per_device_batch or (FLAGS.batch or 8) // jax.device_count()
  first = target.train(max(p0, 1))
  best, _, tries = aot.largest_batch(target, first, FLAGS.max_compiles)
  compiled = True
  if FLAGS.max_compiles == 1 and first['fits']:
    best, compiled = aot.linear_estimate(target, first), False
  if not best:
    raise SystemExit(
        f'--fill: {first["per_chip_batch"]} clip(s) per device need '
        f'{fmt_bytes(first["memory"]["total"])} > {fmt_bytes(limit)}'
    )
  res['fill'] = {
      'compiled': compiled,
      'fraction': FLAGS.fill,
      'limit_bytes': limit,
      'plans_bytes': {
          str(t['per_chip_batch']): t['memory']['total'] for t in tries
      },
      'per_device_batch': best,
  }
  gbs = best * jax.device_count()
  res['global_batch'], res['per_device_batch'] = gbs, best
  print(
      f'fill: {best} clips/device (global batch {gbs}): '
      + ('the largest tried' if compiled else 'the estimate')
      + f' whose plan fits {FLAGS.fill:g} x {fmt_bytes(limit / FLAGS.fill)}',
      flush=True,
  )
  return gbs


def compile_train_step(
    jax,
    config,
    mesh,
    step,
    step_fn,
    abstract_state,
    shardings,
    host,
    audio_vars,
    res,
):
  """State and batch on the devices, the step compiled; fills `res`."""
  from avs_jax import runtime  # pylint: disable=g-import-not-at-top  # see main

  ndev = res['devices']
  batch = jax.block_until_ready(
      runtime.to_device(host, runtime.batch_sharding(mesh))
  )
  t0 = time.perf_counter()
  if FLAGS.init == 'model':
    state = runtime.initial_state(
        config, step.keywords['model'], step.keywords['optimizer'], shardings
    )
  else:
    state = runtime.place(host_state(abstract_state, FLAGS.seed), shardings)
  jax.block_until_ready(state)
  res['init_s'] = time.perf_counter() - t0
  print(f'state init ({FLAGS.init}): {res["init_s"]:.1f} s')

  t0 = time.perf_counter()
  lowered = step_fn.lower(state, batch, audio_vars)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  res['lower_s'], res['compile_s'] = t1 - t0, t2 - t1
  flops = flops_of(compiled, step, (state, batch, audio_vars), ndev)
  res['flops_per_step_per_device'] = flops
  res['flops_per_step'] = flops * ndev if flops else None
  res['train_memory'] = memory_of(compiled)
  print(
      f'train compile: lower {t1 - t0:.1f} s + compile {t2 - t1:.1f} s',
      flush=True,
  )
  return {
      'compiled': compiled,
      'state': state,
      'batch': batch,
      'audio_vars': audio_vars,
      'flops': flops,
  }


def time_train_step(jax, ctx, res):
  """Times the compiled train step; fills `res`; `ctx['state']` advances."""
  gbs, ndev = res['global_batch'], res['devices']
  compiled, batch, audio_vars = ctx['compiled'], ctx['batch'], ctx['audio_vars']
  first, last = {}, [None]

  def run_one():
    ctx['state'], m = compiled(ctx['state'], batch, audio_vars)
    if not first:
      first.update(jax.device_get(m))
    last[0] = m
    return m

  times, pipelined, cpu = time_steps(
      run_one, FLAGS.steps, FLAGS.warmup, jax.block_until_ready
  )
  step_s = statistics.median(times)
  res.update(
      step_times_s=times,
      step_s=step_s,
      pipelined_step_s=pipelined,
      cpu_s_per_step=cpu,
      clips_per_s=gbs / step_s,
      pipelined_clips_per_s=gbs / pipelined,
      first_step_metrics={k: float(v) for k, v in first.items()},
      last_step_metrics={
          k: float(v) for k, v in jax.device_get(last[0]).items()
      },
      steps_run=FLAGS.warmup + 2 * FLAGS.steps,
  )
  report(
      'train',
      res,
      ctx['flops'],
      step_s,
      pipelined,
      gbs,
      ndev,
      res['device_kind'],
      FLAGS.dtype,
      res['train_memory'],
      cpu,
  )
  print(
      f'  first step: loss {first["loss"]:.6f} grad_norm '
      f'{first["grad_norm"]:.6f}; step {res["steps_run"]}: loss '
      f'{res["last_step_metrics"]["loss"]:.6f}'
  )
  if FLAGS.profile:
    with jax.profiler.trace(FLAGS.profile, create_perfetto_trace=True):
      for _ in range(2):
        jax.block_until_ready(run_one())
    print(f'  profile of 2 steps: {FLAGS.profile}')


def compile_eval_step(
    jax, config, mesh, model, vggish, train_ctx, host, audio_vars, res
):
  """Compiles the evaluation step (`evaluate.eval_step`); fills `res`."""
  # pylint: disable=g-import-not-at-top  # see main
  from avs_jax import evaluate
  from avs_jax import runtime
  # pylint: enable=g-import-not-at-top
  ndev = res['devices']
  if train_ctx is not None:
    variables = train_ctx['state'].variables
  else:
    variables = jax.jit(
        lambda: runtime.init_variables(config, model),
        out_shardings=runtime.replicated(mesh),
    )()
  evaluator = evaluate.Evaluator(config, model, vggish, mesh, audio_vars)
  batch = runtime.to_device(
      {k: v for k, v in host.items() if k in runtime.DEVICE_KEYS},
      evaluator.sharding,
  )
  t0 = time.perf_counter()
  compiled = evaluator.step.jitted.lower(variables, audio_vars, batch).compile()
  res['eval_compile_s'] = time.perf_counter() - t0
  eflops = flops_of(
      compiled,
      evaluator.step.jitted.__wrapped__,  # the function, without shardings
      (variables, audio_vars, batch),
      ndev,
  )
  res['eval_flops_per_step'] = eflops * ndev if eflops else None
  res['eval_memory'] = memory_of(compiled)
  print(f'eval compile: {res["eval_compile_s"]:.1f} s', flush=True)
  return {
      'compiled': compiled,
      'variables': variables,
      'batch': batch,
      'audio_vars': audio_vars,
      'flops': eflops,
  }


def time_eval_step(jax, ctx, train_ctx, res):
  """Times the compiled eval step, on the trained variables if any."""
  gbs, ndev = res['global_batch'], res['devices']
  variables = train_ctx['state'].variables if train_ctx else ctx['variables']
  compiled, batch, audio_vars = ctx['compiled'], ctx['batch'], ctx['audio_vars']
  times, pipelined, cpu = time_steps(
      lambda: compiled(variables, audio_vars, batch),
      FLAGS.steps,
      FLAGS.warmup,
      jax.block_until_ready,
  )
  es = statistics.median(times)
  res.update(
      eval_step_times_s=times,
      eval_step_s=es,
      eval_cpu_s_per_step=cpu,
      eval_pipelined_step_s=pipelined,
      eval_clips_per_s=gbs / es,
      eval_pipelined_clips_per_s=gbs / pipelined,
  )
  report(
      'eval',
      res,
      ctx['flops'],
      es,
      pipelined,
      gbs,
      ndev,
      res['device_kind'],
      FLAGS.dtype,
      res['eval_memory'],
      cpu,
  )


def report(
    name, res, flops, step_s, pipelined, gbs, ndev, kind, dtype, mem, cpu_s
):
  """Prints one step's figures and stores the derived ones in `res`."""
  print(
      f'{name} step: {step_s * 1e3:.1f} ms median '
      f'({gbs / step_s:.3f} clips/s); pipelined {pipelined * 1e3:.1f} ms '
      f'({gbs / pipelined:.3f} clips/s); {cpu_s:.2f} CPU-s/step of this '
      f'process ({os.cpu_count()} cores)'
  )
  if flops:
    total = flops * ndev
    achieved = total / step_s / 1e12
    res[f'{name}_tflops_achieved'] = achieved
    line = (
        f'  FLOPs/step {total / 1e9:.1f} GFLOP (XLA cost analysis; '
        f'{flops / 1e9:.1f} per device, {total / gbs / 1e9:.1f} per clip); '
        f'achieved {achieved:.3f} TFLOP/s'
    )
    peak = peak_tflops(kind, dtype)
    if peak:
      mfu = achieved / (peak * ndev)
      res[f'{name}_mfu'] = mfu
      line += f'; MFU {100 * mfu:.1f}% of {peak:g} TFLOP/s/chip ({dtype})'
    elif res.get('cpu_gemm_tflops'):
      per_cpu_s = total / cpu_s / 1e12
      res[f'{name}_tflop_per_cpu_s'] = per_cpu_s
      frac = per_cpu_s / res['cpu_gemm_tflop_per_cpu_s']
      line += (
          f'; {per_cpu_s * 1e3:.1f} GFLOP per CPU-second = '
          f"{100 * frac:.0f}% of the GEMM's (no vendor peak for this "
          'device: no MFU)'
      )
    else:
      line += '; MFU n/a (no known peak for this device kind)'
    print(line)
  else:
    print('  FLOPs/step: n/a (no cost analysis from this backend)')
  if mem:
    print(
        f'  XLA buffers: arguments {fmt_bytes(mem.get("argument_size_in_bytes"))}'
        f', temporaries {fmt_bytes(mem.get("temp_size_in_bytes"))}, '
        f'peak estimate {fmt_bytes(mem.get("xla_peak_estimate_bytes"))} '
        '(per device)'
    )


def aot_tpu(topology, per_chip, config, eval_step=False, max_compiles=1):
  """`run.py --mode=compile` for the bench's config: the train step (and with
  `eval_step` the eval step) compiled by XLA:TPU for `topology` (e.g.
  'v5e:4x4') at `per_chip` clips per chip (`avs_jax.aot`); returns its report.
  Frames per clip are the input pipeline's (5; AVSS 10), not `--frames`."""
  from avs_jax import aot  # pylint: disable=g-import-not-at-top  # see main

  config = config.copy_and_resolve_references()
  gbs = per_chip * aot.parse_topology(topology).chips
  config.train.batch_size = config.eval.batch_size = gbs
  res = aot.compile_report(config, topology, max_compiles, eval_step)
  aot.print_report(res)
  return res


def scaling_study():
  """Runs this script per device count; prints weak scaling and same-result."""
  counts = [int(c) for c in FLAGS.scaling.split(',')]
  pdb = FLAGS.per_device_batch or 1
  fixed = pdb * max(counts)
  base, skip = [], False
  for a in sys.argv[1:]:
    if skip:
      skip = False
      continue
    name = a.split('=')[0]
    if name in (
        '--scaling',
        '--per_device_batch',
        '--batch',
        '--devices',
        '--json',
        '--eval',
        '--eval_only',
        '--profile',
        '--aot_tpu',
    ):
      skip = '=' not in a and name not in ('--eval', '--eval_only')
      continue
    base.append(a)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for mode in ('weak', 'fixed'):
      for n in counts:
        out = os.path.join(tmp, f'{mode}{n}.json')
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            *base,
            '--devices',
            str(n),
            '--json',
            out,
        ]
        cmd += (
            ['--per_device_batch', str(pdb)]
            if mode == 'weak'
            else ['--batch', str(fixed)]
        )
        print('$', ' '.join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
          print(proc.stdout[-3000:], proc.stderr[-3000:])
          raise SystemExit(f'scaling run failed ({n} devices, {mode})')
        with open(out) as f:
          rows.append((mode, n, json.load(f)))
  print(
      "\nscaling (simulated CPU devices; they share this machine's "
      f'{os.cpu_count()} cores)'
  )
  print(
      'mode   devices  global batch  per-device  step ms  clips/s  '
      'CPU-s/step  loss@1      grad_norm@1  loss@last'
  )
  for mode, n, r in rows:
    f, l = r['first_step_metrics'], r['last_step_metrics']
    print(
        f'{mode:6s} {n:7d}  {r["global_batch"]:12d}  '
        f'{r["per_device_batch"]:10d}  {r["step_s"] * 1e3:7.0f}  '
        f'{r["clips_per_s"]:7.3f}  {r["cpu_s_per_step"]:10.2f}  '
        f'{f["loss"]:.7f}  {f["grad_norm"]:11.6f}  {l["loss"]:.7f}'
    )
  fixed_rows = [r for mode, _, r in rows if mode == 'fixed']
  ref = fixed_rows[0]
  worst = max(
      abs(r[k]['loss'] / ref[k]['loss'] - 1)
      for r in fixed_rows
      for k in ('first_step_metrics', 'last_step_metrics')
  )
  worst_g = max(
      abs(
          r['first_step_metrics']['grad_norm']
          / ref['first_step_metrics']['grad_norm']
          - 1
      )
      for r in fixed_rows
  )
  print(
      f'same global batch ({fixed} clips) over {counts} devices: largest '
      f'relative difference to 1 device: loss {worst:.2e}, first-step '
      f'grad norm {worst_g:.2e}'
  )
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump([dict(r, mode=mode) for mode, _, r in rows], f, indent=2)
  return rows


if __name__ == '__main__':
  use_huge_pages()  # as run.py does (restarts once)
  app.run(main)
