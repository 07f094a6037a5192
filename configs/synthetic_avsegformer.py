"""The AVSegFormer demo: synthetic AVSBench (multi-source), small model, CPU.

  python run.py --config=configs/synthetic_avsegformer.py \
      --workdir=workdirs/synthetic_avsegformer

The data of `configs/synthetic.py` (MS3, 64x64, made on demand) with a small
AVSegFormer (`resnet_tiny` from scratch, 32-d embeddings, 16 queries, two
layers each in the query generator, deformable encoder and decoder) and the
reference's MS3 loss (dice + 0.1 x the mix loss); AdamW with weight decay
0.01 as the reference, at a larger learning rate for training from scratch
and no frozen backbone (it is not pretrained). Evaluates with true,
shuffled and silent audio and writes a report to the workdir.
"""

from configs import synthetic
from configs.avsegformer_s4 import avsegformer_config


def get_config(arg=None):
  del arg
  c = synthetic.get_config()
  ours = avsegformer_config('ms3', 'resnet_tiny', 12, 0)
  c.model = ours.model
  c.model.update(
      query_num=16,
      embed_dim=32,  # GroupNorm(32) needs a multiple of 32
      num_layers=2,
      generator_layers=2,
      ffn_dim=128,
      mlp_dim=64,
      dropout=0.0,
  )
  c.loss = ours.loss
  c.train.weight_decay = ours.train.weight_decay
  c.train.freeze_backbone_epochs = 0
  c.train.lr = 1e-3
  return c
