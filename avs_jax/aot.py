r"""Ahead-of-time compile for a TPU slice: does a config fit, and how fast.

  python run.py --mode=compile --config=configs/ms3.py:pvt_v2_b5 \
      --topology=v5e-8 --config.train.dtype=bfloat16 \
      --config.train.batch_size=32 --config.eval.batch_size=32

With libtpu installed (requirements-tpu.txt), `jax.experimental.topologies`
gives the devices of a TPU slice that need not exist here, and XLA:TPU
compiles for them the very steps `--mode=train` runs:
`train.jit_train_step` with `runtime.abstract_train_state`'s shardings
(`train.fsdp`), `train.build_training`'s model and optimizer (`train.remat`,
`train.dtype`), the batch split over the `data` axis of `runtime.make_mesh`,
VGGish in the step or its embeddings precomputed (`audio.precompute`); and
`evaluate.jit_eval_step`. Nothing runs: arrays are shapes only.

Per chip it reports XLA:TPU's buffer plan (`compiled.memory_analysis()`:
arguments, outputs, temporaries, code) against the chip's HBM, and the
step's FLOPs and bytes (`compiled.cost_analysis()`). The step time is a
roofline estimate: max(FLOPs / dense bf16 peak, bytes / HBM bandwidth) per
chip; collectives, input feeding and the MXU's efficiency on these shapes
are not in it, so it is a lower bound on time (upper bound on clips/s), not
a measurement. With `max_compiles` > 1 it searches the largest batch per
chip that fits (a linear memory model from the compiles so far, then
bisection), one train-step compile per try.
"""

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from avs_jax import evaluate
from avs_jax import runtime
from avs_jax import train
from avs_jax import xla_flags
from avs_jax.data import records

GiB = 2**30
REQUIREMENTS = 'requirements-tpu.txt'
# Training clips of AVSBench (the papers' splits): the epoch-time estimate.
TRAIN_CLIPS = {'s4': 3452, 'ms3': 296, 'avss': 8498}


class CompileError(ValueError):
  """Input that `--mode=compile` cannot use: one line, what to do."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip: HBM, dense bf16 peak, HBM bandwidth (vendor figures)."""

  hbm_bytes: int
  peak_tflops: float
  hbm_gb_per_s: float
  prefix: str  # its name in get_topology_desc's topology names
  cores_in_name: bool  # Cloud TPU names count TensorCores (v4-8: 4 chips)


CHIPS = {
    'v4': Chip(32 * GiB, 275.0, 1228.0, 'v4', True),
    'v5e': Chip(16 * GiB, 197.0, 819.0, 'v5e', False),
    'v5p': Chip(95 * GiB, 459.0, 2765.0, 'v5', True),
    'v6e': Chip(32 * GiB, 918.0, 1640.0, 'v6e', False),
}
# Slice shapes by chip count: 2-D for v5e/v6e, 3-D for v4/v5p.
SHAPES_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8'}
SHAPES_2D.update({128: '8x16', 256: '16x16'})
SHAPES_3D = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4'}
SHAPES_3D.update({128: '4x4x8', 256: '4x8x8', 512: '8x8x8'})


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: `name` as given, its chip, get_topology_desc's arguments."""

  name: str
  kind: str  # a CHIPS key
  shape: str  # chips per dimension, e.g. '2x4'
  chips: int

  @property
  def chip(self):
    return CHIPS[self.kind]

  def topology_args(self):
    """`get_topology_desc` keyword arguments (as MaxText's train_compile):
    v5e/v6e hosts hold 8 chips up to a 2x4 slice, else 4 (2x2x1), as v4/v5p."""
    dims = [int(d) for d in self.shape.split('x')]
    host = (2, 2, 1)
    if not self.chip.cores_in_name and self.chips <= 8:
      host = tuple(dims + [1])
    return dict(
        topology_name=f'{self.chip.prefix}:{self.shape}',
        chip_config_name='megacore' if self.chip.cores_in_name else 'default',
        chips_per_host_bounds=host,
        num_slices=1,
    )


