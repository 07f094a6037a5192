"""Multi-scale deformable attention (Deformable DETR), written for XLA.

`ms_deform_attn_core` reproduces the reference's pure-PyTorch path
`ms_deform_attn_core_pytorch`: every sampling point reads its level by
bilinear interpolation with `F.grid_sample(mode='bilinear',
padding_mode='zeros', align_corners=False)` semantics. The four neighbours of
all points of all levels are fetched by ONE gather from the flattened values
and combined by one weighted sum, so there is no custom kernel and no loop
over levels at run time: gathers and einsums vectorise on GPU and TPU (the
gradient of the gather is a scatter-add).
"""

import math
from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avs_jax.models.layers import Dtype

Shapes = Sequence[Tuple[int, int]]


def ms_deform_attn_core(
    value, spatial_shapes: Shapes, sampling_locations, attention_weights
):
  """Deformable sampling and weighting.

  Args:
    value: `[N, S, M, D]`, S = sum of H_l * W_l (levels flattened row-major
      and concatenated), M heads of D channels.
    spatial_shapes: static `((H_0, W_0), ...)`, L levels.
    sampling_locations: `[N, Lq, M, L, P, 2]`, (x, y) in [0, 1] over each
      level (points outside read zeros).
    attention_weights: `[N, Lq, M, L, P]`.

  Returns:
    `[N, Lq, M * D]`.
  """
  n, s, m, d = value.shape
  _, lq, _, num_levels, p, _ = sampling_locations.shape
  if len(spatial_shapes) != num_levels:
    raise ValueError(
        f'{len(spatial_shapes)} spatial shapes for ' f'{num_levels} levels'
    )
  if sum(h * w for h, w in spatial_shapes) != s:
    raise ValueError(
        f'spatial shapes {tuple(spatial_shapes)} do not add up '
        f'to {s} values'
    )
  f32 = jnp.promote_types(sampling_locations.dtype, jnp.float32)
  hw = np.asarray(spatial_shapes, np.float32)  # [L, 2] (H, W)
  starts = np.concatenate([[0], np.cumsum(hw[:, 0] * hw[:, 1])[:-1]])
  size_h = hw[:, 0][:, None]  # [L, 1]
  size_w = hw[:, 1][:, None]
  loc = sampling_locations.astype(f32)
  # grid_sample, align_corners=False: pixel = loc * size - 0.5.
  x = loc[..., 0] * size_w - 0.5  # [N, Lq, M, L, P]
  y = loc[..., 1] * size_h - 0.5
  x0, y0 = jnp.floor(x), jnp.floor(y)
  fx, fy = x - x0, y - y0
  idx, wgt = [], []
  for dy, wy in ((0, 1 - fy), (1, fy)):
    for dx, wx in ((0, 1 - fx), (1, fx)):
      xi, yi = x0 + dx, y0 + dy
      inside = (xi >= 0) & (xi <= size_w - 1) & (yi >= 0) & (yi <= size_h - 1)
      xc = jnp.clip(xi, 0, size_w - 1).astype(jnp.int32)
      yc = jnp.clip(yi, 0, size_h - 1).astype(jnp.int32)
      idx.append(
          starts[:, None].astype(np.int32) + yc * size_w.astype(np.int32) + xc
      )
      wgt.append(jnp.where(inside, wx * wy, 0.0))
  idx = jnp.stack(idx, -1)  # [N, Lq, M, L, P, 4]
  wgt = jnp.stack(wgt, -1) * attention_weights.astype(f32)[..., None]
  # One gather per (batch, head): [N, M, S, D] at [N, M, Lq * L * P * 4].
  idx = jnp.transpose(idx, (0, 2, 1, 3, 4, 5)).reshape(n, m, -1)
  vals = jnp.take_along_axis(
      jnp.transpose(value, (0, 2, 1, 3)), idx[..., None], axis=2
  )
  vals = vals.reshape(n, m, lq, num_levels * p * 4, d)
  wgt = (
      jnp.transpose(wgt, (0, 2, 1, 3, 4, 5))
      .reshape(n, m, lq, num_levels * p * 4)
      .astype(value.dtype)
  )
  out = jnp.einsum(
      'nmqk,nmqkd->nqmd', wgt, vals, precision=jax.lax.Precision.HIGHEST
  )
  return out.reshape(n, lq, m * d)


def _offsets_bias_init(n_heads, n_levels, n_points):
  """The reference's `_reset_parameters`: point i of head h at (i + 1) *
  the unit-square direction of angle 2 pi h / n_heads."""

  def init(key, shape, dtype=jnp.float32):
    del key
    theta = np.arange(n_heads, dtype=np.float32) * (2.0 * math.pi / n_heads)
    grid = np.stack([np.cos(theta), np.sin(theta)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, n_levels, n_points, 1))
    grid = grid * np.arange(1, n_points + 1, dtype=np.float32)[:, None]
    return jnp.asarray(grid.reshape(shape), dtype)

  return init


class MSDeformAttn(nn.Module):
  """The reference `MSDeformAttn` (2-d reference points, no padding mask).

  `__call__(query [N, Lq, C], reference_points [N or 1, Lq, L, 2] (x, y) in
  [0, 1], value_in [N, S, C], spatial_shapes)` -> `[N, Lq, C]`.
  """

  d_model: int = 256
  n_levels: int = 4
  n_heads: int = 8
  n_points: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query, reference_points, value_in, spatial_shapes):
    m, lv, p = self.n_heads, self.n_levels, self.n_points
    f32 = jnp.promote_types(self.dtype, jnp.float32)  # bf16 -> f32, f64 stays
    n, lq, _ = query.shape
    s = value_in.shape[1]
    dense = lambda f, name, **kw: nn.Dense(
        f, dtype=self.dtype, param_dtype=jnp.float32, name=name, **kw
    )
    xavier = nn.initializers.xavier_uniform()
    value = dense(self.d_model, 'value_proj', kernel_init=xavier)(value_in)
    value = value.reshape(n, s, m, self.d_model // m)
    offsets = dense(
        m * lv * p * 2,
        'sampling_offsets',
        kernel_init=nn.initializers.zeros,
        bias_init=_offsets_bias_init(m, lv, p),
    )(query)
    offsets = offsets.reshape(n, lq, m, lv, p, 2).astype(f32)
    weights = dense(
        m * lv * p, 'attention_weights', kernel_init=nn.initializers.zeros
    )(query)
    weights = jax.nn.softmax(
        weights.reshape(n, lq, m, lv * p).astype(f32), -1
    ).reshape(n, lq, m, lv, p)
    hw = np.asarray(spatial_shapes, np.float32)
    normalizer = hw[:, ::-1]  # [L, 2] (W, H)
    loc = (
        reference_points[:, :, None, :, None, :].astype(f32)
        + offsets / normalizer[None, None, None, :, None, :]
    )
    out = ms_deform_attn_core(value, spatial_shapes, loc, weights)
    return dense(self.d_model, 'output_proj', kernel_init=xavier)(
        out.astype(self.dtype)
    )
