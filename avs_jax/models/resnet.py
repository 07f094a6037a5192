"""ResNet-50 (and a tiny sibling) encoder in the reference's "B2_ResNet" layout (NHWC).

The reference builds two branches after `layer2` and uses only the first
(`layer3_1`, `layer4_1`); the unused `layer3_2`/`layer4_2` are not built here
(the converter drops them from checkpoints and refills them on the way back).
"""

import flax.linen as nn
import jax.numpy as jnp

from avs_jax.models.layers import BatchNorm, Dtype, conv


class Bottleneck(nn.Module):
  """torchvision Bottleneck v1 (stride on the 3x3 conv)."""

  planes: int
  stride: int = 1
  downsample: bool = False
  train: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    bn = lambda name: BatchNorm(not self.train, dtype=self.dtype, name=name)
    y = conv(self.planes, 1, use_bias=False, dtype=self.dtype, name='conv1')(x)
    y = nn.relu(bn('bn1')(y))
    y = conv(
        self.planes,
        3,
        self.stride,
        1,
        use_bias=False,
        dtype=self.dtype,
        name='conv2',
    )(y)
    y = nn.relu(bn('bn2')(y))
    y = conv(
        self.planes * 4, 1, use_bias=False, dtype=self.dtype, name='conv3'
    )(y)
    y = bn('bn3')(y)
    if self.downsample:
      x = conv(
          self.planes * 4,
          1,
          self.stride,
          use_bias=False,
          dtype=self.dtype,
          name='downsample_0',
      )(x)
      x = bn('downsample_1')(x)
    return nn.relu(y + x)


# Blocks per stage and stem width. 'resnet_tiny' (no ImageNet weights) is the
# same network, narrow and shallow, for the CPU demo and fast tests.
SPECS = {
    'resnet50': ((3, 4, 6, 3), 64),
    'resnet_tiny': ((1, 1, 1, 1), 16),
}


class ResNet(nn.Module):
  """`[N, H, W, 3]` -> 4 stages `[N, H/4, W/4, 4w]` ... `[N, H/32, W/32, 32w]`.

  w is the stem width (64 for ResNet-50: 256 ... 2048 channels).
  """

  blocks: tuple = SPECS['resnet50'][0]
  width: int = SPECS['resnet50'][1]
  train: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    w = self.width
    x = conv(w, 7, 2, 3, use_bias=False, dtype=self.dtype, name='conv1')(x)
    x = nn.relu(BatchNorm(not self.train, dtype=self.dtype, name='bn1')(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    feats = []
    for name, planes, blocks, stride in zip(
        ('layer1', 'layer2', 'layer3_1', 'layer4_1'),
        (w, 2 * w, 4 * w, 8 * w),
        self.blocks,
        (1, 2, 2, 2),
    ):
      for i in range(blocks):
        x = Bottleneck(
            planes,
            stride if i == 0 else 1,
            downsample=i == 0,
            train=self.train,
            dtype=self.dtype,
            name=f'{name}_{i}',
        )(x)
      feats.append(x)
    return feats
