r"""The JAX train step against the official PyTorch one, alternated in one run.

  python bench/vs_reference.py --backbone resnet50 --image_size 160 \
      --reference=/work/ref/AVSBench/avs_scripts/avs_ms3
  python bench/vs_reference.py --backbone pvt_v2_b5 --image_size 224 \
      --reference=... --alternations 5 --json b5_224.json
  python bench/vs_reference.py --backbone resnet50   # JAX only: no reference

The two steps alternate on the same cores, one after the other, so that
other load on a shared machine hits both alike: JAX step, PyTorch step, JAX
step, ... Each step is waited for (`block_until_ready`, `loss.item()`). It
prints every step's wall and CPU time, the medians and the median of the
per-alternation ratios JAX / PyTorch (the figure that matters on a shared
CPU). The PyTorch step runs in a child process that waits on a pipe while
the JAX step runs (and the other way round), so neither runtime's thread
pools, allocator or caches are in the other's process, as in real use;
`--same_process` runs both in one process instead.

The step is the MS3 training step of both code bases, one batch of
`--batch` clips of 5 frames: the frozen VGGish on the log-mel examples, the
AVS model (TPAVI 'dot', audio-visual, stages 0-3) in training mode, BCE +
0.5 * AVM-AV (KL), backward, Adam. Both get the same deterministic weights
(the golden fixtures' recipe: every tensor from its state_dict key, see
`tests/golden_weights.py`), converted to JAX by `torch_weights`, and the
same inputs, so their first-step losses agree (printed).

`--reference` is the folder `avs_scripts/avs_ms3` of OpenNLPLab/AVSBench; its
imports need `timm` (0.4.12, the reference's era) and `easydict` on the
Python path (`--reference_path`), and torch. torchvision and resampy, which
the reference imports but this step never uses (ImageNet weights loading,
audio resampling), are stubbed if absent; its `.cuda()` calls are made
no-ops. Without `--reference` only the JAX step is timed.

On a GPU: `--device cuda --same_process` runs both steps on it (the
reference's `.cuda()` kept, `cudnn.benchmark` on, JAX's memory preallocation
off so that both fit); `--dtype bfloat16` gives JAX `train.dtype='bfloat16'`
and runs the reference under `torch.autocast(dtype=torch.bfloat16)`.

Threads: `--cores N` pins the process to its first N allowed cores before
JAX starts (XLA:CPU sizes its thread pool from them) and sets torch's
intra-op threads to N (inter-op 1).
"""

import argparse
import ast
import importlib.util
import json
import os
import resource
import statistics
import sys
import time
import types
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from avs_jax.xla_flags import set_xla_flags, use_huge_pages  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import turns  # pylint: disable=g-import-not-at-top,wrong-import-position

FRAMES = 5  # the reference's clip length (hard-coded there)


def add_step_args(p):
  """The benched step's flags: --config, --backbone, --image_size, --batch
  and --set (what `step_config` and `host_inputs` take)."""
  p.add_argument('--config', default='configs/ms3.py')
  p.add_argument('--backbone', default='resnet50')
  p.add_argument('--image_size', type=int, default=160)
  p.add_argument('--batch', type=int, default=1, help='clips per step')
  p.add_argument(
      '--set',
      action='append',
      default=[],
      metavar='KEY=VALUE',
      help='config override, e.g. model.channels=16',
  )


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument(
      '--reference',
      default='',
      help='avs_scripts/avs_ms3 of OpenNLPLab/AVSBench; empty: '
      'time the JAX step only',
  )
  p.add_argument(
      '--reference_path',
      default='',
      help='extra sys.path entries (os.pathsep-separated) with '
      'timm and easydict for the reference',
  )
  add_step_args(p)
  p.add_argument('--alternations', type=int, default=5)
  p.add_argument(
      '--warmup',
      type=int,
      default=1,
      help='untimed steps of each before the alternation',
  )
  p.add_argument(
      '--cores',
      type=int,
      default=2,
      help='pin to this many cores; torch threads = this',
  )
  p.add_argument(
      '--flush_denormal',
      action='store_true',
      help='torch.set_flush_denormal(True) for the reference '
      '(XLA:CPU flushes denormals; torch does not by default)',
  )
  p.add_argument(
      '--profile',
      default='',
      help='directory: a JAX trace of one step and the PyTorch '
      "profiler's op table of one step",
  )
  p.add_argument(
      '--same_process',
      action='store_true',
      help='run the reference in this process (default: a child '
      'process, alternated over a pipe)',
  )
  p.add_argument(
      '--reference_tunables',
      action='store_true',
      help="give the reference's child process this process's "
      'GLIBC_TUNABLES (run.py sets xla_flags.host_tunables()); default: the '
      'reference runs without them, as shipped',
  )
  p.add_argument(
      '--device',
      choices=('cpu', 'cuda'),
      default='cpu',
      help="cuda: both steps on the GPU (the reference's .cuda() kept, "
      'cudnn.benchmark on; run with --same_process)',
  )
  p.add_argument(
      '--dtype',
      choices=('float32', 'bfloat16'),
      default='float32',
      help='compute dtype: train.dtype for JAX, torch.autocast for the '
      'reference',
  )
  p.add_argument(
      '--turn',
      default='',
      help='DIR/NAME: after the compile, wait for DIR/go and time holding '
      'DIR/lock (bench/turns.py, as bench/gpu_check.py runs it)',
  )
  p.add_argument('--json', default='', help='write the figures here')
  return p.parse_args(argv)


