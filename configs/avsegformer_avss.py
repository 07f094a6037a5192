"""AVSegFormer on AVSS: the reference `config/avss/AVSegFormer_{res50,pvt2}_avss.py`.

The data of `configs/avss.py` (10-frame clips, 71 classes, frame masks) with
the AVSegFormer model (PVT-v2-b5 by default, `resnet50` as the argument):
per-pixel cross-entropy on the labelled frames + 0.1 x a dice mix loss
against the foreground; AdamW lr 2e-5 (weight decay 0.01), batch 4,
30 epochs, validation from epoch 10 every 2, no backbone freezing.

  python run.py --config=configs/avsegformer_avss.py --workdir=workdirs/avsf_avss
"""

from avs_jax import avss as avss_lib
from configs import avss
from configs.avsegformer_s4 import avsegformer_config


def get_config(arg=None):
  c = avss.get_config(arg)
  ours = avsegformer_config('avss', arg or 'pvt_v2_b5', 30, 0)
  c.model = ours.model
  c.model.num_classes = avss_lib.NUM_CLASSES
  c.loss = ours.loss
  c.train.lr = ours.train.lr
  c.train.weight_decay = ours.train.weight_decay
  c.train.freeze_backbone_epochs = 0
  c.train.num_epochs = 30
  c.train.eval_start_epoch = 10
  c.train.eval_every_epochs = 2
  c.train.batch_size = 4
  c.eval.batch_size = 4
  return c
