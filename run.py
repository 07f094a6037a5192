r"""avs_jax entry point: train, evaluate or predict with an ml_collections config.

  python run.py --config=configs/synthetic.py                  # the CPU demo
  python run.py --config=configs/ms3.py --workdir=workdirs/ms3 \
      --config.train.batch_size=8                              # train (resumes)
  python run.py --mode=eval --config=configs/ms3.py --workdir=workdirs/ms3
  python run.py --mode=predict --config=configs/ms3.py \
      --config.predict.video=clip.mp4 --config.predict.restore=workdirs/ms3
"""
import os
import sys

from avs_jax.xla_flags import set_xla_flags

set_xla_flags()  # before JAX starts: XLA:CPU's faster convolutions (a no-op elsewhere)

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                lock_config=True)
flags.mark_flags_as_required(['config'])
flags.DEFINE_string('workdir', None, 'Checkpoints, logs and results. Default: '
                    'workdirs/<config file name>.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict'],
                  'train (then test the best checkpoint), eval, or predict.')
flags.DEFINE_enum('distributed', 'auto', ['auto', 'yes', 'no'],
                  'Call jax.distributed.initialize() (multi-host; auto: when '
                  'a TPU pod / cluster environment is detected).')
FLAGS = flags.FLAGS

_CLUSTER_ENV = ('TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS',
                'JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS')


def main(argv):
  del argv
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  import jax  # pylint: disable=g-import-not-at-top
  multi = FLAGS.distributed == 'yes' or (
      FLAGS.distributed == 'auto' and any(
          len(os.environ.get(k, '').split(',')) > 1 or
          (k != 'TPU_WORKER_HOSTNAMES' and os.environ.get(k))
          for k in _CLUSTER_ENV))
  if multi:
    jax.distributed.initialize()
  from avs_jax import convert, demo, evaluate, predict, train  # pylint: disable=g-import-not-at-top

  config = FLAGS.config
  name = os.path.splitext(os.path.basename(
      config_flags.get_config_filename(FLAGS['config'])))[0]
  workdir = FLAGS.workdir or os.path.join('workdirs', name)
  try:
    if config.data.synthetic.enabled:
      demo.ensure_synthetic_data(config)
    if FLAGS.mode == 'train':
      results = train.train_and_evaluate(config, workdir)
      # None: preempted (SIGTERM), saved; exit now, the re-run reports.
      if results is not None and config.data.synthetic.enabled:
        demo.report(config, workdir)
    elif FLAGS.mode == 'eval':
      evaluate.evaluate_checkpoint(config, workdir,
                                   config.eval.restore or workdir)
    else:
      predict.predict_video(config, workdir)
  except (predict.VideoError, convert.ConversionError,
          demo.SyntheticDataError, FileNotFoundError) as e:
    # Bad input: one clear line, no traceback.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)

if __name__ == '__main__':
  app.run(main)