def parse_topology(name):
  """'v5e-8', 'v5p-8' (Cloud TPU names) or 'v5e:2x4', 'v5p:2x2x1' -> Slice."""
  known = ', '.join(f'{k}-N' for k in CHIPS)
  m = re.fullmatch(r'(v4|v5e|v5p|v6e)(?:-(\d+)|:(\d+(?:x\d+){1,2}))', name)
  if not m:
    raise CompileError(
        f'--topology={name!r}: unknown TPU slice; use e.g. v5e-8, v5e:4x8, '
        f'v5p-8 or v4:2x2x2 ({known})'
    )
  kind, count, shape = m.groups()
  chip = CHIPS[kind]
  shapes = SHAPES_3D if chip.cores_in_name else SHAPES_2D
  if count:
    chips = int(count) // (2 if chip.cores_in_name else 1)
    if chips not in shapes:
      sizes = ', '.join(
          f'{kind}-{n * (2 if chip.cores_in_name else 1)}' for n in shapes
      )
      raise CompileError(
          f'--topology={name!r}: no such {kind} slice; one of {sizes}'
      )
    shape = shapes[chips]
  if len(shape.split('x')) != len(next(iter(shapes.values())).split('x')):
    raise CompileError(
        f'--topology={name!r}: a {kind} slice has '
        f'{len(next(iter(shapes.values())).split("x"))} dimensions, e.g. '
        f'{kind}:{next(iter(shapes.values()))}'
    )
  chips = int(np.prod([int(d) for d in shape.split('x')]))
  return Slice(name, kind, shape, chips)


def libtpu_pin():
  """The libtpu requirement of the installed jax's `tpu` extra, e.g.
  '==0.0.42.*' (None if its metadata has none)."""
  for req in importlib.metadata.requires('jax') or ():
    m = re.match(r'libtpu\s*([=<>!~][^;]*);.*extra\s*==\s*"tpu"', req)
    if m:
      return m.group(1).strip()
  return None


def libtpu_problem(installed, pin, jax_version):
  """The one line that says libtpu cannot compile for TPU, or None.

  `installed`: libtpu's version (None: not installed); `pin`: what jax's
  `tpu` extra asks for (e.g. '==0.0.42.*').
  """
  line = f"pip install 'libtpu{pin or ''}' (or -r {REQUIREMENTS})"
  if installed is None:
    return f'libtpu is not installed (--mode=compile needs it): {line}'
  if pin and pin.startswith('=='):
    want = pin[2:]
    ok = (
        installed.startswith(want[:-1])
        if want.endswith('.*')
        else installed == want
    )
    if not ok:
      return (
          f'libtpu {installed} does not match jax {jax_version} (it wants '
          f'libtpu{pin}): {line}'
      )
  return None


def check_libtpu():
  """Raises CompileError unless a libtpu matching this jax is installed."""
  try:
    installed = importlib.metadata.version('libtpu')
  except importlib.metadata.PackageNotFoundError:
    installed = None
  if installed and importlib.util.find_spec('libtpu') is None:
    installed = None
  problem = libtpu_problem(installed, libtpu_pin(), jax.__version__)
  if problem:
    raise CompileError(problem)


def slice_devices(sl):
  """The (compile-only) TPU devices of the slice `sl`, every host's."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  check_libtpu()
  if not xla_flags.tpu_chips():  # no TPU here: libtpu only compiles
    # Else it warns that it found none, and holds /tmp/libtpu_lockfile: a
    # second compiling process (tests, parallel compiles) would stop.
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', f'{sl.kind}-{sl.chips}')
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  return topologies.get_topology_desc(platform='tpu', **sl.topology_args())


def abstract_batch(config, batch_size, sharding):
  """The device entries of a global batch of `batch_size` clips as the input
  pipeline gives them (`records.padding`'s shapes: frames `[B, T, H, W, 3]`,
  log-mel `[B, T, 96, 64]` or, with `audio.precompute`, embeddings
  `[B, T, 128]`, masks or AVSS labels...), as ShapeDtypeStructs."""
  element = dict(records.padding(config.data.image_size, config.data.setting))
  if config.audio.precompute:
    t = element.pop('log_mel').shape[0]
    element['audio'] = np.zeros((t, 128), np.float32)
  return {
      k: jax.ShapeDtypeStruct(
          (batch_size,) + np.shape(v), np.asarray(v).dtype, sharding=sharding
      )
      for k, v in element.items()
      if k in runtime.DEVICE_KEYS
  }


def memory(compiled):
  """XLA's per-chip buffer plan (bytes): arguments, outputs, aliased,
  temporaries, code, and their total (outputs aliased to donated arguments
  counted once)."""
  m = compiled.memory_analysis()
  out = {
      k: int(getattr(m, f'{k}_size_in_bytes'))
      for k in ('argument', 'output', 'alias', 'temp', 'generated_code')
  }
  out['total'] = (
      out['argument']
      + out['output']
      - out['alias']
      + out['temp']
      + out['generated_code']
  )
  return out


def cost(compiled):
  """XLA:TPU's per-chip FLOPs, bytes accessed and `optimal_seconds`."""
  c = compiled.cost_analysis()
  if isinstance(c, (list, tuple)):
    c = c[0] if c else {}
  c = c or {}
  return {
      'flops': float(c.get('flops', 0.0)),
      'bytes': float(c.get('bytes accessed', 0.0)),
      'optimal_seconds': float(c.get('optimal_seconds', -1.0)),
  }


