"""The AVS model: encoder -> ASPP per stage -> TPAVI -> progressive decoder.

One clip of T frames is `[B, T, H, W, 3]` with audio embeddings `[B, T, 128]`.
Module names mirror the reference `Pred_endecoder` so checkpoints convert by
name (see `avs_jax.convert`).
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from avs_jax.models import pvt
from avs_jax.models.layers import Dtype, Upsample2xConv3x3, conv, pixel_shuffle, upsample2x
from avs_jax.models import resnet
from avs_jax.models.tpavi import TPAVI

DILATIONS = (3, 6, 12, 18)


class ASPP(nn.Module):
  """The reference's `Classifier_Module`: sum of 4 dilated 3x3 convs."""

  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(0.01)  # the reference's init of these
    return sum(
        conv(
            self.channels,
            3,
            1,
            d,
            d,
            dtype=self.dtype,
            kernel_init=init,
            name=f'conv2d_list_{i}',
        )(x)
        for i, d in enumerate(DILATIONS)
    )


class ResidualConvUnit(nn.Module):
  """`conv2(relu(conv1(relu(x)))) + relu(x)`: the reference's ReLU is in place."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = nn.relu(x)
    y = conv(c, 3, 1, 1, dtype=self.dtype, name='conv1')(x)
    y = conv(c, 3, 1, 1, dtype=self.dtype, name='conv2')(nn.relu(y))
    return y + x


class FeatureFusionBlock(nn.Module):
  """`up2x(rcu2(x + rcu1(skip)))`, bilinear with align_corners=True
  (`upsample=False`: without the `up2x`, for a caller that fuses it)."""

  dtype: Dtype = jnp.float32
  upsample: bool = True

  @nn.compact
  def __call__(self, x, skip=None):
    rcu1 = ResidualConvUnit(self.dtype, name='resConfUnit1')
    if skip is not None:
      x = x + rcu1(skip)
    elif self.is_initializing():
      rcu1(x)  # path4's is never used, but it is in every checkpoint.
    x = ResidualConvUnit(self.dtype, name='resConfUnit2')(x)
    return upsample2x(x, align_corners=True) if self.upsample else x


class AVSModel(nn.Module):
  """Audio-visual segmentation.

  Attributes mirror the config's `model` section. `__call__(frames
  [B, T, H, W, 3], audio [B, T, 128], train, frame_mask)` returns a dict with
  `logits` `[B, T, H, W]` (float32; `[B, T, H, W, K]` when `num_classes` K > 1),
  `visual_maps` (4 x `[B, T, h, w, C]`, the fused maps after the decoder's
  in-place ReLU, what the AVM loss consumes) and `audio_features`
  (4 x `[B, T, C]` or None, audio after each TPAVI's `align_channel`).

  The AVSS variant of the reference (`avs_scripts/avss`) is this model with
  `num_classes=71`, `align_bias=False`, `tpavi_group=5` and a `frame_mask`
  `[B, T]` (1 for real frames, 0 for the padding of 5-frame clips to 10): the
  audio (the reference's train/test loops), the ASPP maps, each TPAVI output,
  each decoder stage and the logits are multiplied by it. `tpavi_group=5`:
  the reference reshapes frames to `[-1, 5]` before TPAVI whatever the clip
  length, so a 10-frame clip is two independent 5-frame TPAVI groups.
  `tpavi_group=0` (S4/MS3) attends over the whole clip; a clip of at most
  `tpavi_group` frames is one group.
  """

  backbone: str = 'resnet50'
  channels: int = 256
  tpavi_stages: Sequence[int] = (0, 1, 2, 3)
  tpavi_mode: str = 'dot'
  tpavi_vv: bool = False
  tpavi_va: bool = True
  head_channels: int = 128
  num_classes: int = 1
  align_bias: bool = True
  tpavi_group: int = 0
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, frames, audio=None, train: bool = False, frame_mask=None):
    # long: the reference's forward (encoder, ASPP, TPAVI per stage, decoder,
    # head) top to bottom, as the golden tests compare it stage by stage.
    b, t, h, w, _ = frames.shape
    g = self.tpavi_group if 0 < self.tpavi_group < t else t
    if t % g:
      raise ValueError(
          f'clip length {t} is not a multiple of tpavi_group '
          f'{self.tpavi_group}'
      )
    if frame_mask is not None:
      if frame_mask.shape != (b, t):
        raise ValueError(
            f'frame_mask must be [B, T] = {(b, t)}, got ' f'{frame_mask.shape}'
        )
      fm = frame_mask.astype(self.dtype)
      mask5 = fm.reshape(b, t, 1, 1, 1)  # on [B, T, h, w, C]
      mask4 = fm.reshape(b * t, 1, 1, 1)  # on [B*T, h, w, C]
      if audio is not None:
        audio = audio * fm[..., None].astype(audio.dtype)
    else:
      mask5 = mask4 = None
    apply_mask = lambda x, m: x if m is None else x * m
    if h % 32 or w % 32:
      raise ValueError(f'frame size must be a multiple of 32, got {h}x{w}')
    if self.tpavi_stages and not (self.tpavi_vv or self.tpavi_va):
      raise ValueError(
          'tpavi_stages is set but both tpavi_vv and tpavi_va '
          'are False: enable at least one'
      )
    if self.tpavi_va and self.tpavi_stages and audio is None:
      raise ValueError('tpavi_va needs audio embeddings [B, T, 128]')

    x = frames.reshape(b * t, h, w, 3).astype(self.dtype)
    if self.backbone in resnet.SPECS:
      blocks, width = resnet.SPECS[self.backbone]
      feats = resnet.ResNet(blocks, width, train, self.dtype, name='resnet')(x)
    elif self.backbone in pvt.SPECS:
      feats = pvt.PVTv2(
          pvt.SPECS[self.backbone],
          train,
          self.remat,
          self.dtype,
          name='encoder_backbone',
      )(x)
    else:
      raise ValueError(
          f'unknown backbone {self.backbone!r}; choose one of '
          f'{sorted(resnet.SPECS) + sorted(pvt.SPECS)}'
      )

    maps = [
        ASPP(self.channels, self.dtype, name=f'conv{i + 1}')(f)
        for i, f in enumerate(feats)
    ]
    maps = [apply_mask(m.reshape((b, t) + m.shape[1:]), mask5) for m in maps]
    audio_features = [None] * 4
    grouped = lambda x: x.reshape((b * t // g, g) + x.shape[2:])
    ungrouped = lambda x: x.reshape((b, t) + x.shape[2:])
    for i in self.tpavi_stages:
      block = TPAVI(
          self.tpavi_mode,
          train,
          self.dtype,
          self.align_bias,
          name=f'tpavi_b{i + 1}',
      )
      outs = []
      if self.tpavi_vv:
        z = ungrouped(block(grouped(maps[i]))[0])
        outs.append(apply_mask(z, mask5))
      if self.tpavi_va:
        z, a_fea = block(grouped(maps[i]), grouped(audio))
        audio_features[i] = ungrouped(a_fea)
        outs.append(apply_mask(ungrouped(z), mask5))
      maps[i] = sum(outs) / len(outs)

    # The decoder's in-place ReLU rewrites every fused map: keep that view.
    maps = [nn.relu(m) for m in maps]
    flat = [m.reshape((b * t,) + m.shape[2:]) for m in maps]
    y = apply_mask(FeatureFusionBlock(self.dtype, name='path4')(flat[3]), mask4)
    y = apply_mask(
        FeatureFusionBlock(self.dtype, name='path3')(y, flat[2]), mask4
    )
    y = apply_mask(
        FeatureFusionBlock(self.dtype, name='path2')(y, flat[1]), mask4
    )
    path1 = FeatureFusionBlock(self.dtype, upsample=False, name='path1')
    y = apply_mask(path1(y, flat[0]), mask4)  # the mask commutes with up2x
    # path1's upsample2x(align_corners=True), then output_conv_0's 3x3 conv:
    # its channels mixed on path1's grid (2.6x fewer FLOPs).
    y = Upsample2xConv3x3(
        self.head_channels, self.dtype, align_corners=True, name='output_conv_0'
    )(y)
    # upsample2x(align_corners=False), then a 3x3 conv: on the input's grid,
    # as the 2x map's four phases [N, H, W, 2, 2, 32]; the ReLU and the 1x1
    # conv (on the phase axes as a 2x2 map) run on them before the shuffle.
    y = nn.relu(Upsample2xConv3x3(32, self.dtype, name='output_conv_2')(y))
    y = conv(self.num_classes, 1, dtype=self.dtype, name='output_conv_4')(y)
    y = pixel_shuffle(y)
    y = apply_mask(y, mask4)
    if self.num_classes == 1:
      logits = y.reshape(b, t, h, w).astype(jnp.float32)
    else:
      logits = y.reshape(b, t, h, w, self.num_classes).astype(jnp.float32)
    return {
        'logits': logits,
        'visual_maps': maps,
        'audio_features': audio_features,
    }


def build_model(model_config, *, dtype=jnp.float32, remat=False) -> AVSModel:
  """The AVS model from a config's `model` section (an `ml_collections` dict)."""
  return AVSModel(
      backbone=model_config.backbone,
      channels=model_config.channels,
      tpavi_stages=tuple(model_config.tpavi_stages),
      tpavi_mode=model_config.tpavi_mode,
      tpavi_vv=model_config.tpavi_vv,
      tpavi_va=model_config.tpavi_va,
      head_channels=model_config.get('head_channels', 128),
      num_classes=model_config.get('num_classes', 1),
      align_bias=model_config.get('align_bias', True),
      tpavi_group=model_config.get('tpavi_group', 0),
      remat=remat,
      dtype=dtype,
  )
