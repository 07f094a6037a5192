"""PVT-v2 (Wang et al., 2022) encoders b0-b5, NHWC, as the AVS reference uses.

LayerNorm eps: 1e-6 in blocks and stage norms, 1e-5 (PyTorch's default) in
the patch embeddings and the spatial-reduction norm. GELU is the exact (erf)
one. Stochastic depth rises linearly from 0 to `drop_path_rate` over blocks.
"""

import dataclasses
import functools
import math
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps):
  """LayerNorm over the last axis (biased variance, two-pass)."""
  return _ln_fwd(x, scale, bias, eps)[0]


def _ln_fwd(x, scale, bias, eps):
  c = x.shape[-1]
  mean = (x @ jnp.full((c,), 1 / c, x.dtype))[..., None]
  xc = x - mean
  var = (jnp.square(xc) @ jnp.full((c,), 1 / c, x.dtype))[..., None]
  rstd = jax.lax.rsqrt(var + eps)
  xhat = xc * rstd
  return xhat * scale + bias, (xhat, rstd, scale)


def _ln_bwd(eps, res, g):
  """The closed-form gradient; per-channel sums as GEMVs with ones."""
  del eps
  xhat, rstd, scale = res
  c = xhat.shape[-1]
  gx = g * scale
  mean_of = lambda v: (v @ jnp.full((c,), 1 / c, v.dtype))[..., None]
  dx = rstd * (gx - mean_of(gx) - xhat * mean_of(gx * xhat))
  return dx, _sum_rows(g * xhat), _sum_rows(g)


_layer_norm.defvjp(_ln_fwd, _ln_bwd)


class LayerNorm(nn.Module):
  """`nn.LayerNorm` (same parameters), statistics in at least float32.

  Row means are matrix-vector products and the parameter gradients GEMVs
  with ones (`_layer_norm`'s custom gradient): XLA:CPU runs both faster
  than its reductions.
  """

  epsilon: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    f32 = jnp.promote_types(self.dtype, jnp.float32)
    cast = lambda v: v.astype(f32)
    y = _layer_norm(cast(x), cast(scale), cast(bias), self.epsilon)
    return y.astype(self.dtype)


def _norm(eps, dtype, name):
  return LayerNorm(eps, dtype, name=name)


