"""PVT-v2 (Wang et al., 2022) encoders b0-b5, NHWC, as the AVS reference uses.

LayerNorm eps: 1e-6 in blocks and stage norms, 1e-5 (PyTorch's default) in
the patch embeddings and the spatial-reduction norm. GELU is the exact (erf)
one. Stochastic depth rises linearly from 0 to `drop_path_rate` over blocks.
"""

import dataclasses
from typing import Tuple

import flax.linen as nn
import jax
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
    'pvt_v2_b0': PVTSpec(
        (32, 64, 160, 256), _HEADS, (8, 8, 4, 4), (2, 2, 2, 2)
    ),
    'pvt_v2_b1': PVTSpec(_WIDE, _HEADS, (8, 8, 4, 4), (2, 2, 2, 2)),
    'pvt_v2_b2': PVTSpec(_WIDE, _HEADS, (8, 8, 4, 4), (3, 4, 6, 3)),
    'pvt_v2_b3': PVTSpec(_WIDE, _HEADS, (8, 8, 4, 4), (3, 4, 18, 3)),
    'pvt_v2_b4': PVTSpec(_WIDE, _HEADS, (8, 8, 4, 4), (3, 8, 27, 3)),
    'pvt_v2_b5': PVTSpec(_WIDE, _HEADS, (4, 4, 4, 4), (3, 6, 40, 3)),
}


def _dense(features, dtype, name):
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def _norm(eps, dtype, name):
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name
  )


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
    kv = _dense(2 * c, self.dtype, 'kv')(x).reshape(
        n, -1, 2, self.num_heads, hd
    )
    attn = jnp.einsum('nqhd,nkhd->nhqk', q, kv[:, :, 0]) * hd**-0.5
    f32 = jnp.promote_types(self.dtype, jnp.float32)  # bf16 -> f32, f64 stays
    attn = nn.softmax(attn.astype(f32), axis=-1).astype(self.dtype)
    y = jnp.einsum('nhqk,nkhd->nqhd', attn, kv[:, :, 1]).reshape(n, l, c)
    return _dense(c, self.dtype, 'proj')(y)


def _dw_native(x, k):
  """Depthwise 3x3 conv, stride 1, padding 1: `x [N, H, W, C]`, `k [3, 3, 1, C]`."""
  return jax.lax.conv_general_dilated(
      x,
      k,
      (1, 1),
      ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=x.shape[-1],
  )


def _dw_taps(x):
  """The 9 shifted `[N, H, W, C]` views of `x` zero-padded by 1, (i, j) order."""
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]


def _dw_shift(x, k):
  """`_dw_native` as 9 shifted multiply-adds, in at least float32."""
  f32 = jnp.promote_types(x.dtype, jnp.float32)
  k = k.astype(f32)
  y = sum(
      s.astype(f32) * k[t // 3, t % 3, 0] for t, s in enumerate(_dw_taps(x))
  )
  return y.astype(x.dtype)


@jax.custom_vjp
def _dw_cpu(x, k):
  return _dw_shift(x, k)


def _dw_cpu_fwd(x, k):
  return _dw_shift(x, k), (x, k)


def _dw_cpu_bwd(res, g):
  x, k = res
  n, h, w, c = x.shape
  f32 = jnp.promote_types(x.dtype, jnp.float32)
  dx = _dw_shift(g, k[::-1, ::-1])  # correlation with the flipped kernel
  # dk[i, j] = sum over pixels of tap (i, j) * g: a GEMV with ones, which
  # XLA:CPU runs as a fast dot (its reductions and grouped convs are slow).
  ones = jnp.ones((n * h * w,), f32)
  gf = g.astype(f32)
  dk = jnp.stack(
      [ones @ (s.astype(f32) * gf).reshape(-1, c) for s in _dw_taps(x)]
  )
  return dx, dk.reshape(k.shape).astype(k.dtype)


_dw_cpu.defvjp(_dw_cpu_fwd, _dw_cpu_bwd)


class DepthwiseConv3x3(nn.Module):
  """`nn.Conv(C, 3, padding=1, feature_group_count=C)`: same parameters.

  XLA:CPU runs grouped convolutions (and their gradients) an order of
  magnitude slower than their FLOPs warrant, so on CPU the conv is computed
  as 9 shifted multiply-adds with a custom gradient (equal in exact
  arithmetic); other platforms lower the native conv
  (`jax.lax.platform_dependent`, resolved when lowering). The gradient is
  batch-separable: with the batch split over 4 devices it matches 1 device
  to 3.5e-6 relative in float32 (the native conv: 4.2e-6) and to 7e-8 with
  the model in float64 (docs/PERFORMANCE.md).
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param(
        'kernel', nn.initializers.lecun_normal(), (3, 3, 1, c), jnp.float32
    )
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = jax.lax.platform_dependent(x, kernel, cpu=_dw_cpu, default=_dw_native)
    return y + bias.astype(self.dtype)


class DWConv(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, h, w):
    n, l, c = x.shape
    x = DepthwiseConv3x3(self.dtype, name='dwconv')(x.reshape(n, h, w, c))
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
    x = x + dp(
        Attention(
            self.dim, self.num_heads, self.sr_ratio, self.dtype, name='attn'
        )(y, h, w)
    )
    y = _norm(1e-6, self.dtype, 'norm2')(x)
    return x + dp(
        Mlp(self.dim * self.mlp_ratio, self.dtype, name='mlp')(y, h, w)
    )


class PatchEmbed(nn.Module):
  """Overlapping patch embedding: conv + LayerNorm (eps 1e-5)."""

  dim: int
  patch: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = conv(
        self.dim,
        self.patch,
        self.stride,
        self.patch // 2,
        dtype=self.dtype,
        name='proj',
    )(x)
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
      x, h, w = PatchEmbed(
          s.embed_dims[i],
          7 if i == 0 else 3,
          4 if i == 0 else 2,
          self.dtype,
          name=f'patch_embed{i + 1}',
      )(x)
      for j in range(s.depths[i]):
        x = block_cls(
            s.embed_dims[i],
            s.num_heads[i],
            s.mlp_ratios[i],
            s.sr_ratios[i],
            float(dpr[k]),
            self.train,
            self.dtype,
            name=f'block{i + 1}_{j}',
        )(x, h, w)
        k += 1
      x = _norm(1e-6, self.dtype, f'norm{i + 1}')(x)
      x = x.reshape(x.shape[0], h, w, -1)
      feats.append(x)
    return feats