def load_config(path, backbone, overrides):
  """`get_config(backbone)` of a config file, with `key=value` overrides."""
  if not os.path.isfile(path):
    raise SystemExit(f'--config={path}: no such file')
  spec = importlib.util.spec_from_file_location('bench_config', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(backbone)
  config.model.backbone = backbone
  for item in overrides:
    key, sep, raw = item.partition('=')
    if not sep:
      raise SystemExit(f'--set {item!r}: want KEY=VALUE')
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    try:
      config.update_from_flattened_dict({key: value})
    except (KeyError, TypeError) as e:
      raise SystemExit(f'--set {item!r}: {e}') from e
  return config


# ---------------------------------------------------------------------------
# Weights: the golden fixtures' recipe (tests/golden_weights.py), by key.


def golden_tensor(key, shape):
  """float32 tensor of `shape` for state_dict `key` (the fixtures' recipe)."""
  shape = tuple(int(s) for s in shape)
  rng = np.random.default_rng(zlib.crc32(key.encode('utf-8')))
  n = rng.standard_normal(shape)
  leaf = key.rsplit('.', 1)[-1]
  if leaf == 'running_var':
    t = 1 + 0.1 * np.abs(n)
  elif leaf == 'running_mean':
    t = 0.1 * n
  elif leaf == 'bias':
    t = 0.02 * n
  elif len(shape) == 1:
    t = 1 + 0.1 * n
  else:
    t = n * np.sqrt(1.0 / np.prod(shape[1:]))
  return t.astype(np.float32)


def golden_state_dict(shapes):
  return {
      k: golden_tensor(k, s)
      for k, s in shapes.items()
      if not k.endswith('num_batches_tracked')
  }


def step_config(path, backbone, overrides, image_size, dtype='float32'):
  """`load_config` set up for the benched step: `image_size` frames,
  `dtype` compute, the frozen VGGish in the step (not precomputed)."""
  config = load_config(path, backbone, overrides)
  config.data.image_size = image_size
  config.train.dtype = dtype
  config.audio.precompute = False
  return config


def host_inputs(seed, batch, h, w):
  """Frames `[B, T, H, W, 3]`, log-mel `[B, T, 96, 64]`, masks `[B, T, H, W]`."""
  rng = np.random.default_rng(seed)
  return {
      'frames': rng.standard_normal((batch, FRAMES, h, w, 3), np.float32),
      'log_mel': rng.standard_normal((batch, FRAMES, 96, 64), np.float32),
      'masks': (rng.random((batch, FRAMES, h, w)) < 0.3).astype(np.float32),
      'valid': np.ones((batch,), bool),
  }


def ratios(jax_times, ref_times):
  """Per-alternation JAX / reference ratios and their median."""
  r = [a / b for a, b in zip(jax_times, ref_times)]
  return r, (statistics.median(r) if r else None)


# ---------------------------------------------------------------------------
# The reference (PyTorch).


class _Stub(types.ModuleType):
  """A module whose every attribute is another stub (import-time only)."""

  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)
    m = _Stub(f'{self.__name__}.{name}')
    sys.modules[m.__name__] = m
    setattr(self, name, m)
    return m


