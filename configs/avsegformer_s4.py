"""AVSegFormer on S4: the reference `config/s4/AVSegFormer_{res50,pvt2}_s4.py`.

ResNet-50 by default, PVT-v2-b5 as the argument. 300 queries, 6-layer query
generator, deformable encoder and decoder (dropout 0.1), cross-modal mixer;
loss: dice on each clip's first frame + 0.1 x the mix (dice) loss on the
mask feature; AdamW lr 2e-5 (PyTorch defaults: weight decay 0.01), batch 2,
30 epochs, the backbone frozen for the first 5.

  python run.py --config=configs/avsegformer_s4.py --workdir=workdirs/avsf_s4
  python run.py --config=configs/avsegformer_s4.py:pvt_v2_b5 ...

A released checkpoint converts with `python -m avs_jax.convert` and this config.
"""

import ml_collections

from configs import common


def avsegformer_config(setting, arg, num_epochs, freeze_epochs):
  """The shared AVSegFormer recipe for `setting` ('s4' or 'ms3')."""
  c = common.base_config()
  c.model = ml_collections.ConfigDict(
      dict(
          name='avsegformer',
          backbone=arg
          or 'resnet50',  # 'resnet50' | 'pvt_v2_b5' (| other PVT-v2)
          num_classes=1,
          query_num=300,
          embed_dim=256,
          num_layers=6,  # deformable encoder and decoder layers
          generator_layers=6,  # query generator (AttentionGenerator)
          ffn_dim=2048,
          dropout=0.1,
      )
  )
  c.data.setting = setting
  c.train.batch_size = 2
  c.train.num_epochs = num_epochs
  c.train.lr = 2e-5
  c.train.weight_decay = 0.01  # torch.optim.AdamW's default
  c.train.freeze_backbone_epochs = freeze_epochs
  c.loss = ml_collections.ConfigDict(
      dict(
          kind='avsegformer',
          loss_type='dice',  # 'dice' | 'bce'
          iou_weight=1.0,
          mix_weight=0.1,
      )
  )
  c.eval.batch_size = 2
  return c


def get_config(arg=None):
  return avsegformer_config('s4', arg, num_epochs=30, freeze_epochs=5)
