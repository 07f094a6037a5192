"""VGGish (torchvggish layout), NHWC: log-mel `[..., 96, 64]` -> `[..., 128]`.

Submodule names mirror the PyTorch state_dict (`features.3.weight` ->
`features_3/kernel`), so checkpoints convert by name. The optional AudioSet
PCA/quantisation post-processing reads the non-trainable collection
`'pca'`: `eigen_vectors [128, 128]`, `means [128]`.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

# (torch index in `features`, channels); a 2x2 max-pool follows the marked ones.
_CONVS = (
    (0, 64, True),
    (3, 128, True),
    (6, 256, False),
    (8, 256, True),
    (11, 512, False),
    (13, 512, True),
)
QUANTIZE_MIN, QUANTIZE_MAX = -2.0, 2.0


class VGGish(nn.Module):
  """`[..., 96, 64]` log-mel examples -> `[..., 128]` float32 embeddings.

  Without post-processing the output is the final ReLU of the embedding MLP;
  with it, `round((clip(E (x - mean), -2, 2) + 2) * 255 / 4)` in [0, 255].
  `dtype` is the compute dtype; parameters stay float32.
  """

  postprocess: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch_shape = x.shape[:-2]
    x = jnp.asarray(x, self.dtype).reshape((-1,) + x.shape[-2:] + (1,))
    for idx, ch, pool in _CONVS:
      x = nn.Conv(
          ch, (3, 3), padding=1, dtype=self.dtype, name=f'features_{idx}'
      )(x)
      x = nn.relu(x)
      if pool:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)  # [N, 6*4*512], (H, W, C) order as torch.
    for idx, ch in ((0, 4096), (2, 4096), (4, 128)):
      x = nn.relu(nn.Dense(ch, dtype=self.dtype, name=f'embeddings_{idx}')(x))
    x = x.astype(jnp.float32)
    if self.postprocess:
      x = self._postprocess(x)
    return x.reshape(batch_shape + (x.shape[-1],))

  def _postprocess(self, x):
    """`[N, 128]` -> PCA-whitened, clipped, 8-bit-quantised `[N, 128]`."""
    d = x.shape[-1]
    eig = self.variable('pca', 'eigen_vectors', jnp.eye, d, dtype=jnp.float32)
    mean = self.variable('pca', 'means', jnp.zeros, (d,), jnp.float32)
    y = jnp.matmul(x - mean.value, eig.value.T, precision='highest')
    y = jnp.clip(y, QUANTIZE_MIN, QUANTIZE_MAX)
    scale = 255.0 / (QUANTIZE_MAX - QUANTIZE_MIN)
    return jnp.round((y - QUANTIZE_MIN) * scale)


def build_vggish(postprocess=False, dtype=jnp.float32):
  """The VGGish module; see `VGGish`."""
  return VGGish(postprocess=postprocess, dtype=dtype)