def import_reference(path, extra_path, device='cpu'):
  """The reference's modules: (torch, model modules, loss, vggish, cfg)."""
  if not os.path.isfile(os.path.join(path, 'model', 'PVT_AVSModel.py')):
    raise SystemExit(
        f'--reference={path}: no model/PVT_AVSModel.py there '
        '(want the folder avs_scripts/avs_ms3 of AVSBench)'
    )
  for p in reversed([p for p in extra_path.split(os.pathsep) if p]):
    sys.path.insert(0, p)
  import torch  # pylint: disable=g-import-not-at-top

  for name, subs in (
      (
          'torchvision',
          ('models', 'transforms', 'transforms.functional', 'ops', 'ops.misc'),
      ),
      ('resampy', ()),
      ('soundfile', ()),  # torchvggish's wav reader: not on the step's path
  ):
    try:
      __import__(name)
    except (ImportError, OSError, RuntimeError):
      for n in (name,) + tuple(f'{name}.{s}' for s in subs):
        sys.modules[n] = _Stub(n)
  if device == 'cpu':
    torch.Tensor.cuda = lambda self, *a, **k: self  # the reference's .cuda()
    torch.nn.Module.cuda = lambda self, *a, **k: self
  sys.path.insert(0, path)
  try:
    from config import cfg  # pylint: disable=g-import-not-at-top
    from model import PVT_AVSModel, ResNet_AVSModel  # pylint: disable=g-import-not-at-top
    import loss as ref_loss  # pylint: disable=g-import-not-at-top
    from torchvggish import vggish  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(
        f'--reference={path}: importing it failed ({e}); put '
        'timm==0.4.12 and easydict on --reference_path'
    ) from e
  finally:
    sys.path.remove(path)
  return (
      torch,
      {'resnet50': ResNet_AVSModel, 'pvt_v2_b5': PVT_AVSModel},
      ref_loss,
      vggish,
      cfg,
  )


class Reference:
  """The reference's MS3 train step (CPU or GPU), golden weights."""

  def __init__(self, args, config, host):
    torch, models, ref_loss, vggish, cfg = import_reference(
        args.reference, args.reference_path, args.device
    )
    if config.model.backbone not in models:
      raise SystemExit(
          f'the reference has no backbone '
          f'{config.model.backbone!r} (resnet50, pvt_v2_b5)'
      )
    torch.set_num_threads(args.cores)
    try:
      torch.set_num_interop_threads(1)
    except RuntimeError:
      pass
    self.torch = torch
    if args.flush_denormal:
      torch.set_flush_denormal(True)
    mod = models[config.model.backbone]
    # ImageNet weights are not loaded: the golden weights replace them.
    mod.Pred_endecoder.initialize_weights = lambda self: None
    mod.Pred_endecoder.initialize_pvt_weights = lambda self: None
    mc = config.model
    self.model = mod.Pred_endecoder(
        channel=mc.channels,
        config=cfg,
        tpavi_stages=list(mc.tpavi_stages),
        tpavi_vv_flag=mc.tpavi_vv,
        tpavi_va_flag=mc.tpavi_va,
    )
    shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
    self.state_dict = golden_state_dict(shapes)
    self.model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in self.state_dict.items()},
        strict=False,
    )
    self.model.train()
    cfg.TRAIN.FREEZE_AUDIO_EXTRACTOR = False  # no AudioSet file: golden weights
    cfg.TRAIN.POSTPROCESS_LOG_MEL_WITH_PCA = False
    self.vggish = vggish.VGGish(cfg, torch.device('cpu'))
    vshapes = {k: tuple(v.shape) for k, v in self.vggish.state_dict().items()}
    self.vggish_state_dict = golden_state_dict(vshapes)
    self.vggish.load_state_dict(
        {k: torch.from_numpy(v) for k, v in self.vggish_state_dict.items()}
    )
    self.vggish.eval()
    dev = torch.device(args.device)
    self.model.to(dev)
    self.vggish.to(dev)
    torch.backends.cudnn.benchmark = args.device == 'cuda'
    self.autocast = lambda: torch.autocast(
        args.device,
        dtype=torch.bfloat16,
        enabled=args.dtype == 'bfloat16',
    )
    self.optimizer = torch.optim.Adam(self.model.parameters(), config.train.lr)
    lc = config.loss
    self.loss_kw = dict(
        sa_loss_flag=lc.avm_weight > 0,
        lambda_1=lc.avm_weight,
        count_stages=list(lc.avm_stages),
        mask_pooling_type=lc.avm_pooling,
        threshold=lc.avm_threshold,
        norm_fea=lc.avm_norm,
        closer_flag=lc.avm_closer,
        euclidean_flag=lc.avm_loss == 'euclidean',
        kl_flag=lc.avm_loss == 'kl',
    )
    self.loss_fn = ref_loss.IouSemanticAwareLoss
    b, t, h, w, _ = host['frames'].shape
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(dev)
    self.frames = nchw(
        host['frames'].reshape(b * t, h, w, 3).transpose(0, 3, 1, 2)
    )
    self.log_mel = nchw(host['log_mel'].reshape(b * t, 1, 96, 64))
    self.masks = nchw(host['masks'].reshape(b * t, 1, h, w))

  def step(self):
    torch = self.torch
    with torch.no_grad(), self.autocast():
      audio = self.vggish(self.log_mel)
    with self.autocast():
      out, v_maps, a_feas = self.model(self.frames, audio)
      loss, _ = self.loss_fn(out, self.masks, a_feas, v_maps, **self.loss_kw)
    self.optimizer.zero_grad()
    loss.backward()
    self.optimizer.step()
    return loss.item()

  def timed_step(self):
    return timed(self.step)

  def close(self):
    pass

  def profile(self, out_dir):
    from torch.profiler import profile, ProfilerActivity  # pylint: disable=g-import-not-at-top

    with profile(activities=[ProfilerActivity.CPU]) as prof:
      self.step()
    table = prof.key_averages().table(
        sort_by='self_cpu_time_total', row_limit=40
    )
    path = os.path.join(out_dir, 'torch_ops.txt')
    with open(path, 'w') as f:
      f.write(table)
    print(f'PyTorch profiler table of one step: {path}')
    print('\n'.join(table.splitlines()[:25]))