def roofline(costs, chip, per_chip_batch):
  """Step time per chip from FLOPs vs peak and bytes vs HBM bandwidth."""
  compute = costs['flops'] / (chip.peak_tflops * 1e12)
  mem = costs['bytes'] / (chip.hbm_gb_per_s * 1e9)
  step = max(compute, mem)
  return {
      'compute_s': compute,
      'memory_s': mem,
      'step_s': step,
      'bound': 'compute' if compute >= mem else 'HBM bandwidth',
      'clips_per_s_per_chip': per_chip_batch / step if step else None,
  }


class Target:
  """The train and eval steps of `config` for the slice, ready to compile.

  Built once per slice; `train(per_chip)` and `eval(per_chip)` compile the
  step for a per-chip batch and return its figures (or, when XLA:TPU says
  the program does not fit the chip's HBM, `fits` False and its message).
  """

  def __init__(self, config, sl, devices):
    self.config, self.sl = config, sl
    self.mesh = runtime.make_mesh(devices)
    sched = train.Schedule.of(
        config, TRAIN_CLIPS[config.data.setting], log=False
    )
    model, vggish, optimizer, _ = train.build_training(config, sched)
    abstract, shardings = runtime.abstract_train_state(
        config, model, optimizer, self.mesh
    )
    self.state = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract,
        shardings,
    )
    rep = runtime.replicated(self.mesh)
    self.audio_vars = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
        jax.eval_shape(
            lambda: vggish.init(jax.random.key(0), jnp.zeros((1, 96, 64)))
        ),
    )
    self.variables = jax.tree_util.tree_map(
        lambda x: x, {'params': self.state.params}
    )
    self.variables['batch_stats'] = self.state.batch_stats
    self.train_step = train.jit_train_step(
        config, model, vggish, optimizer, self.mesh, shardings
    )
    self.eval_step = evaluate.jit_eval_step(model, vggish, self.mesh)
    self.state_bytes = sum(
        x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract)
    )
    self.compiles = 0

  def batch(self, per_chip):
    return abstract_batch(
        self.config,
        per_chip * self.sl.chips,
        runtime.batch_sharding(self.mesh),
    )

  def train(self, per_chip):
    return self._compile(
        'train',
        lambda: self.train_step.trace(
            self.state, self.batch(per_chip), self.audio_vars
        ),
        per_chip,
    )

  def eval(self, per_chip):
    return self._compile(
        'eval',
        lambda: self.eval_step.trace(
            self.variables, self.audio_vars, self.batch(per_chip)
        ),
        per_chip,
    )

  def _compile(self, name, trace, per_chip):
    chip = self.sl.chip
    t0 = time.perf_counter()
    lowered = trace().lower()
    t1 = time.perf_counter()
    self.compiles += 1
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      text = str(e)
      if 'RESOURCE_EXHAUSTED' not in text and 'memory' not in text.lower():
        raise
      first = next((l for l in text.splitlines() if l.strip()), text)
      res = {
          'step': name,
          'per_chip_batch': per_chip,
          'fits': False,
          'compile_error': first.strip()[:400],
          'compile_s': time.perf_counter() - t1,
      }
      # "... required for HLO temporaries (50.30G) exceeds available HBM
      # (15.75G)": XLA:TPU's own figures, GiB.
      m = re.search(r'\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)', text)
      if m:
        res['required_bytes'] = int(float(m.group(1)) * GiB)
        res['available_bytes'] = int(float(m.group(2)) * GiB)
      return res
    res = {
        'step': name,
        'per_chip_batch': per_chip,
        'global_batch': per_chip * self.sl.chips,
        'lower_s': t1 - t0,
        'compile_s': time.perf_counter() - t1,
        'memory': memory(compiled),
        'cost': cost(compiled),
    }
    res['fits'] = res['memory']['total'] <= chip.hbm_bytes
    res['roofline'] = roofline(res['cost'], chip, per_chip)
    return res


