"""MS3 (multiple sound sources): S4's recipe + AVM-AV KL (lambda 0.5), 30 epochs.

  python run.py --config=configs/ms3.py --workdir=workdirs/ms3 \
      --config.train.init_from=workdirs/s4/checkpoints   # optional
"""

from configs import common


def get_config(arg=None):
  c = common.base_config()
  c.data.setting = 'ms3'
  c.train.num_epochs = 30
  c.train.batch_size = 4
  c.loss.avm_weight = 0.5
  c.loss.avm_stages = (0, 1, 2, 3)
  if arg:
    c.model.backbone = arg
  return c
