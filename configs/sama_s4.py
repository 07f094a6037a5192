"""SAMA-AVS on S4: the reference `configs/sam_avs_adapter.yaml` + `train_avs.py`.

ViT-B by default; the encoder size is the argument (`:vit_b`, `:vit_l`,
`:vit_h`; the reference trains ViT-H). 1024 px frames (ImageNet mean/std),
SAM's ViT frozen but its audio prompt generator, mask decoder and
`no_mask_embed` trained (`avs_jax.projects.sama.train_mask`); loss `iou`
(BCE + soft IoU) at 1024 px; AdamW lr 2e-4 (PyTorch defaults: weight decay
0.01), cosine to 1e-7 over 80 epochs, stepped per epoch; batch 2 frames
(the reference's rank 0 trains alone: `train_avs.py:174` unwraps DDP).
docs/SAMA.md cites each choice.

  python run.py --config=configs/sama_s4.py:vit_h --workdir=workdirs/sama_s4 \
      --config.train.init_backbone=sam_vit_h_4b8939.pth \
      --config.audio.vggish_checkpoint=vggish-10086976.pth
"""

import ml_collections

from configs import common


def sama_config(setting, arg):
  """The shared SAMA-AVS recipe for `setting` ('s4' or 'ms3')."""
  c = common.base_config()
  c.model = ml_collections.ConfigDict(
      dict(
          name='sama',
          encoder=arg or 'vit_b',  # 'vit_b' | 'vit_l' | 'vit_h' | 'custom'
          image_size=1024,
          patch_size=16,
          window_size=14,
          prompt_embed_dim=256,
          attention='dot_product',  # 'dot_product' | 'einsum'
          # Global blocks: queries in chunks of 16 of the 64 token rows, so
          # their [4096, 4096] logits and bias are never whole (exact).
          attention_rows=16,
      )
  )
  c.data.setting = setting
  c.data.image_size = 1024
  c.train.batch_size = 2
  c.train.num_epochs = 80
  c.train.lr = 2e-4
  c.train.schedule = 'cosine_per_epoch'  # CosineAnnealingLR, eta_min 1e-7
  c.train.lr_min = 1e-7
  c.train.weight_decay = 0.01  # torch.optim.AdamW's default
  c.train.init_backbone = ''  # SAM's release, e.g. sam_vit_h_4b8939.pth
  c.train.freeze = True  # SAM's ViT frozen but the audio prompt generator
  c.loss = ml_collections.ConfigDict(dict(kind='sama', loss='iou'))
  c.eval.batch_size = 1
  return c


def get_config(arg=None):
  return sama_config('s4', arg)