# ---------------------------------------------------------------------------
# The JAX step.


class JaxStep:
  """`avs_jax.train.train_step` jitted as training does (state donated)."""

  def __init__(self, config, host, reference_weights=None):
    # pylint: disable=g-import-not-at-top
    import functools
    import jax
    import jax.numpy as jnp
    from avs_jax import train
    from avs_jax.models import build_model, build_vggish

    try:
      from avs_jax import runtime

      state_cls = runtime.TrainState
    except ImportError:
      runtime, state_cls = None, train.TrainState
    try:
      from avs_jax import torch_weights as tw
    except ImportError:
      from avs_jax import convert as tw
    # pylint: enable=g-import-not-at-top
    self.jax = jax
    model = build_model(config.model)
    vggish = build_vggish(postprocess=False)
    optimizer, _ = train.make_optimizer(config.train, total_steps=1000)
    h = w = config.data.image_size
    if reference_weights is not None:
      sd, vsd = reference_weights
      variables = tw.torch_to_flax(sd, config.model)
      audio_vars = tw.vggish_torch_to_flax(vsd)
    else:
      variables = jax.jit(
          lambda: model.init(
              jax.random.key(config.seed),
              jnp.zeros((1, 1, h, w, 3)),
              jnp.zeros((1, 1, 128)),
          )
      )()
      audio_vars = vggish.init(jax.random.key(12345), jnp.zeros((1, 96, 64)))
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    self.audio_vars = jax.tree_util.tree_map(jnp.asarray, audio_vars)
    self.state = state_cls(
        step=jnp.zeros((), jnp.int32),
        params=variables['params'],
        batch_stats=variables['batch_stats'],
        opt_state=optimizer.init(variables['params']),
    )
    self.batch = {k: jnp.asarray(v) for k, v in host.items()}
    step = functools.partial(
        train.train_step,
        model=model,
        vggish=vggish,
        optimizer=optimizer,
        config=config,
    )
    t0 = time.perf_counter()
    self.fn = (
        jax.jit(step, donate_argnums=(0,))
        .lower(self.state, self.batch, self.audio_vars)
        .compile()
    )
    self.compile_s = time.perf_counter() - t0
    del runtime

  def step(self):
    self.state, metrics = self.fn(self.state, self.batch, self.audio_vars)
    return float(self.jax.block_until_ready(metrics['loss']))

  def profile(self, out_dir):
    path = os.path.join(out_dir, 'jax_trace')
    with self.jax.profiler.trace(path):
      self.step()
    print(f'JAX trace of one step (Perfetto / TensorBoard): {path}')


def huge_pages_mib():
  """This process's anonymous memory in transparent huge pages, MiB (from
  /proc/self/smaps_rollup; None where there is none)."""
  try:
    with open('/proc/self/smaps_rollup') as f:
      for line in f:
        if line.startswith('AnonHugePages:'):
          return int(line.split()[1]) // 1024
  except OSError:
    pass
  return None


