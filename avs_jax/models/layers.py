"""Layers shared by the encoders and the AVS head, with PyTorch semantics.

Everything is NHWC. Parameter names mirror the PyTorch modules they replace,
so that `avs_jax.convert` can map checkpoints by name.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def _sum_rows(x):
  """Per-channel sums of `x [N, ..., C]` as matrix-vector products with ones.

  XLA:CPU runs a large reduction over the leading axes as a slow tree of
  `reduce-window`s; a (batched) product with a ones vector is a fast dot.
  Three levels (`[N, K, R/K]`, K about sqrt(R)) keep the float32 rounding
  near that of XLA's tree reduction; the first axis stays a batch axis until
  the last level, so a batch sharded over devices gives partial sums, then
  one all-reduce, as the reduction does.
  """
  n, c = x.shape[0], x.shape[-1]
  r = x.size // (n * c)
  k = max(d for d in range(1, int(np.sqrt(r)) + 1) if r % d == 0)
  ones = lambda *shape: jnp.ones(shape, x.dtype)
  s = jnp.einsum('nk,nkjc->njc', ones(n, k), x.reshape(n, k, r // k, c))
  s = jnp.einsum('nj,njc->nc', ones(n, r // k), s)
  return ones(n) @ s


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon):
  """Training-mode BatchNorm of `x [..., C]` over every axis but the last.

  Returns `(y, mean, var)` (biased variance). The gradient is the usual
  closed form, with every per-channel sum a GEMV (`_sum_rows`); equal to
  autodiff of the same formula in exact arithmetic.
  """
  return _bn_fwd(x, scale, bias, epsilon)[0]


def _bn_fwd(x, scale, bias, epsilon):
  c = x.shape[-1]
  m = x.size // c
  mean = _sum_rows(x) / m
  mean = mean + _sum_rows(x - mean) / m  # compensated: a second, small sum
  var = _sum_rows(jnp.square(x - mean)) / m
  rstd = jax.lax.rsqrt(var + epsilon)
  mul = scale * rstd
  y = x * mul + (bias - mean * mul)
  return (y, mean, var), (x, mean, rstd, scale)


def _bn_bwd(epsilon, res, cts):
  del epsilon
  x, mean, rstd, scale = res
  gy, gmean, gvar = cts
  c = x.shape[-1]
  m = x.size // c
  xhat = (x - mean) * rstd
  dbias = _sum_rows(gy)
  dscale = _sum_rows(gy * xhat)
  dx = (scale * rstd) * (gy - (dbias + xhat * dscale) / m)
  dx = dx + gmean / m + gvar * (2.0 / m) * (x - mean)
  return dx, dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch's semantics: momentum 0.1, eps 1e-5.

  In training it normalises with the biased batch variance and updates the
  running variance with the unbiased one, as `torch.nn.BatchNorm*d` does.
  Statistics are reduced over every axis but the last, in at least float32
  (`batch_norm_train`).
  """

  use_running_average: bool = True
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', self.scale_init, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    f32 = jnp.promote_types(self.dtype, jnp.float32)  # bf16 -> f32, f64 stays
    if self.use_running_average:
      mul = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
      y = x.astype(f32) * mul + (bias - ra_mean.value * mul)
      return y.astype(self.dtype)
    y, mean, var = batch_norm_train(
        x.astype(f32), scale.astype(f32), bias.astype(f32), self.epsilon
    )
    if not self.is_initializing():
      n = x.size // c
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      ra_mean.value = (1 - m) * ra_mean.value + m * mean
      ra_var.value = (1 - m) * ra_var.value + m * unbiased
    return y.astype(self.dtype)


class Conv1x1(nn.Module):
  """A PyTorch 1x1(x1) convolution as a matmul over the channel axis.

  The kernel keeps the PyTorch conv rank (`[1]*ndim + [I, O]`) so checkpoints
  convert by name; the computation is an einsum, which XLA maps to a GEMM.
  """

  features: int
  spatial_dims: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = (1,) * self.spatial_dims + (x.shape[-1], self.features)
    kernel = self.param(
        'kernel', nn.initializers.lecun_normal(), shape, jnp.float32
    )
    bias = self.param(
        'bias', nn.initializers.zeros, (self.features,), jnp.float32
    )
    kernel = kernel.reshape(shape[-2:]).astype(self.dtype)
    y = jnp.einsum('...i,io->...o', x.astype(self.dtype), kernel)
    return y + bias.astype(self.dtype)


