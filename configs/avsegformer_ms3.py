"""AVSegFormer on MS3: the reference `config/ms3/AVSegFormer_{res50,pvt2}_ms3.py`.

As `configs/avsegformer_s4.py`, with the dice and mix losses on every frame,
60 epochs, the backbone frozen for the first 10.

  python run.py --config=configs/avsegformer_ms3.py:pvt_v2_b5 ...
"""

from configs.avsegformer_s4 import avsegformer_config


def get_config(arg=None):
  return avsegformer_config('ms3', arg, num_epochs=60, freeze_epochs=10)
