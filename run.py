r"""avs_jax entry point: train, evaluate or predict with an ml_collections config.

  python run.py --config=configs/synthetic.py                  # the CPU demo
  python run.py --config=configs/ms3.py --workdir=workdirs/ms3 \
      --config.train.batch_size=8                              # train (resumes)
  python run.py --mode=eval --config=configs/ms3.py --workdir=workdirs/ms3
  python run.py --mode=predict --config=configs/ms3.py \
      --config.predict.video=clip.mp4 --config.predict.restore=workdirs/ms3
  python run.py --mode=compile --config=configs/ms3.py --topology=v5e-8 \
      --config.train.batch_size=64 --config.eval.batch_size=64  # fits? speed?
"""

import os
import sys

from avs_jax.xla_flags import set_xla_flags, use_huge_pages

if __name__ == '__main__':
  use_huge_pages()  # restarts once: malloc with huge pages (Linux, glibc)
set_xla_flags()  # before JAX starts: XLA:CPU's faster convolutions (a no-op elsewhere)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from avs_jax import aot
from avs_jax import audio
from avs_jax import checkpoint
from avs_jax import data
from avs_jax import evaluate
from avs_jax import predict
from avs_jax import runtime
from avs_jax import torch_weights
from avs_jax import train
from avs_jax import utils
from data_prep import synthetic
from data_prep import synthetic_avss

# pylint: enable=g-import-not-at-top,wrong-import-position


def _env_int(name):
  return int(os.environ[name]) if os.environ.get(name) else None


