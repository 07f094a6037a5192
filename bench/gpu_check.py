r"""The whole accelerator check in one call: environment, golden tests on the
device, train-step speed and memory at batches that fill it, the PyTorch
reference side by side, bfloat16 agreement.

  python bench/gpu_check.py                        # on a GPU, <= 7.5 minutes
  python bench/gpu_check.py --cpu                  # tiny sizes on the CPU (CI)
  python bench/gpu_check.py --only speed_resnet50_bfloat16,tests

Every part is a job: a subprocess running the project's own benches
(`bench/train_step.py`, `bench/vs_reference.py`, `bench/bf16_agreement.py`)
or pytest on the golden-parity tests, so one crash or out-of-memory loses one
row, not the run. Jobs run one at a time in `ORDER` (what the README needs
first), each within `--job_budget_s`; none starts with less than
`--min_job_s` of `--budget_s` left, and one still running at `--budget_s` is
killed and reported as such. `--side_by_side --slots N` compiles N jobs at
once and then times them one at a time (`bench/turns.py`); on one H200 with
8 jobs at 224 that ran the autotuner out of device memory and left
PVT-v2-b5 compiling after 4 minutes (docs/PERFORMANCE.md), hence the default.

Writes to `--out` (default `$OUT`, else `workdirs/gpu_check`):
`gpu_check.json` (every figure and each job's exit status, command and
output tail) and `gpu_check.log` (every job's whole output); prints a table
last. `--reference` is the folder `avs_scripts/avs_ms3` of OpenNLPLab/AVSBench
(default `.gpu/ref/avs_ms3` if present; without it the reference jobs time
the JAX step alone), `--reference_path` holds timm 0.4.12 and easydict.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import turns  # pylint: disable=g-import-not-at-top,wrong-import-position

BACKBONES = ('resnet50', 'pvt_v2_b5')
DTYPES = ('bfloat16', 'float32')
# The golden-parity tests that run on the device (model forward in eval and
# train mode with gradients, losses, metrics, VGGish, AVSS, AVSegFormer);
# the tests that start `run.py` or train are CPU tests and stay out.
GOLDEN_TESTS = (
    (
        'tests_avs',
        (
            'tests/test_model_golden.py',
            'tests/test_vggish.py',
            'tests/test_losses.py',
            'tests/test_metrics.py',
        ),
    ),
    (
        'tests_avss_avsegformer',
        ('tests/test_avss_golden.py', 'tests/test_avsegformer.py'),
    ),
)
NOT_ON_DEVICE = 'not command_line_round_trip and not learns_from_audio'
# Run again at XLA's default precision: what fails without the setting.
DEFAULT_PRECISION_TESTS = ('tests/test_model_golden.py', 'tests/test_vggish.py')
PRECISION_CLASSES = ((2e-6, 'float32'), (2e-3, 'tf32'), (1.0, 'bfloat16'))
# The CPU mode (CI): the benches the GPU rows need once, each dtype once, the small ResNet (the
# benches do not branch on the encoder).
CPU_JOBS = (
    'probe',
    'tests_avs',
    'speed_resnet50_bfloat16',
    'reference_resnet50_float32',
    'avsegformer_resnet50_bfloat16',
)  # bf16_agreement.py: 3 more compiles (3.5 min here); run by hand
# The order jobs run in: what the README needs first (bf16 speed and the
# ratio to PyTorch), the tests already run on an H200 (2026-12-04) last.
ORDER = (
    'probe',
    'speed_resnet50_bfloat16',
    'reference_resnet50_bfloat16',
    'speed_pvt_v2_b5_bfloat16',
    'reference_pvt_v2_b5_bfloat16',
    'bf16_resnet50',
    'tests_avss_avsegformer',
    'speed_resnet50_float32',
    'reference_resnet50_float32',
    'avsegformer_resnet50_bfloat16',
    'speed_pvt_v2_b5_float32',
    'reference_pvt_v2_b5_float32',
    'bf16_pvt_v2_b5',
    'tests_avs',
    'tests_default_precision',
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument(
      '--cpu',
      action='store_true',
      help='tiny sizes on the CPU backend (the CI run)',
  )
  p.add_argument(
      '--out',
      default=os.environ.get('OUT')
      or os.path.join(ROOT, 'workdirs', 'gpu_check'),
  )
  p.add_argument(
      '--budget_s',
      type=float,
      default=None,
      help='kill what still runs after this many seconds (default 450; '
      'with --cpu 3600)',
  )
  p.add_argument(
      '--go_after_s',
      type=float,
      default=None,
      help='start timing by then even if not all jobs have '
      'compiled (default: 55%% of the budget)',
  )
  p.add_argument(
      '--slots',
      type=int,
      default=1,
      help='jobs at the same time (1: each alone, the clean timing)',
  )
  p.add_argument(
      '--side_by_side',
      action='store_true',
      help='compile --slots jobs at once, then time one at a time (on one '
      'H200, 8 at once ran the autotuner out of memory: see '
      'docs/PERFORMANCE.md)',
  )
  p.add_argument(
      '--job_budget_s',
      type=float,
      default=None,
      help='kill a job that runs longer than this (default 200; with --cpu '
      '1800)',
  )
  p.add_argument(
      '--min_job_s',
      type=float,
      default=45.0,
      help='start no job with less than this left of --budget_s',
  )
  p.add_argument('--only', default='', help='comma-separated job names')
  p.add_argument('--skip', default='', help='comma-separated job names')
  p.add_argument(
      '--fill',
      type=float,
      default=0.8,
      help="speed jobs: fill this fraction of the device's memory",
  )
  p.add_argument(
      '--reference', default=os.path.join(ROOT, '.gpu', 'ref', 'avs_ms3')
  )
  p.add_argument(
      '--reference_path', default=os.path.join(ROOT, '.gpu', 'refpath')
  )
  p.add_argument(
      '--reference_batch',
      type=int,
      default=16,
      help='clips per step in the JAX vs PyTorch comparison',
  )
  p.add_argument('--list', action='store_true', help='print the jobs, exit')
  p.add_argument(
      '--probe', default='', help=argparse.SUPPRESS
  )  # internal: the environment job
  args = p.parse_args(argv)
  if args.budget_s is None:
    args.budget_s = 3600.0 if args.cpu else 450.0
  if args.job_budget_s is None:
    args.job_budget_s = 1800.0 if args.cpu else 200.0
  return args


# ---------------------------------------------------------------------------
# The environment probe (a job of its own: this process never loads JAX).


def rel_err(got, want):
  import numpy as np  # pylint: disable=g-import-not-at-top

  got, want = np.float64(got), np.float64(want)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def precision_class(err):
  return next(name for bound, name in PRECISION_CLASSES if err < bound)


def probe(path):
  """Device, driver, versions, and the float32 precision XLA uses (measured)."""
  # pylint: disable=g-import-not-at-top
  import importlib.metadata as md
  import jax
  import jax.numpy as jnp
  import numpy as np
  # pylint: enable=g-import-not-at-top
  res = {'python': sys.version.split()[0]}
  versions = {}
  for d in md.distributions():
    name = (d.metadata['Name'] or '').lower()
    if name.startswith(
        (
            'jax',
            'flax',
            'optax',
            'orbax',
            'torch',
            'numpy',
            'nvidia-cudnn',
            'nvidia-cublas',
            'ml-collections',
            'grain',
            'timm',
        )
    ):
      versions[name] = d.version
  res['versions'] = dict(sorted(versions.items()))
  dev = jax.devices()[0]
  res.update(
      platform=dev.platform,
      device_kind=dev.device_kind,
      device_count=jax.device_count(),
  )
  stats = dev.memory_stats() or {}
  res['bytes_limit'] = stats.get('bytes_limit')
  res['jax_default_matmul_precision'] = jax.config.jax_default_matmul_precision
  res['xla_flags'] = os.environ.get('XLA_FLAGS', '')
  res['env'] = {
      k: v
      for k, v in os.environ.items()
      if k.startswith(('XLA_', 'JAX_', 'NVIDIA_TF32', 'CUDA_'))
  }
  if shutil.which('nvidia-smi'):
    q = subprocess.run(
        [
            'nvidia-smi',
            '--query-gpu=name,driver_version,memory.total,'
            'clocks.max.sm,power.limit',
            '--format=csv,noheader',
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    res['nvidia_smi'] = q.stdout.strip() or q.stderr.strip()
  # float32 precision in force: a matmul against float64, and a conv at the
  # default precision against the same conv at 'highest'.
  rng = np.random.default_rng(0)
  a = rng.standard_normal((512, 512)).astype(np.float32)
  b = rng.standard_normal((512, 512)).astype(np.float32)
  want = np.float64(a) @ np.float64(b)
  x = jnp.asarray(rng.standard_normal((4, 32, 32, 64)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 64, 64)) / 24, jnp.float32)
  conv = jax.jit(
      lambda x, k: jax.lax.conv_general_dilated(
          x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
      )
  )
  mm = jax.jit(jnp.dot)
  with jax.default_matmul_precision('highest'):
    conv_hi = np.asarray(conv(x, k))
  for prec in ('default', 'highest'):
    with jax.default_matmul_precision(prec):
      e_mm = rel_err(np.asarray(mm(a, b)), want)
      e_conv = rel_err(np.asarray(conv(x, k)), conv_hi)
    res[f'matmul_f32_rel_err_{prec}'] = e_mm
    res[f'conv_f32_rel_diff_{prec}_vs_highest'] = e_conv
  res['matmul_f32_default_is'] = precision_class(
      res['matmul_f32_rel_err_default']
  )
  res['conv_f32_default_is'] = precision_class(
      max(res['conv_f32_rel_diff_default_vs_highest'], 1e-9)
  )
  with open(path, 'w') as f:
    json.dump(res, f, indent=2)
  print(json.dumps(res, indent=2))


# ---------------------------------------------------------------------------
# The jobs.


class Job:
  """One subprocess: `argv`, extra `env`; `timed` jobs take a turn."""

  def __init__(self, name, argv, env=None, timed=False, result=None):
    self.name, self.argv, self.env, self.timed = name, argv, env or {}, timed
    self.result = result  # the JSON or junit file it writes
    self.proc = self.log = None
    self.started = self.ended = None
    self.status = 'pending'

  def start(self, work, base_env):
    self.log = os.path.join(work, self.name + '.log')
    env = dict(base_env, **self.env)
    self.started = time.monotonic()
    with open(self.log, 'w') as log:
      self.proc = subprocess.Popen(
          self.argv,
          cwd=ROOT,
          env=env,
          stdout=log,
          stderr=subprocess.STDOUT,
          start_new_session=True,
      )
    self.status = 'running'

  def poll(self):
    if self.proc is not None and self.status == 'running':
      rc = self.proc.poll()
      if rc is not None:
        self.ended = time.monotonic()
        self.status = 'ok' if rc == 0 else f'failed (exit {rc})'
    return self.status

  def kill(self, why):
    if self.status == 'running':
      try:
        os.killpg(self.proc.pid, 9)
      except ProcessLookupError:
        pass
      self.proc.wait()
      self.ended = time.monotonic()
      self.status = why


def make_jobs(args, work):
  """The plan, in the order jobs start."""
  py = sys.executable
  bench = lambda name: os.path.join(ROOT, 'bench', name)
  cpu = args.cpu
  size = '32' if cpu else '224'
  jobs = [
      Job(
          'probe',
          [
              py,
              os.path.abspath(__file__),
              '--probe',
              os.path.join(work, 'probe.json'),
          ],
          result=os.path.join(work, 'probe.json'),
      )
  ]

  def tests(name, files, precision, extra=()):
    xml = os.path.join(work, name + '.xml')
    return Job(
        name,
        [
            py,
            '-m',
            'pytest',
            '-q',
            '-p',
            'no:cacheprovider',
            f'--junitxml={xml}',
            *extra,
            *files,
        ],
        env={'JAX_DEFAULT_MATMUL_PRECISION': precision},
        result=xml,
    )

  if cpu:  # one quick golden test file: the path, not the coverage
    jobs.append(
        tests(
            'tests_avs',
            ('tests/test_metrics.py',),
            'highest',
            ('-k', 'golden_metrics_scenarios'),
        )
    )
  else:
    for name, files in GOLDEN_TESTS:
      jobs.append(tests(name, files, 'highest', ('-k', NOT_ON_DEVICE)))
  tiny = {'resnet50': 'resnet_tiny', 'pvt_v2_b5': 'pvt_v2_b0'}
  cores = len(os.sched_getaffinity(0))

  def job(name, script, flags, timed=True):
    """A bench writing `name`.json; `flags` a string, split on spaces."""
    out = os.path.join(work, name + '.json')
    argv = [py, bench(script), *flags.split(), '--json', out]
    if timed:
      argv += ['--turn', os.path.join(work, name)]
    return Job(name, argv, timed=timed, result=out)

  for bb, dtype in [(bb, dt) for dt in DTYPES for bb in BACKBONES]:
    flags = (
        f'--config configs/ms3.py --image_size {size} --dtype {dtype} --init '
        f'host --steps 5 --warmup 2 --config.audio.precompute=False --fill '
        f'{args.fill} --batch 8'
    )
    if cpu:
      flags += (
          f' --backbone {tiny[bb]} --config.model.channels=16 --frames 2'
          ' --steps 1 --warmup 0 --batch 2 --memory_gib 1 --max_compiles 1'
      )
    else:  # one compile without autotuning bounds the batch (--fill)
      flags += f' --backbone {bb} --max_compiles 1'
      flags += ' --eval' if dtype == 'bfloat16' else ''  # once per backbone
    jobs.append(job(f'speed_{bb}_{dtype}', 'train_step.py', flags))
    flags = (
        f'--config configs/ms3.py --image_size {size} --dtype {dtype} '
        f'--alternations 5 --warmup 1 --cores {cores}'
    )
    if cpu:
      flags += (
          f' --backbone {tiny[bb]} --set model.channels=16 --batch 1'
          ' --alternations 2'
      )
    else:
      flags += (
          f' --backbone {bb} --batch {args.reference_batch} --device cuda'
          ' --same_process'
      )
      if os.path.isdir(args.reference):
        flags += (
            f' --reference {args.reference} --reference_path'
            f' {args.reference_path}'
        )
    jobs.append(job(f'reference_{bb}_{dtype}', 'vs_reference.py', flags))
  for bb in BACKBONES:
    flags = f'--image_size {size} --batch 2 --backbone '
    flags += f'{tiny[bb]} --set model.channels=16' if cpu else bb
    jobs.append(job(f'bf16_{bb}', 'bf16_agreement.py', flags, timed=False))
  if cpu:  # the demo's small AVSegFormer
    flags = (
        '--config configs/synthetic_avsegformer.py --frames 2 --steps 1 '
        '--warmup 0 --batch 2'
    )
  else:
    flags = (
        '--config configs/avsegformer_ms3.py --backbone resnet50 --steps 5 '
        '--warmup 2 --batch 8'
    )
  flags += f' --image_size {size} --dtype bfloat16 --init host'
  jobs.append(job('avsegformer_resnet50_bfloat16', 'train_step.py', flags))
  if not cpu:
    jobs.append(
        tests('tests_default_precision', DEFAULT_PRECISION_TESTS, 'default')
    )
  jobs.sort(key=lambda j: ORDER.index(j.name))
  if cpu:
    jobs = [j for j in jobs if j.name in CPU_JOBS]
  names = [j.name for j in jobs]
  for arg in (args.only, args.skip):
    unknown = [n for n in arg.split(',') if n and n not in names]
    if unknown:
      raise SystemExit(f'unknown job(s) {unknown}; jobs: {", ".join(names)}')
  if args.only:
    jobs = [j for j in jobs if j.name in args.only.split(',')]
  return [j for j in jobs if j.name not in args.skip.split(',')]


def run_jobs(jobs, args, work, base_env):
  """Runs the jobs in order, `--slots` at a time, within the deadlines.

  By default each job runs alone (`--slots 1`; the go is given at once, so a
  timed job times as soon as it has compiled). With `--side_by_side`,
  `--slots` jobs compile at once; timed jobs wait when compiled, and the go
  comes when every job has compiled or at `--go_after_s`.
  """
  t0 = time.monotonic()
  go_after = args.go_after_s or 0.55 * args.budget_s
  go = os.path.join(work, turns.GO)
  if not args.side_by_side:
    open(go, 'w').close()
  pending = list(jobs)
  while True:
    now = time.monotonic() - t0
    for j in jobs:
      j.poll()
      if j.status == 'running' and now - (j.started - t0) > args.job_budget_s:
        j.kill(f'killed at its {args.job_budget_s:.0f} s limit')
        print(f'[{now:5.0f} s] {j.name}: {j.status}', flush=True)
    running = [j for j in jobs if j.status == 'running']
    busy = [  # side by side: the jobs still compiling
        j
        for j in running
        if not (
            args.side_by_side
            and j.timed
            and os.path.exists(turns.ready_path(os.path.join(work, j.name)))
        )
    ]
    while pending and len(busy) < args.slots:
      if os.path.exists(go) and args.side_by_side:
        break
      if args.budget_s - now < args.min_job_s:
        break
      j = pending.pop(0)
      j.start(work, base_env)
      print(f'[{now:5.0f} s] start {j.name}', flush=True)
      running.append(j)
      busy.append(j)
    if not os.path.exists(go) and (
        (not pending and not busy) or now > go_after
    ):
      open(go, 'w').close()
      print(f'[{now:5.0f} s] go: timed jobs take turns', flush=True)
    if pending and (
        os.path.exists(go)
        and args.side_by_side
        or args.budget_s - now < args.min_job_s
    ):
      for j in pending:
        j.status = 'not started (no time left)'
      print(
          f'[{now:5.0f} s] not started: ' + ', '.join(j.name for j in pending),
          flush=True,
      )
      pending = []
    if not pending and not running:
      return
    if now > args.budget_s:
      for j in running:
        j.kill(f'killed at the {args.budget_s:.0f} s budget')
        print(f'[{now:5.0f} s] {j.name}: {j.status}', flush=True)
      return
    time.sleep(0.5)


# ---------------------------------------------------------------------------
# Results.


def junit(path):
  """`{passed, failed, skipped, failures: [{test, message}]}` of a junit file."""
  root = ET.parse(path).getroot()
  out = {'passed': 0, 'failed': 0, 'skipped': 0, 'failures': []}
  for case in root.iter('testcase'):
    bad = case.find('failure')
    if bad is None:
      bad = case.find('error')
    if bad is not None:
      out['failed'] += 1
      msg = (bad.get('message') or bad.text or '').strip().splitlines()
      out['failures'].append(
          {
              'test': f'{case.get("classname")}::{case.get("name")}',
              'message': ' '.join(msg[:3])[:400],
          }
      )
    elif case.find('skipped') is not None:
      out['skipped'] += 1
    else:
      out['passed'] += 1
  return out


def collect(jobs):
  res = {}
  for j in jobs:
    r = {'status': j.status, 'command': ' '.join(j.argv[1:]), 'env': j.env}
    if j.started is not None:
      r['wall_s'] = round((j.ended or time.monotonic()) - j.started, 1)
    if j.result and os.path.exists(j.result):
      try:
        r['result'] = (
            junit(j.result)
            if j.result.endswith('.xml')
            else json.load(open(j.result))
        )
      except (ValueError, ET.ParseError) as e:
        r['result_error'] = f'{type(e).__name__}: {e}'
    if j.log and os.path.exists(j.log):
      with open(j.log, errors='replace') as f:
        r['output_tail'] = f.read()[-3000:]
    res[j.name] = r
  return res


def fmt(x, spec, scale=None):
  if x is None:
    return '-'
  return format(x if scale is None else x * scale, spec)


def table(res):
  """The short table printed last."""
  lines = []
  env = res.get('probe', {}).get('result')
  if env:
    v = env.get('versions', {})
    plugin = ', '.join(
        f'{k} {x}' for k, x in v.items() if k.startswith('jax-cuda')
    )
    lines.append(
        f'device: {env.get("device_kind")} ({env.get("platform")}); '
        f'{env.get("nvidia_smi", "")}; jax {v.get("jax")} jaxlib '
        f'{v.get("jaxlib")} {plugin}; flax {v.get("flax")}'
    )
    lines.append(
        'float32 at XLA default precision: matmul rel err '
        f'{env["matmul_f32_rel_err_default"]:.1e} '
        f'({env["matmul_f32_default_is"]}), conv vs highest '
        f'{env["conv_f32_rel_diff_default_vs_highest"]:.1e} '
        f'({env["conv_f32_default_is"]}); '
        f'jax_default_matmul_precision={env["jax_default_matmul_precision"]}'
    )
  for name, r in res.items():
    if name.startswith('tests'):
      t = r.get('result')
      line = f'{name} ({r["env"].get("JAX_DEFAULT_MATMUL_PRECISION")}): '
      if t:
        line += f'{t["passed"]} passed, {t["failed"]} failed, {t["skipped"]} skipped'
        for f in t['failures'][:8]:
          line += f'\n    FAILED {f["test"]}: {f["message"][:160]}'
      else:
        line += r['status']
      lines.append(line)
  lines.append(
      'train step (MS3, VGGish in the step, Adam)  dtype     batch   step ms'
      '  clips/s   MFU%  peak GiB  eval clips/s'
  )
  for name, r in res.items():
    if not (name.startswith('speed_') or name.startswith('avsegformer')):
      continue
    s = r.get('result') or {}
    model = name.split('_', 1)[1].rsplit('_', 1)[0]
    if name.startswith('avsegformer'):
      model = 'AVSegFormer ' + model
    lines.append(
        f'  {model:41s} {s.get("dtype", name.rsplit("_", 1)[1]):9s} '
        f'{fmt(s.get("global_batch"), "5d")}  {fmt(s.get("step_s"), "8.1f", 1e3)}'
        f'  {fmt(s.get("clips_per_s"), "7.1f")}  {fmt(s.get("train_mfu"), "5.1f", 100)}'
        f'  {fmt(s.get("device_peak_bytes"), "8.1f", 2**-30)}'
        f'  {fmt(s.get("eval_clips_per_s"), "12.1f")}'
        + ('' if s else f'   [{r["status"]}]')
    )
  lines.append(
      'JAX vs PyTorch step (same weights and inputs)  dtype     '
      'batch  jax ms  torch ms  ratio  first loss jax / torch'
  )
  for name, r in res.items():
    if not name.startswith('reference_'):
      continue
    s = r.get('result') or {}
    jx, rf = s.get('jax') or {}, s.get('reference') or {}
    fl = s.get('first_loss') or {}
    lines.append(
        f'  {name[len("reference_"):].rsplit("_", 1)[0]:43s} '
        f'{s.get("dtype", name.rsplit("_", 1)[1]):9s} '
        f'{fmt(s.get("batch"), "5d")}  {fmt(jx.get("median_wall_s"), "6.1f", 1e3)}'
        f'  {fmt(rf.get("median_wall_s"), "8.1f", 1e3)}  {fmt(s.get("median_ratio"), "5.2f")}'
        f'  {fmt(fl.get("jax"), ".6f")} / {fmt(fl.get("reference"), ".6f")}'
        + ('' if s else f'   [{r["status"]}]')
    )
  for name, r in res.items():
    if name.startswith('bf16_'):
      s = r.get('result') or {}
      b = s.get('bfloat16') or {}
      f = s.get('float32 (default precision)') or {}
      lines.append(
          f'{name} vs float32 highest: bf16 loss rel {fmt(b.get("loss_rel_diff"), ".1e")}, '
          f'grad cos {fmt(b.get("grad_cosine"), ".5f")}, mask IoU '
          f'{fmt(b.get("mask_iou"), ".4f")}; f32 default: grad cos '
          f'{fmt(f.get("grad_cosine"), ".6f")}, logits rel '
          f'{fmt(f.get("logits_rel_l2"), ".1e")}'
          + ('' if s else f'   [{r["status"]}]')
      )
  bad = [f'{n}: {r["status"]}' for n, r in res.items() if r['status'] != 'ok']
  lines.append('jobs not ok: ' + ('; '.join(bad) if bad else 'none'))
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  if args.probe:
    probe(args.probe)
    return None
  work = tempfile.mkdtemp(prefix='gpu_check_')
  jobs = make_jobs(args, work)
  if args.list:
    shutil.rmtree(work)
    for j in jobs:
      print(j.name, ' '.join(j.argv[1:]))
    return None
  os.makedirs(args.out, exist_ok=True)
  base_env = dict(
      os.environ,
      PYTHONUNBUFFERED='1',
      PYTHONPATH=os.pathsep.join(
          p for p in (ROOT, os.environ.get('PYTHONPATH')) if p
      ),
  )
  # Several processes share the device: none may take 75% of it at start;
  # the speed jobs' limit is 90% (their --fill is a fraction of that).
  base_env.update(
      XLA_PYTHON_CLIENT_PREALLOCATE='false',
      XLA_PYTHON_CLIENT_MEM_FRACTION='0.9',
  )
  if args.cpu:
    base_env.update(JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='')
  else:  # tests/conftest.py defaults to the CPU
    base_env.update(JAX_PLATFORMS=base_env.get('JAX_PLATFORMS') or 'cuda')
    base_env.setdefault('CUDA_VISIBLE_DEVICES', '0')
  t0 = time.time()
  try:
    run_jobs(jobs, args, work, base_env)
  finally:
    for j in jobs:
      j.kill('killed (check interrupted)')
    res = collect(jobs)
    with open(os.path.join(args.out, 'gpu_check.json'), 'w') as f:
      json.dump(
          {
              'started': t0,
              'wall_s': time.time() - t0,
              'argv': sys.argv,
              'jobs': res,
          },
          f,
          indent=2,
      )
    with open(os.path.join(args.out, 'gpu_check.log'), 'w') as out:
      for j in jobs:
        if j.log and os.path.exists(j.log):
          out.write(f'\n===== {j.name}: {j.status}\n$ {" ".join(j.argv)}\n')
          with open(j.log, errors='replace') as f:
            shutil.copyfileobj(f, out)
    shutil.rmtree(work, ignore_errors=True)
  print(
      f'\n===== gpu_check: {time.time() - t0:.0f} s; {args.out}/gpu_check.json'
  )
  print(table(res))
  return res


if __name__ == '__main__':
  main()
