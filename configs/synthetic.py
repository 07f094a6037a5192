"""The embedded demo: synthetic AVSBench (multi-source), small model, CPU.

  python run.py --config=configs/synthetic.py

Generates the synthetic dataset and its shards under data/ if absent, trains
a small ResNet (`resnet_tiny`) from scratch at 64x64 with the reference's
ASPP, TPAVI and decoder (32 channels) and the MS3 loss, evaluates with true,
shuffled and silent audio and writes a report to the workdir. VGGish has
random frozen weights (no AudioSet weights here) and runs once per clip
(`audio.precompute`).
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
  c.data.synthetic.clips = 2000  # 1400 train / 300 val / 300 test
  c.data.synthetic.size = 64
  c.data.synthetic.seed = 0

  c.model.backbone = 'resnet_tiny'
  c.model.channels = 32
  c.model.head_channels = 16
  c.audio.precompute = True  # VGGish is 80% of this small model's step

  c.train.batch_size = 8
  # 1,400 steps at 1e-3 (cosine): validation J levels off from ~step 1,050
  # (0.812, 0.813, 0.815 at epochs 6-8), so the figure is a plateau, not a
  # point on a rising curve that rounding shifts; 3e-3 for 2,100 steps was
  # still rising at the end (0.58, 0.62) and moved with every change of
  # float32 summation order (0.784 / 0.720 / 0.646).
  c.train.num_epochs = 8
  c.train.eval_every_epochs = 2
  c.train.lr = 1e-3
  c.train.schedule = 'cosine'
  c.train.warmup_steps = 20
  c.train.log_every = 10
  c.loss.avm_weight = 0.5
  c.loss.avm_stages = (0, 1, 2, 3)
  c.eval.batch_size = 8
  c.eval.save_overlays = True
  return c