config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/*.py).', lock_config=True
)
flags.mark_flags_as_required(['config'])
flags.DEFINE_string(
    'workdir',
    None,
    'Checkpoints, logs and results. Default: ' 'workdirs/<config file name>.',
)
flags.DEFINE_enum(
    'mode',
    'train',
    ['train', 'eval', 'predict', 'compile'],
    'train (then test the best checkpoint), eval, predict, or compile '
    '(the train and eval steps for --topology by XLA:TPU: memory, speed).',
)
flags.DEFINE_string(
    'topology',
    None,
    '--mode=compile: the TPU slice, e.g. v5e-8, v5e:4x8, v5p-8, v4:2x2x2.',
)
flags.DEFINE_integer(
    'max_compiles',
    3,
    '--mode=compile: train-step compiles in all, the search for the largest '
    'batch per chip included (1: no search).',
)
flags.DEFINE_bool(
    'compile_eval', True, '--mode=compile: compile the eval step too.'
)
flags.DEFINE_string(
    'json', None, '--mode=compile: also write the report to this file.'
)
flags.DEFINE_enum(
    'distributed',
    'auto',
    ['auto', 'yes', 'no'],
    'Call jax.distributed.initialize() (several processes; '
    'auto: with --coordinator_address or when a TPU pod / SLURM '
    'environment is detected).',
)
flags.DEFINE_string(
    'coordinator_address',
    os.environ.get('JAX_COORDINATOR_ADDRESS'),
    'host:port of process 0, the same for every process (env '
    'JAX_COORDINATOR_ADDRESS). Not needed on TPU pods / SLURM.',
)
flags.DEFINE_integer(
    'num_processes',
    _env_int('JAX_NUM_PROCESSES'),
    'Number of processes (env JAX_NUM_PROCESSES).',
)
flags.DEFINE_integer(
    'process_id',
    _env_int('JAX_PROCESS_ID'),
    'This process, 0 .. num_processes-1 (env JAX_PROCESS_ID).',
)
flags.DEFINE_integer(
    'heartbeat_timeout',
    100,
    'Seconds without a heartbeat after which a process counts '
    'as dead and the others stop with an error.',
)
FLAGS = flags.FLAGS

_CLUSTER_ENV = (
    'TPU_WORKER_HOSTNAMES',
    'MEGASCALE_COORDINATOR_ADDRESS',
    'JAX_COORDINATOR_ADDRESS',
    'SLURM_NTASKS',
)
# Bad input: one clear line, no traceback. Other errors keep theirs.
USER_ERRORS = (
    predict.VideoError,
    torch_weights.ConversionError,
    synthetic.SyntheticDataError,
    audio.AudioLoadError,
    checkpoint.CheckpointError,
    runtime.ConfigError,
    aot.CompileError,
    data.DataError,
    FileNotFoundError,
)


# A peer process that died, as the survivors see it.
_PEER_FAILURE = (
    'Gloo',
    'Connection reset',
    'unhealthy',
    'heartbeat',
    'coordination service',
)


def _multi_host():
  if FLAGS.distributed != 'auto':
    return FLAGS.distributed == 'yes'
  if FLAGS.coordinator_address or FLAGS.num_processes:
    return True
  return any(
      len(os.environ.get(k, '').split(',')) > 1
      or (k != 'TPU_WORKER_HOSTNAMES' and os.environ.get(k))
      for k in _CLUSTER_ENV
  )


def load_config():
  """`FLAGS.config`, or a ConfigError naming the file or the override."""
  path = config_flags.get_config_filename(FLAGS['config'])
  try:
    config = FLAGS.config
    config.get('seed')  # a config that failed to load raises here
    return config
  except AttributeError as e:  # an override of a field that does not exist
    key = str(e).strip('"\'')
    given = [
        a.split('=')[0]
        for a in sys.argv[1:]
        if a.startswith('--config.') and key in a.split('=')[0]
    ]
    raise runtime.ConfigError(
        f'{" ".join(given) or key}: no such field in {path} (the fields are '
        'in configs/common.py)'
    ) from e
  except (OSError, ImportError, SyntaxError) as e:
    last = str(e).strip().splitlines()[-1].strip()
    raise runtime.ConfigError(
        f'--config={path}: cannot load it ({last})'
    ) from e
  except (ValueError, TypeError) as e:  # an override of the wrong type
    raise runtime.ConfigError(
        f'a --config override does not fit its field: ' f'{e}'
    ) from e


def check_workdir(workdir):
  """The workdir exists and is writable, or one clear error."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise runtime.ConfigError(
        f'--workdir={workdir} is not writable ({e.strerror}); choose another '
        'with --workdir=DIR'
    ) from e


def compile_for_tpu(config):
  """`--mode=compile`: the report of `aot.compile_report`, printed (and
  written with --json)."""
  if not FLAGS.topology:
    raise aot.CompileError('--mode=compile needs --topology, e.g. v5e-8')
  # jax 0.10.2 cannot read back what it caches of compile-only (topology)
  # programs ("PjRtCompiler must be constructed with a Client"): no writes.
  jax.config.update('jax_enable_compilation_cache', False)
  res = aot.compile_report(
      config, FLAGS.topology, FLAGS.max_compiles, FLAGS.compile_eval
  )
  aot.print_report(res)
  if FLAGS.json:
    aot.write_json(res, FLAGS.json)


def run(config, workdir, mode):
  if mode == 'compile':
    return compile_for_tpu(config)
  runtime.check_config(config)
  check_workdir(workdir)
  if config.data.synthetic.enabled:
    ensure = (
        synthetic_avss.ensure_synthetic_data
        if config.data.setting == 'avss'
        else synthetic.ensure_synthetic_data
    )
    if jax.process_index() == 0:
      ensure(config)
    utils.barrier('synthetic data')  # made by process 0
    ensure(config)  # checks what is there
  if mode == 'train':
    results = train.train_and_evaluate(config, workdir)
    # None: preempted (SIGTERM), saved; exit now, the re-run reports.
    if results is not None and config.data.synthetic.enabled:
      evaluate.report(config, workdir, results)
  elif mode == 'eval':
    evaluate.evaluate_checkpoint(
        config, workdir, config.eval.restore or workdir
    )
  else:
    predict.predict_video(config, workdir)


def main(argv):
  del argv
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if _multi_host():
    try:
      runtime.initialize_distributed(
          FLAGS.coordinator_address,
          FLAGS.num_processes,
          FLAGS.process_id,
          heartbeat_timeout=FLAGS.heartbeat_timeout,
      )
    except ValueError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
  try:
    config = load_config()
    name = os.path.basename(config_flags.get_config_filename(FLAGS['config']))
    workdir = FLAGS.workdir or os.path.join('workdirs', name.split('.')[0])
    run(config, workdir, FLAGS.mode)
    if runtime.Heartbeats.current:
      runtime.Heartbeats.current.stop(finished=True)
  except USER_ERRORS as e:
    _exit(f'error: {e}', 1)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1 or not any(m in str(e) for m in _PEER_FAILURE):
      raise
    _exit(runtime.peer_failure_message(e), 3)


def _exit(line, code):
  """Prints `line` and exits. With several processes, at once: a normal exit
  waits at JAX's shutdown barrier (300 s) for peers that may be dead."""
  print(line, file=sys.stderr, flush=True)
  if runtime.Heartbeats.current:  # several processes
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def parse_flags(argv):
  """absl's flag parsing; a config override of a missing field is one line."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # `--config.a.b=v`, no field a.b
    key = str(e).split("'")[1] if "'" in str(e) else str(e)
    given = [
        a.split('=')[0]
        for a in argv[1:]
        if a.startswith('--config.') and key in a.split('=')[0]
    ]
    print(
        f'error: {" ".join(given) or key}: no such config field (the fields '
        'are in configs/common.py)',
        file=sys.stderr,
    )
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