def largest_batch(target, first, max_compiles):
  """`(largest per-chip batch seen to fit, smallest seen not to, tries)`.

  Starts from the compile `first`; each further try compiles the train step
  at the batch where a line through the last two totals (at first: the
  state and code fixed, the rest per clip) meets the chip's HBM, kept
  strictly between the bounds found so far; at most `max_compiles` compiles
  in all (the first counts).
  """
  hbm = target.sl.chip.hbm_bytes
  lo, hi, tries = 0, None, [first]
  b0 = first['per_chip_batch']
  if first['fits']:
    lo = b0
  else:
    hi = b0
  points = []
  if 'memory' in first:
    m = first['memory']
    fixed = m['argument'] + m['generated_code'] - _batch_bytes(target, b0)
    points = [(0, fixed), (b0, m['total'])]
  for _ in range(max_compiles - 1):
    if hi is not None and hi - lo <= 1:
      break
    if len(points) >= 2:
      (b1, m1), (b2, m2) = points[-2], points[-1]
      slope = (m2 - m1) / (b2 - b1) if b2 != b1 else 0
      guess = int(b2 + (hbm - m2) / slope) if slope > 0 else 2 * max(lo, 1)
    else:
      guess = (lo + hi) // 2 if hi else 2 * max(lo, 1)
    upper = hi - 1 if hi is not None else max(guess, lo + 1)
    guess = min(max(guess, lo + 1), upper)
    if hi is not None and len(tries) > 2:
      guess = (lo + hi) // 2 if not lo < guess < hi else guess
    r = target.train(guess)
    tries.append(r)
    if r['fits']:
      lo = max(lo, guess)
    else:
      hi = guess if hi is None else min(hi, guess)
    if 'memory' in r:
      points.append((guess, r['memory']['total']))
  return lo, hi, tries


