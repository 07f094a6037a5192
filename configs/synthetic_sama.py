"""SAMA-AVS at toy size on the synthetic AVSBench (configs/synthetic.py's
data): a 4-block ViT (64-d, 4 heads, window 3 over the 4x4 token map, so
zero-padded, blocks 1 and 3 global) from scratch at 64 px, the mask decoder
at 64-d. From scratch nothing is
frozen: the frozen/trainable split is SAM's, meant for SAM's pretrained ViT.

  python run.py --config=configs/synthetic_sama.py --workdir=workdirs/synthetic_sama
"""

from configs import sama_s4
from configs import synthetic


def get_config(arg=None):
  del arg
  c = sama_s4.sama_config('ms3', 'custom')
  c.data = synthetic.get_config().data
  c.audio = synthetic.get_config().audio
  c.model.update(
      image_size=64,
      window_size=3,
      embed_dim=64,
      depth=4,
      num_heads=4,
      global_attn=(1, 3),
      prompt_embed_dim=64,
  )
  c.train.freeze = False  # all parameters train (no SAM weights)
  c.train.batch_size = 8
  c.train.num_epochs = 8
  c.train.lr = 1e-3
  return c
