"""S4 (single sound source): the reference recipe, ResNet-50.

python run.py --config=configs/s4.py --workdir=workdirs/s4
python run.py --config=configs/s4.py:pvt_v2_b5 --workdir=workdirs/s4_pvt
"""

from configs import common


def get_config(arg=None):
  c = common.base_config()
  c.data.setting = 's4'
  c.train.num_epochs = 15
  c.train.batch_size = 4
  if arg:
    c.model.backbone = arg
  return c