def linear_estimate(target, r):
  """The per-chip batch where a line through (0, state and code) and the
  compile `r`'s total meets the chip's HBM: no compile, an estimate."""
  if 'memory' not in r:
    return None
  m, b = r['memory'], r['per_chip_batch']
  fixed = m['argument'] + m['generated_code'] - _batch_bytes(target, b)
  per_clip = (m['total'] - fixed) / b
  return int((target.sl.chip.hbm_bytes - fixed) // per_clip)


def _batch_bytes(target, per_chip):
  return sum(
      x.size * x.dtype.itemsize // target.sl.chips
      for x in target.batch(per_chip).values()
  )


def compile_report(config, topology, max_compiles=3, eval_step=True):
  """Everything `--mode=compile` prints, as a dict (JSON-able)."""
  sl = parse_topology(topology)
  runtime.check_config(config, devices=sl.chips)
  tc = config.train
  devices = slice_devices(sl)
  hosts = len({d.process_index for d in devices.devices})
  target = Target(config, sl, devices.devices)
  per_chip = tc.batch_size // sl.chips
  res = {
      'topology': topology,
      'topology_name': sl.topology_args()['topology_name'],
      'chips': sl.chips,
      'hosts': hosts,
      'device_kind': devices.devices[0].device_kind,
      'chip_hbm_bytes': sl.chip.hbm_bytes,
      'chip_peak_bf16_tflops': sl.chip.peak_tflops,
      'chip_hbm_gb_per_s': sl.chip.hbm_gb_per_s,
      'model': runtime.model_name(config),
      'backbone': config.model.get('backbone') or config.model.get('encoder'),
      'setting': config.data.setting,
      'image_size': config.data.image_size,
      'dtype': tc.dtype,
      'fsdp': bool(tc.fsdp),
      'remat': bool(tc.remat),
      'vggish': 'precomputed' if config.audio.precompute else 'in the step',
      'global_batch': tc.batch_size,
      'per_chip_batch': per_chip,
      'state_bytes': target.state_bytes,
      'jax': jax.__version__,
      'libtpu': importlib.metadata.version('libtpu'),
  }
  res['train'] = target.train(per_chip)
  res['largest_batch_estimate'] = linear_estimate(target, res['train'])
  if eval_step:
    res['eval'] = target.eval(config.eval.batch_size // sl.chips)
  if max_compiles > 1:
    lo, hi, tries = largest_batch(target, res['train'], max_compiles)
    res['largest_batch'] = {
        'per_chip': lo,
        'smallest_not_fitting': hi,
        'tries': [
            {
                'per_chip_batch': t['per_chip_batch'],
                'fits': t['fits'],
                'total_bytes': t.get('memory', {}).get('total'),
                'clips_per_s_per_chip': t.get('roofline', {}).get(
                    'clips_per_s_per_chip'
                ),
            }
            for t in tries
        ],
    }
  res['compiles'] = target.compiles
  train_rl = res['train'].get('roofline')
  if train_rl and train_rl['clips_per_s_per_chip']:
    slice_rate = train_rl['clips_per_s_per_chip'] * sl.chips
    res['clips_per_s_slice'] = slice_rate
    res['epoch_s'] = TRAIN_CLIPS[config.data.setting] / slice_rate
  return res


def gib(b):
  return 'n/a' if b is None else f'{b / GiB:.2f} GiB'


def print_report(res):
  """The report of `compile_report`, per chip, for people."""
  print(
      f'{res["topology"]} ({res["topology_name"]}): {res["chips"]} chips '
      f'({res["device_kind"]}), {res["hosts"]} host(s); {res["chip_hbm_bytes"] / GiB:g} GiB HBM, '
      f'{res["chip_peak_bf16_tflops"]:g} bf16 TFLOP/s, '
      f'{res["chip_hbm_gb_per_s"]:g} GB/s per chip'
  )
  print(
      f'{res["model"]} {res["backbone"]} {res["setting"]} '
      f'{res["image_size"]}px {res["dtype"]}, fsdp={res["fsdp"]}, '
      f'remat={res["remat"]}, VGGish {res["vggish"]}; global batch '
      f'{res["global_batch"]} ({res["per_chip_batch"]}/chip); train state '
      f'{gib(res["state_bytes"])} (all chips together, before sharding)'
  )
  for name in ('train', 'eval'):
    if name in res:
      print_step(name, res[name], res)
  if 'epoch_s' in res:
    print(
        f'one epoch of AVSBench-{res["setting"].upper()} '
        f'({TRAIN_CLIPS[res["setting"]]} clips) at that rate: '
        f'{res["epoch_s"]:.1f} s'
    )
  if res.get('largest_batch_estimate') is not None:
    print(
        'largest batch per chip, from this one compile (memory linear in '
        f'the batch; not compiled): about {res["largest_batch_estimate"]}'
    )
  if res.get('largest_batch'):
    print_search(res['largest_batch'])
  print(
      f'({res["compiles"]} XLA:TPU compiles; an estimate from the compiler, '
      'no TPU ran: see docs/TPU.md)'
  )


def print_step(name, r, res):
  """One compiled step's memory and speed lines."""
  if 'memory' not in r:
    print(
        f'{name} step, {r["per_chip_batch"]}/chip: does NOT fit: '
        f'{r["compile_error"]}'
    )
    return
  m, c, rl = r['memory'], r['cost'], r['roofline']
  print(
      f'{name} step, {r["per_chip_batch"]}/chip (compiled in '
      f'{r["compile_s"]:.0f} s): HBM per chip: arguments '
      f'{gib(m["argument"])}, outputs {gib(m["output"])} (aliased '
      f'{gib(m["alias"])}), temporaries {gib(m["temp"])}, code '
      f'{gib(m["generated_code"])}; total {gib(m["total"])} of '
      f'{gib(res["chip_hbm_bytes"])}: {"fits" if r["fits"] else "does NOT fit"}'
  )
  line = (
      f'  per chip per step: {c["flops"] / 1e9:,.1f} GFLOP, '
      f'{c["bytes"] / 1e9:.2f} GB; roofline {rl["step_s"] * 1e3:.1f} ms '
      f'({rl["bound"]}-bound: compute {rl["compute_s"] * 1e3:.1f} ms, '
      f'HBM {rl["memory_s"] * 1e3:.1f} ms) = '
      f'{rl["clips_per_s_per_chip"]:.1f} clips/s per chip, '
      f'{rl["clips_per_s_per_chip"] * res["chips"]:.0f} per slice'
  )
  opt = c['optimal_seconds']
  if 0 < opt < 1e3:
    line += f'; XLA optimal_seconds {opt * 1e3:.1f} ms'
  else:
    line += f' (XLA optimal_seconds {opt:.3g}: not used)'
  print(line)


def print_search(lb):
  """The largest-batch search's line."""
  tried = ', '.join(
      f'{t["per_chip_batch"]} {"fits" if t["fits"] else "no"}'
      + (f' ({gib(t["total_bytes"])})' if t['total_bytes'] else '')
      for t in lb['tries']
  )
  upper = (
      f', {lb["smallest_not_fitting"]} does not'
      if lb['smallest_not_fitting']
      else ', no upper bound found'
  )
  print(
      f'largest batch per chip that fits: {lb["per_chip"]}{upper} '
      f'(train step compiled at: {tried})'
  )


def write_json(res, path):
  with open(path, 'w') as f:
    json.dump(res, f, indent=2)
