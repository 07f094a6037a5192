"""AVSS (AVSBench-semantic, 71 classes): the reference `avs_scripts/avss` recipe.

PVT-v2-b5 (its train.sh; `resnet50` as the argument for the ResNet variant),
TPAVI on stages 0-3 in groups of 5 frames, align_channel without bias, a
71-class head, 10-frame clips (5-frame v1 clips padded, with a frame mask),
cross-entropy + 0.5 AVM-AV (KL), Adam 1e-4, batch 4, 60 epochs, validation
from epoch 15 every 2 epochs, best checkpoint by val mIoU.

  python run.py --config=configs/avss.py --workdir=workdirs/avss
  python run.py --config=configs/avss.py:resnet50 --workdir=workdirs/avss_r50

The official AVSS checkpoint converts with `avs_jax.avss.torch_to_flax`.
"""

from configs import common

from avs_jax import avss


def get_config(arg=None):
  c = common.base_config()
  c.model.backbone = arg or 'pvt_v2_b5'
  c.model.num_classes = avss.NUM_CLASSES  # 70 categories + background (0)
  c.model.align_bias = False  # TPAVI align_channel, bias=False
  c.model.tpavi_group = 5  # reference reshape(-1, 5, ...)
  c.data.setting = 'avss'
  c.data.dir = 'data/avss_tfds'  # --out of data_prep.avss
  c.data.frames_per_clip = avss.FRAMES_PER_CLIP
  c.data.label2idx = ''  # label2idx.json: class names
  c.train.batch_size = 4
  c.train.num_epochs = 60
  c.train.lr = 1e-4
  c.train.eval_start_epoch = 15  # reference --start_eval_epoch
  c.train.eval_every_epochs = 2  # reference --eval_interval
  c.train.best_metric = 'miou'  # over all 71 classes (test.py)
  c.loss.kind = 'avss'  # cross-entropy (+ AVM), not BCE
  c.loss.avm_weight = 0.5
  c.loss.avm_stages = (0, 1, 2, 3)
  c.loss.avm_loss = 'kl'
  c.eval.batch_size = 4
  return c