def _useful_taps(n, k, d, pad):
  """Taps `[j0, j1)` of a stride-1 window that meet the input at least once.

  Along one axis of size `n` with `k` taps `d` apart and padding `pad =
  (lo, hi)`, tap j reads input `o + j * d - lo` for outputs `o < out`.
  """
  out = n + pad[0] + pad[1] - d * (k - 1)
  useful = [
      j for j in range(k) if j * d - pad[0] < n and j * d - pad[0] + out > 0
  ]
  return (useful[0], useful[-1] + 1) if useful else (0, k)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
):
  """`lax.conv_general_dilated` without kernel taps that only read padding.

  A dilated 3x3 conv whose dilation is not smaller than the map reads only
  zero padding with its 8 outer taps (ASPP with ResNet-50 at 160x160:
  dilations 12 and 18 on the 10x10 map, 6, 12 and 18 on the 5x5 one):
  their products are zeros and their gradients exactly zero. Those taps
  are cut from the kernel and the padding shrunk to keep the output size:
  the same result without the work (a 1x1 conv where only the centre tap
  is left; the full kernel stays the parameter). Stride 1 and explicit
  padding only; anything else goes to lax unchanged.
  """
  spatial = len(window_strides)
  rhs_dilation = rhs_dilation or (1,) * spatial
  plain = not lhs_dilation or all(v == 1 for v in lhs_dilation)
  if (
      isinstance(padding, str)
      or any(s != 1 for s in window_strides)
      or not plain
      or dimension_numbers is None
  ):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, precision=precision,
    )  # fmt: skip
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  slices = [slice(None)] * rhs.ndim
  new_padding = []
  for i in range(spatial):
    n = lhs.shape[dn.lhs_spec[2 + i]]
    k = rhs.shape[dn.rhs_spec[2 + i]]
    d = rhs_dilation[i]
    lo, hi = padding[i]
    j0, j1 = _useful_taps(n, k, d, (lo, hi))
    slices[dn.rhs_spec[2 + i]] = slice(j0, j1)
    new_padding.append((lo - j0 * d, hi - (k - j1) * d))
  return jax.lax.conv_general_dilated(
      lhs, rhs[tuple(slices)], window_strides, new_padding, lhs_dilation,
      rhs_dilation, dimension_numbers, feature_group_count,
      precision=precision,
  )  # fmt: skip


def conv(
    features,
    kernel,
    stride=1,
    padding=0,
    dilation=1,
    use_bias=True,
    groups=1,
    dtype=jnp.float32,
    name=None,
    kernel_init=nn.initializers.lecun_normal(),
):
  """`nn.Conv` configured like `torch.nn.Conv2d` (symmetric explicit padding)."""
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=[(padding, padding)] * 2,
      kernel_dilation=(dilation, dilation),
      use_bias=use_bias,
      feature_group_count=groups,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=kernel_init,
      conv_general_dilated=conv_general_dilated,
      name=name,
  )


