"""Defaults shared by the configs; each config file edits a copy."""

import ml_collections


def base_config():
  """The reference's S4 recipe on AVSBench (ResNet-50, TPAVI on stages 0-3)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The reference's model options, plus head_channels (fixed at 128 there).
  c.model = ml_collections.ConfigDict(
      dict(
          backbone='resnet50',  # 'resnet50' | 'pvt_v2_b0' ... 'pvt_v2_b5' | 'resnet_tiny'
          channels=256,
          head_channels=128,  # the output head's first conv (reference: 128)
          tpavi_stages=(0, 1, 2, 3),
          tpavi_mode='dot',  # 'dot' | 'embedded' | 'gaussian' | 'concatenate'
          tpavi_vv=False,
          tpavi_va=True,
      )
  )

  c.data = ml_collections.ConfigDict(
      dict(
          dir='data/avsbench_tfds',  # the --out of `python -m data_prep.avsbench`
          setting='s4',  # 's4' | 'ms3' | 'avss'
          label2idx='',  # AVSS class names (default: the shards' class_names.json)
          image_size=224,
          num_workers=4,  # grain worker processes per host (0: inline)
          synthetic=ml_collections.ConfigDict(
              dict(
                  enabled=False,  # generate + prepare the synthetic set if absent
                  root='',
                  clips=0,
                  size=0,
                  seed=0,
              )
          ),
      )
  )

  # Frozen VGGish (AudioSet weights). Empty path: random weights (demo only).
  c.audio = ml_collections.ConfigDict(
      dict(
          vggish_checkpoint='',  # vggish-10086976.pth (.npz/.safetensors)
          pca_checkpoint='',  # vggish_pca_params-970ea276.pth, if postprocess
          postprocess=False,  # the reference trains without PCA
          precompute=False,  # train: run VGGish once per clip, not per step
      )
  )

  c.train = ml_collections.ConfigDict(
      dict(
          batch_size=4,  # global, in clips (the reference: 4)
          num_epochs=15,
          num_steps=-1,  # > 0 overrides num_epochs
          lr=1e-4,  # Adam, PyTorch defaults otherwise
          schedule='constant',  # 'constant' | 'cosine'
          warmup_steps=0,
          weight_decay=0.0,  # > 0: AdamW (decoupled)
          grad_clip=0.0,  # > 0: clip by global norm
          accum_steps=1,  # gradient accumulation
          dtype='float32',  # 'float32' | 'bfloat16' compute; params stay f32
          fsdp=False,  # shard params/opt state over the data axis
          remat=False,  # rematerialise PVT blocks (large batches)
          init_backbone='',  # ImageNet weights: resnet50-19c8e357.pth / pvt_v2_b5.pth
          init_from='',  # a checkpoint dir/step to start from (e.g. S4 for MS3)
          log_every=50,
          checkpoint_every=0,  # steps; 0: at each validation (every epoch)
          eval_every_epochs=1,
          eval_start_epoch=0,  # no validation before this epoch (AVSS: 15)
          keep=2,  # last K checkpoints kept, plus the best by val J
      )
  )

  c.loss = ml_collections.ConfigDict(
      dict(
          kind='bce',  # 'bce' (S4/MS3) | 'avss' (cross-entropy over classes)
          avm_weight=0.0,  # lambda; MS3: 0.5
          avm_stages=(),  # MS3: (0, 1, 2, 3)
          avm_loss='kl',  # 'kl' | 'euclidean'
          avm_closer=False,  # AVM-VV ("closer") instead of AVM-AV
          avm_norm=False,
          avm_threshold=False,
          avm_pooling='avg',
      )
  )

  c.eval = ml_collections.ConfigDict(
      dict(
          batch_size=4,
          split='test',  # --mode eval evaluates this split
          val_split='val',
          audio='true',  # 'true' | 'shuffled' | 'silent'
          restore='',  # checkpoint dir (or .../STEP) for --mode eval
          save_masks=False,  # predicted masks as PNG
          save_overlays=False,  # mask-over-frame overlays as PNG
      )
  )

  c.predict = ml_collections.ConfigDict(
      dict(
          video='',  # any video with sound
          restore='',  # checkpoint dir (or .../STEP)
          out='',  # default: WORKDIR/predict/<video name>
          mask_size='video',  # mask PNGs at the 'video' size or the 'model' size
      )
  )
  return c
