"""The embedded demo: synthetic AVSBench (multi-source), small model, CPU.

  python run.py --config=configs/synthetic.py

Generates the synthetic dataset and its shards under data/ if absent, trains
PVT-v2-b0 at 64x64, evaluates with true, shuffled and silent audio and
writes a report to the workdir.
"""
from configs import common


def get_config(arg=None):
  del arg
  c = common.base_config()
  c.data.setting = 'ms3'
  c.data.dir = 'data/synthetic_tfds'
  c.data.image_size = 64
  c.data.num_workers = 0
  c.data.synthetic.enabled = True
  c.data.synthetic.root = 'data/synthetic_avsbench'
  c.data.synthetic.clips = 400
  c.data.synthetic.size = 64
  c.data.synthetic.seed = 0

  c.model.backbone = 'pvt_v2_b0'
  c.model.channels = 64

  c.train.batch_size = 8
  c.train.num_epochs = 12
  c.train.lr = 1e-3
  c.train.schedule = 'cosine'
  c.train.warmup_steps = 20
  c.train.log_every = 10
  c.loss.avm_weight = 0.5
  c.loss.avm_stages = (0, 1, 2, 3)
  c.eval.batch_size = 8
  c.eval.save_overlays = True
  return c