def _interp_matrix(n_in, n_out, align_corners):
  """[n_out, n_in] bilinear interpolation weights, PyTorch's convention."""
  out = np.arange(n_out, dtype=np.float64)
  if align_corners:
    src = out * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros_like(out)
  else:
    src = np.maximum((out + 0.5) * (n_in / n_out) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m.astype(np.float32)


def resize_bilinear(x, size: Sequence[int], align_corners: bool):
  """Bilinear resize of `[..., H, W, C]` to `size`, as `F.interpolate`.

  Separable: two small matmuls with constant interpolation matrices, which is
  exact, differentiable and fast on accelerators.
  """
  h, w = x.shape[-3], x.shape[-2]
  mh = jnp.asarray(_interp_matrix(h, size[0], align_corners), x.dtype)
  mw = jnp.asarray(_interp_matrix(w, size[1], align_corners), x.dtype)
  hp = jax.lax.Precision.HIGHEST
  x = jnp.einsum('oh,...hwc->...owc', mh, x, precision=hp)
  return jnp.einsum('pw,...owc->...opc', mw, x, precision=hp)


def upsample2x(x, align_corners: bool):
  """`F.interpolate(scale_factor=2, mode='bilinear')` on `[N, H, W, C]`."""
  return resize_bilinear(x, (2 * x.shape[-3], 2 * x.shape[-2]), align_corners)


def _phase_taps():
  """`[2, 3, 3]`: per output parity p, low-res offset u and high-res tap a.

  Upsampling by 2 (align_corners=False) then a 3-tap filter, along one axis,
  is for outputs `2i + p` a 3-tap filter of inputs `i - 1, i, i + 1`: row
  `2i + p + a - 1` of the upsampled map is sum_u c[p, u, a] x[i + u - 1].
  Read off `_interp_matrix` at an interior point, checked at another.
  """
  m = _interp_matrix(8, 16, align_corners=False).astype(np.float64)
  at = lambda i: np.array(
      [
          [
              [m[2 * i + p + a - 1, i + u - 1] for a in range(3)]
              for u in range(3)
          ]
          for p in range(2)
      ]
  )
  c = at(3)
  assert np.array_equal(c, at(5))
  return c


def upsample2x_conv3x3(x, kernel, bias):
  """`conv3x3(upsample2x(x, align_corners=False))`, zero padding 1, computed
  on the input's grid, as the output's four phases.

  `x [N, H, W, C]`, `kernel [3, 3, C, O]`, `bias [O]` ->
  `[N, H, W, 2, 2, O]`, where `[n, i, j, p, q]` is output pixel
  `(2i + p, 2j + q)` (`pixel_shuffle` makes the `[N, 2H, 2W, O]` map; a
  per-pixel op that follows, such as a ReLU and a 1x1 conv, can run on the
  phases first). The four phases are one 3x3 conv of the edge-padded input
  with `4 O` outputs (kernels combined from the interpolation weights): the
  2x map is never built and the conv has 4x the output channels on a
  quarter of the pixels (XLA:CPU: 240 vs 420 ms forward + backward for the
  decoder's 128 -> 32 at 160x160). Edge padding of the input is edge
  padding of the upsampled map (upsampling replicates the edge), while the
  conv pads with zeros: the difference, the border ring, is taken back from
  the outermost output rows and columns (four thin 1-D convs, subtracted in
  place). Equal to the two-step form in exact arithmetic.
  """
  n, h, w, c = x.shape
  o = kernel.shape[-1]
  hp = jax.lax.Precision.HIGHEST
  taps = jnp.asarray(_phase_taps(), kernel.dtype)
  k4 = jnp.einsum('pua,qvb,abio->uvipqo', taps, taps, kernel, precision=hp)
  k4 = k4.reshape(3, 3, c, 4 * o).astype(x.dtype)
  xe = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge')
  dn = ('NHWC', 'HWIO', 'NHWC')
  y = jax.lax.conv_general_dilated(
      xe, k4, (1, 1), 'VALID', dimension_numbers=dn, precision=hp
  )
  y = y.reshape(n, h, w, 2, 2, o) + bias.astype(x.dtype)

  # The ring: the upsampled map's border rows / columns (edge-replicated
  # along their length), each seen by one row / column of the kernel.
  k = kernel.astype(x.dtype)
  up_w = lambda v: resize_bilinear(v[:, None], (1, 2 * w), False)[:, 0]
  up_h = lambda v: resize_bilinear(v[:, :, None], (2 * h, 1), False)[:, :, 0]
  conv1d = lambda v, k1, mode: jax.lax.conv_general_dilated(
      jnp.pad(v, ((0, 0), (1, 1), (0, 0)), mode=mode), k1, (1,), 'VALID',
      dimension_numbers=('NWC', 'WIO', 'NWC'), precision=hp,
  )  # fmt: skip
  rows = lambda v: v.reshape(n, 1, w, 1, 2, o)  # [N, 2W, O] -> phases
  cols = lambda v: v.reshape(n, h, 1, 2, 1, o)  # [N, 2H, O] -> phases
  ring = (
      # (phase-tensor start of the thin slice, its correction)
      ((0, 0, 0, 0, 0, 0), rows(conv1d(up_w(x[:, 0]), k[0], 'edge'))),
      ((0, h - 1, 0, 1, 0, 0), rows(conv1d(up_w(x[:, -1]), k[2], 'edge'))),
      ((0, 0, 0, 0, 0, 0), cols(conv1d(up_h(x[:, :, 0]), k[:, 0], 'constant'))),
      ((0, 0, w - 1, 0, 1, 0), cols(conv1d(up_h(x[:, :, -1]), k[:, 2], 'constant'))),
  )  # fmt: skip
  for start, v in ring:
    cur = jax.lax.dynamic_slice(y, start, v.shape)
    y = jax.lax.dynamic_update_slice(y, cur - v, start)
  return y


def _tap_interp(n, align_corners):
  """`[2n, 3, n]`: tap `a` of a 3-tap filter with zero padding 1 on the 2x
  map, at output row `r`, reads `sum_i m[r, a, i] x[i]` (upsampling by 2 of
  `x [n]`; zero where the tap falls in the padding)."""
  up = _interp_matrix(n, 2 * n, align_corners)
  m = np.zeros((2 * n, 3, n), np.float32)
  for a in range(3):
    rows = np.arange(2 * n) + a - 1
    inside = (rows >= 0) & (rows < 2 * n)
    m[inside, a] = up[rows[inside]]
  return m


def upsample2x_conv3x3_mixed_first(x, kernel, bias, align_corners=True):
  """`conv3x3(upsample2x(x, align_corners))`, zero padding 1, with the
  channels mixed on the input's grid: `[N, H, W, C]` -> `[N, 2H, 2W, O]`.

  Upsampling and the taps' shifts act on pixels, the kernel on channels, so
  they commute: one GEMM makes every tap's `O` outputs at the input's
  resolution (`[N, H, W, 3, 3, O]`, a quarter of the pixels the conv sees),
  then two small matmuls along W and H (`_tap_interp`) upsample, shift and
  sum them. For any bilinear 2x upsampling, align_corners=True included
  (whose weights vary along the map, so it has no phase form). The
  decoder's `output_conv_0` at 160x160 (5x40x40x256 -> 5x80x80x128): 2.6x
  fewer FLOPs than the conv on the upsampled map. Equal to the two-step
  form in exact arithmetic.
  """
  _, h, w, _ = x.shape
  hp = jax.lax.Precision.HIGHEST
  th = jnp.asarray(_tap_interp(h, align_corners), x.dtype)
  tw = jnp.asarray(_tap_interp(w, align_corners), x.dtype)
  y = jnp.einsum('nijc,abco->nijabo', x, kernel.astype(x.dtype))
  y = jnp.einsum('qbj,nijabo->niqao', tw, y, precision=hp)
  y = jnp.einsum('pai,niqao->npqo', th, y, precision=hp)
  return y + bias.astype(x.dtype)


def pixel_shuffle(y):
  """`[N, H, W, 2, 2, C]` phases -> `[N, 2H, 2W, C]` (pixel `(2i+p, 2j+q)`)."""
  n, h, w, _, _, c = y.shape
  return y.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, c)


class Upsample2xConv3x3(nn.Module):
  """`conv(features, 3, 1, 1)` applied to `upsample2x(x, align_corners)`,
  with that conv's parameters (`kernel [3, 3, C, O]`, `bias`).

  align_corners=False: returned as its phases `[N, H, W, 2, 2, O]`
  (`upsample2x_conv3x3`); True: as the map `[N, 2H, 2W, O]`
  (`upsample2x_conv3x3_mixed_first`).
  """

  features: int
  dtype: Dtype = jnp.float32
  align_corners: bool = False

  @nn.compact
  def __call__(self, x):
    shape = (3, 3, x.shape[-1], self.features)
    kernel = self.param(
        'kernel', nn.initializers.lecun_normal(), shape, jnp.float32
    )
    bias = self.param(
        'bias', nn.initializers.zeros, (self.features,), jnp.float32
    )
    x = x.astype(self.dtype)
    if self.align_corners:
      return upsample2x_conv3x3_mixed_first(x, kernel, bias, align_corners=True)
    return upsample2x_conv3x3(x, kernel, bias)


class DropPath(nn.Module):
  """Stochastic depth per sample (timm's DropPath); rng stream 'dropout'."""

  rate: float
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    if self.deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    rng = self.make_rng('dropout')
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))