def _patch_conv(x, kernel, bias, dtype):
  """Conv with kernel = stride = r, no padding (`nn.Conv`'s `VALID`), as a matmul.

  `x [N, H, W, C]`, `kernel [r, r, C, O]` -> `[N, (H/r) (W/r), O]`. The
  non-overlapping r x r patches, flattened in the kernel's (i, j, c) order,
  times the flattened kernel: the same sums as the convolution, and on
  XLA:CPU no kernel transposes in its gradient.
  """
  n, h, w, c = x.shape
  r, o = kernel.shape[0], kernel.shape[-1]
  hr, wr = h // r, w // r
  x = x[:, : hr * r, : wr * r].reshape(n, hr, r, wr, r, c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(n, hr * wr, r * r * c)
  k = kernel.reshape(r * r * c, o).astype(dtype)
  return jnp.einsum('nlk,ko->nlo', x.astype(dtype), k) + bias.astype(dtype)


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
      kernel, bias = _Params((r, r, c, c), name='sr')()
      x = _patch_conv(x.reshape(n, h, w, c), kernel, bias, self.dtype)
      x = _norm(1e-5, self.dtype, 'norm')(x)
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
  """`_dw_native` as 9 shifted multiply-adds (in `x`'s dtype)."""
  k = k.astype(x.dtype)
  return sum(s * k[t // 3, t % 3, 0] for t, s in enumerate(_dw_taps(x)))


_SQRT_HALF = math.sqrt(0.5)  # Python floats: weakly typed, keep x's dtype
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


def _gelu(x):
  """Exact GELU in PyTorch's form, `x / 2 * (1 + erf(x / sqrt(2)))`."""
  return 0.5 * x * (1 + jax.lax.erf(x * _SQRT_HALF))


def _materialize(x):
  """`x` unchanged, computed once into memory (XLA:CPU fusion steering).

  XLA:CPU fuses a cheap elementwise producer (here: 9-tap stencils) into
  every consumer, so a value used by 10 consumers is recomputed 10 times,
  and a stencil fused into a transposing copy or a column reduction is an
  order of magnitude slower than the copy or the sum alone; optimisation
  barriers are dropped on CPU. A division is "expensive" to XLA, which does
  not duplicate it: `x / (1 + 0 * x)` is `x` exactly (also for inf and NaN
  in x) and makes XLA write `x` once and read it from memory.
  """
  return x / (1 + 0 * x)


def _dot_rows(x, g):
  """`x^T g` over the leading axes: `x [..., C]`, `g [..., D]` -> `[C, D]`.

  Written as a dot contracting the first axis of both, so that XLA
  transposes the (smaller) `x`, not `g`.
  """
  c, d = x.shape[-1], g.shape[-1]
  dims = (((0,), (0,)), ((), ()))
  return jax.lax.dot_general(x.reshape(-1, c), g.reshape(-1, d), dims)


def _sum_rows(g):
  """Per-channel sum of `g [..., C]`: a GEMV with ones (fast on XLA:CPU)."""
  c = g.shape[-1]
  return jnp.ones((g.size // c,), g.dtype) @ g.reshape(-1, c)


def _mlp_fwd(x, w1, b1, k, bd, w2, b2):
  """PVT-v2's MLP on `x [N, H, W, C]`: fc1 -> depthwise 3x3 -> GELU -> fc2."""
  f32 = jnp.promote_types(x.dtype, jnp.float32)
  h = jnp.einsum('nhwc,cd->nhwd', x, w1) + b1
  d = _dw_shift(h.astype(f32), k) + bd.astype(f32)
  cdf = 0.5 * (1 + jax.lax.erf(d * _SQRT_HALF))
  a = (d * cdf).astype(x.dtype)
  y = jnp.einsum('nhwd,dc->nhwc', a, w2) + b2
  # GELU's derivative, saved as one array (see `_materialize`).
  phi = jnp.exp(-0.5 * d * d) * _INV_SQRT_2PI
  dgelu = _materialize(cdf + d * phi)
  return y, (x, h, dgelu, a, w1, k, w2)


def _mlp_bwd(res, g):
  x, h, dgelu, a, w1, k, w2 = res
  f32 = dgelu.dtype
  dw2, db2 = _dot_rows(a, g), _sum_rows(g)
  dd = jnp.einsum('nhwc,dc->nhwd', g, w2).astype(f32) * dgelu
  dbd = _sum_rows(dd)
  # Depthwise kernel: sum over pixels of tap (i, j) * dd, as GEMVs.
  dk = jnp.stack([_sum_rows(s * dd) for s in _dw_taps(h.astype(f32))])
  dh = _materialize(_dw_shift(dd, k[::-1, ::-1]).astype(x.dtype))
  dw1, db1 = _dot_rows(x, dh), _sum_rows(dh)
  dx = jnp.einsum('nhwd,cd->nhwc', dh, w1)
  dk = dk.reshape(k.shape).astype(k.dtype)
  return dx, dw1, db1, dk, dbd.astype(k.dtype), dw2, db2


@jax.custom_vjp
def _mlp_cpu(x, w1, b1, k, bd, w2, b2):
  """`_mlp_native` for XLA:CPU, with a hand-written gradient.

  Equal to autodiff of `_mlp_native` in exact arithmetic. XLA:CPU runs
  grouped convolutions an order of magnitude slower than their FLOPs
  warrant, so the depthwise conv is 9 shifted multiply-adds; the bias and
  depthwise-kernel gradients are GEMVs with ones (XLA:CPU's column sums are
  slow); intermediates are written once (`_materialize`). Batch-separable:
  with the batch split over devices, every sum over pixels is a partial sum
  and one all-reduce.
  """
  return _mlp_fwd(x, w1, b1, k, bd, w2, b2)[0]


_mlp_cpu.defvjp(_mlp_fwd, _mlp_bwd)


def _mlp_native(x, w1, b1, k, bd, w2, b2):
  f32 = jnp.promote_types(x.dtype, jnp.float32)
  h = jnp.einsum('nhwc,cd->nhwd', x, w1) + b1
  d = _dw_native(h, k) + bd
  a = _gelu(d.astype(f32)).astype(x.dtype)
  return jnp.einsum('nhwd,dc->nhwc', a, w2) + b2


class _Params(nn.Module):
  """A kernel and a bias, initialised as `nn.Dense` / `nn.Conv` do."""

  kernel_shape: Tuple[int, ...]

  @nn.compact
  def __call__(self):
    init = nn.initializers.lecun_normal()
    kernel = self.param('kernel', init, self.kernel_shape, jnp.float32)
    bias = self.param(
        'bias', nn.initializers.zeros, self.kernel_shape[-1:], jnp.float32
    )
    return kernel, bias


class _DWConvParams(nn.Module):
  """The parameters of the reference's `DWConv` (`dwconv.dwconv.*`)."""

  @nn.compact
  def __call__(self, c):
    return _Params((3, 3, 1, c), name='dwconv')()


class Mlp(nn.Module):
  """fc1 -> depthwise 3x3 conv -> GELU (exact) -> fc2 on `[N, L]` tokens.

  Parameters as the reference's (`fc1`, `dwconv.dwconv`, `fc2`). On CPU the
  whole block is `_mlp_cpu` (custom gradient); elsewhere `_mlp_native`
  (`jax.lax.platform_dependent`, resolved when lowering).
  """

  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, h, w):
    n, l, c = x.shape
    w1, b1 = _Params((c, self.hidden), name='fc1')()
    k, bd = _DWConvParams(name='dwconv')(self.hidden)
    w2, b2 = _Params((self.hidden, c), name='fc2')()
    cast = lambda *a: [v.astype(self.dtype) for v in a]
    args = cast(x.reshape(n, h, w, c), w1, b1, k, bd, w2, b2)
    y = jax.lax.platform_dependent(*args, cpu=_mlp_cpu, default=_mlp_native)
    return y.reshape(n, l, c)


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