# Where the guest kernel counts the free memory it handed back to the VM's
# host (virtio-balloon free page reporting); absent on most machines.
PAGE_REPORTING = '/sys/module/page_reporting/parameters/reported_kib'


def reported_to_host_mib(path=PAGE_REPORTING):
  """KiB counter of free page reporting, in MiB (None where there is none).

  The host discards reported pages; memory the step maps again after
  that is faulted in on the host too, which the guest sees as slow CPU
  time. Machine-wide, so only differences over a quiet stretch mean much.
  """
  try:
    with open(path) as f:
      return int(f.read()) // 1024
  except (OSError, ValueError):
    return None


def timed(fn):
  """(wall s, CPU s, loss, minor page faults, `huge_pages_mib()` after) of
  `fn()` in this process."""
  f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  t, c = time.perf_counter(), time.process_time()
  loss = fn()
  wall, cpu = time.perf_counter() - t, time.process_time() - c
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f
  return wall, cpu, loss, faults, huge_pages_mib()


def _reference_worker(conn, args, config, host):
  """Child process: builds the reference, then runs commands from `conn`."""
  try:
    ref = Reference(args, config, host)
  except BaseException as e:  # pylint: disable=broad-except
    conn.send(('error', str(e) or repr(e)))
    return
  shapes = lambda sd: {k: v.shape for k, v in sd.items()}
  conn.send(('ready', shapes(ref.state_dict), shapes(ref.vggish_state_dict)))
  while True:
    cmd, arg = conn.recv()
    if cmd == 'step':
      conn.send(timed(ref.step))
    elif cmd == 'profile':
      ref.profile(arg)
      conn.send(None)
    else:
      return


class ReferenceProcess:
  """The reference's step in a child process; `step()` blocks until done.

  The child gets the same arguments, config and inputs; the JAX side
  rebuilds the same golden weights from the shapes it reports.
  """

  def __init__(self, args, config, host):
    # pylint: disable=g-import-not-at-top
    import multiprocessing as mp
    # pylint: enable=g-import-not-at-top
    ctx = mp.get_context('spawn')  # no JAX or XLA threads forked
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(
        target=_reference_worker, args=(child, args, config, host), daemon=True
    )
    tunables = os.environ.get('GLIBC_TUNABLES')
    if tunables is not None and not args.reference_tunables:
      del os.environ['GLIBC_TUNABLES']  # the child inherits os.environ
    try:
      self.proc.start()
    finally:
      if tunables is not None:
        os.environ['GLIBC_TUNABLES'] = tunables
    msg = self.conn.recv()
    if msg[0] == 'error':
      self.proc.join()
      raise SystemExit(msg[1])
    self.state_dict = golden_state_dict(msg[1])
    self.vggish_state_dict = golden_state_dict(msg[2])

  def timed_step(self):
    """`timed(step)` of one step, measured in the child."""
    self.conn.send(('step', None))
    return self.conn.recv()

  def step(self):
    return self.timed_step()[2]

  def profile(self, out_dir):
    self.conn.send(('profile', out_dir))
    self.conn.recv()

  def close(self):
    self.conn.send(('exit', None))
    self.proc.join(timeout=60)


