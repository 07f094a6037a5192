"""PVT-v2 (Wang et al., 2022) encoders b0-b5, NHWC, as the AVS reference uses.

LayerNorm eps: 1e-6 in blocks and stage norms, 1e-5 (PyTorch's default) in
the patch embeddings and the spatial-reduction norm. GELU is the exact (erf)
one. Stochastic depth rises linearly from 0 to `drop_path_rate` over blocks.
"""
import dataclasses
from typing import Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from avs_jax.models.layers import DropPath, Dtype, conv


@dataclasses.dataclass(frozen=True)
class PVTSpec:
  embed_dims: Tuple[int, ...]
  num_heads: Tuple[int, ...]
  mlp_ratios: Tuple[int, ...]
  depths: Tuple[int, ...]
  sr_ratios: Tuple[int, ...] = (8, 4, 2, 1)
  drop_path_rate: float = 0.1


_WIDE = (64, 128, 320, 512)
_HEADS = (1, 2, 5, 8)
SPECS = {
    'pvt_v2_b0': PVTSpec((32, 64, 160, 256), _HEADS, (8, 8, 4, 4), (2, 2, 2, 2)),
    'pvt_v2_b1': PVTSpec(_WIDE, _HEADS, (8, 8, 4, 4), (2, 2, 2, 2)),
    'pvt_v2_b2': PVTSpec(_WIDE, _HEADS, (8, 8, 4, 4), (3, 4, 6, 3)),
    'pvt_v2_b3': PVTSpec(_WIDE, _HEADS, (8, 8, 4, 4), (3, 4, 18, 3)),
    'pvt_v2_b4': PVTSpec(_WIDE, _HEADS, (8, 8, 4, 4), (3, 8, 27, 3)),
    'pvt_v2_b5': PVTSpec(_WIDE, _HEADS, (4, 4, 4, 4), (3, 6, 40, 3)),
}


def _dense(features, dtype, name):
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def _norm(eps, dtype, name):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                      name=name)


class Attention(nn.Module):
  """Spatial-reduction attention. `[N, L, C]` with L = h * w."""
  dim: int
  num_heads: int
  sr_ratio: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, h, w):
    n, l, c = x.shape
    hd = c // self.num_heads
    q = _dense(c, self.dtype, 'q')(x).reshape(n, l, self.num_heads, hd)
    if self.sr_ratio > 1:
      r = self.sr_ratio
      x = conv(c, r, r, dtype=self.dtype, name='sr')(x.reshape(n, h, w, c))
      x = _norm(1e-5, self.dtype, 'norm')(x.reshape(n, -1, c))
    kv = _dense(2 * c, self.dtype, 'kv')(x).reshape(n, -1, 2, self.num_heads,
                                                    hd)
    attn = jnp.einsum('nqhd,nkhd->nhqk', q, kv[:, :, 0]) * hd**-0.5
    f32 = jnp.promote_types(self.dtype, jnp.float32)  # bf16 -> f32, f64 stays
    attn = nn.softmax(attn.astype(f32), axis=-1).astype(self.dtype)
    y = jnp.einsum('nhqk,nkhd->nqhd', attn, kv[:, :, 1]).reshape(n, l, c)
    return _dense(c, self.dtype, 'proj')(y)


class DWConv(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, h, w):
    n, l, c = x.shape
    x = conv(c, 3, 1, 1, groups=c, dtype=self.dtype, name='dwconv')(
        x.reshape(n, h, w, c))
    return x.reshape(n, l, c)


class Mlp(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, h, w):
    c = x.shape[-1]
    x = _dense(self.hidden, self.dtype, 'fc1')(x)
    x = DWConv(self.dtype, name='dwconv')(x, h, w)
    x = nn.gelu(x, approximate=False)
    return _dense(c, self.dtype, 'fc2')(x)


class Block(nn.Module):
  dim: int
  num_heads: int
  mlp_ratio: int
  sr_ratio: int
  drop_path: float = 0.0
  train: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, h, w):
    dp = DropPath(self.drop_path, deterministic=not self.train)
    y = _norm(1e-6, self.dtype, 'norm1')(x)
    x = x + dp(Attention(self.dim, self.num_heads, self.sr_ratio, self.dtype,
                         name='attn')(y, h, w))
    y = _norm(1e-6, self.dtype, 'norm2')(x)
    return x + dp(Mlp(self.dim * self.mlp_ratio, self.dtype, name='mlp')(y, h, w))


class PatchEmbed(nn.Module):
  """Overlapping patch embedding: conv + LayerNorm (eps 1e-5)."""
  dim: int
  patch: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = conv(self.dim, self.patch, self.stride, self.patch // 2,
             dtype=self.dtype, name='proj')(x)
    n, h, w, c = x.shape
    x = _norm(1e-5, self.dtype, 'norm')(x.reshape(n, h * w, c))
    return x, h, w


class PVTv2(nn.Module):
  """`[N, H, W, 3]` -> 4 stages `[N, H/4, W/4, C0]` ... `[N, H/32, W/32, C3]`."""
  spec: PVTSpec
  train: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    s = self.spec
    dpr = np.linspace(0, s.drop_path_rate, sum(s.depths))
    block_cls = nn.remat(Block, static_argnums=(2, 3)) if self.remat else Block
    feats, k = [], 0
    for i in range(4):
      x, h, w = PatchEmbed(s.embed_dims[i], 7 if i == 0 else 3,
                           4 if i == 0 else 2, self.dtype,
                           name=f'patch_embed{i + 1}')(x)
      for j in range(s.depths[i]):
        x = block_cls(s.embed_dims[i], s.num_heads[i], s.mlp_ratios[i],
                      s.sr_ratios[i], float(dpr[k]), self.train, self.dtype,
                      name=f'block{i + 1}_{j}')(x, h, w)
        k += 1
      x = _norm(1e-6, self.dtype, f'norm{i + 1}')(x)
      x = x.reshape(x.shape[0], h, w, -1)
      feats.append(x)
    return feats