def main(argv=None):
  args = parse_args(argv)
  cores = sorted(os.sched_getaffinity(0))[: args.cores]
  os.sched_setaffinity(0, cores)  # before JAX and torch start their threads
  if args.device == 'cuda':
    if not args.same_process:
      raise SystemExit(
          '--device cuda: add --same_process (one GPU, one process)'
      )
    # JAX would take 75% of the GPU's memory at start and the reference's
    # step then runs out of memory (seen on an H100 at batch 16).
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  set_xla_flags()
  # pylint: disable=g-import-not-at-top
  import jax
  # pylint: enable=g-import-not-at-top
  config = step_config(
      args.config, args.backbone, args.set, args.image_size, args.dtype
  )
  if config.data.setting != 'ms3':
    raise SystemExit(f'{args.config}: the reference step timed here is MS3')
  host = host_inputs(0, args.batch, args.image_size, args.image_size)
  print(
      f'cores {cores}; torch threads {args.cores} (flush denormals: '
      f'{args.flush_denormal}); jax {jax.__version__} '
      f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} "
      f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"
  )
  print(
      f'step: {config.model.backbone}, {args.batch} clip(s) x {FRAMES} '
      f'frames at {args.image_size}x{args.image_size}, {args.dtype}, MS3 '
      f'(BCE + {config.loss.avm_weight} AVM-{config.loss.avm_loss}), Adam '
      f'lr {config.train.lr}, VGGish in the step'
  )
  if args.reference:
    where = 'in this process' if args.same_process else 'in a child process'
    if not args.same_process:
      where += ', GLIBC_TUNABLES ' + (
          'as here' if args.reference_tunables else 'unset'
      )
    print('reference step: ' + where)

  ref = None
  if args.reference:
    ref = (Reference if args.same_process else ReferenceProcess)(
        args, config, host
    )
  weights = (ref.state_dict, ref.vggish_state_dict) if ref else None
  js = JaxStep(config, host, weights)
  print(f'JAX compile: {js.compile_s:.1f} s')
  if args.profile:
    os.makedirs(args.profile, exist_ok=True)
  turns.take_turn(args.turn)

  first = {}
  last = reported_to_host_mib()  # after each JAX step
  for _ in range(args.warmup):
    first.setdefault('jax', js.step())
    last = reported_to_host_mib()
    if ref:
      first.setdefault('reference', ref.step())
  if first:
    print(
        'first-step loss: '
        + ', '.join(f'{k} {v:.6f}' for k, v in first.items())
    )
  rows = {'jax': [], 'reference': []}
  reported = []
  for i in range(args.alternations):
    now = reported_to_host_mib()
    reported.append(None if now is None else now - last)
    rows['jax'].append(timed(js.step))
    last = reported_to_host_mib()
    if ref:
      rows['reference'].append(ref.timed_step())
    line = (
        f'alternation {i + 1}: jax {rows["jax"][-1][0]:.2f} s '
        f'({rows["jax"][-1][1]:.2f} CPU-s, {rows["jax"][-1][3]} faults, '
        f'{rows["jax"][-1][4]} MiB in huge pages'
    )
    if reported[-1] is not None:
      line += f'; {reported[-1]} MiB reported free to the VM host before it'
    line += ')'
    if ref:
      line += (
          f', reference {rows["reference"][-1][0]:.2f} s '
          f'({rows["reference"][-1][1]:.2f} CPU-s, '
          f'{rows["reference"][-1][3]} faults, '
          f'{rows["reference"][-1][4]} MiB in huge pages), ratio '
          f'{rows["jax"][-1][0] / rows["reference"][-1][0]:.2f}'
      )
    print(line, flush=True)
  if args.profile:
    js.profile(args.profile)
    if ref:
      ref.profile(args.profile)

  if ref:
    ref.close()

  res = {
      'backbone': config.model.backbone,
      'reference_process': 'same' if args.same_process else 'child',
      'device': args.device,
      'jax_device': jax.devices()[0].device_kind,
      'dtype': args.dtype,
      'image_size': args.image_size,
      'batch': args.batch,
      'frames': FRAMES,
      'cores': cores,
      'torch_flush_denormal': args.flush_denormal,
      'jax': jax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
      'reference_glibc_tunables': (
          os.environ.get('GLIBC_TUNABLES', '')
          if args.same_process or args.reference_tunables
          else ''
      ),
      'compile_s': js.compile_s,
      'first_loss': first,
      'load_avg': os.getloadavg(),
  }
  for k, rs in rows.items():
    if rs:
      res[k] = {
          'wall_s': [r[0] for r in rs],
          'cpu_s': [r[1] for r in rs],
          'median_wall_s': statistics.median(r[0] for r in rs),
          'median_cpu_s': statistics.median(r[1] for r in rs),
          'minor_page_faults': [r[3] for r in rs],
          'anon_huge_pages_mib': [r[4] for r in rs],
      }
  res['jax']['reported_to_host_before_mib'] = reported
  summary = f'median step: jax {res["jax"]["median_wall_s"]:.2f} s'
  if ref:
    res['ratios'], res['median_ratio'] = ratios(
        res['jax']['wall_s'], res['reference']['wall_s']
    )
    _, res['median_cpu_ratio'] = ratios(
        res['jax']['cpu_s'], res['reference']['cpu_s']
    )
    summary += (
        f', reference {res["reference"]["median_wall_s"]:.2f} s; '
        f'ratio jax/reference: median {res["median_ratio"]:.2f} '
        f'(wall), {res["median_cpu_ratio"]:.2f} (CPU-s)'
    )
  print(summary)
  print('load average (1, 5, 15 min): %.2f %.2f %.2f' % res['load_avg'])
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=2)
  return res


if __name__ == '__main__':
  use_huge_pages()  # as run.py does (restarts once)
  main()
