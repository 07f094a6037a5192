"""TPAVI: temporal pixel-wise audio-visual interaction (a non-local block).

Input one clip as `[B, T, H, W, C]`; queries are the visual positions, keys
come from the audio embedding broadcast over H and W (`tpavi_va`) or from the
visual map itself (`tpavi_vv`, audio=None). All four modes of the reference:
'dot' and 'concatenate' (affinity divided by N = T*H*W), 'embedded' and
'gaussian' (softmax affinity).

Computation differs from the reference's [THW, THW] affinity matrix but is
exactly equal in exact arithmetic:
  * audio keys are constant over H, W, so the THW keys collapse to T keys
    whose values are the sum (dot, concatenate) or mean (softmax modes) of g
    over H, W;
  * 'dot' has no softmax, so (theta phi^T) g = theta (phi^T g): linear cost.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from avs_jax.models.layers import BatchNorm, Conv1x1, Dtype

MODES = ('dot', 'embedded', 'gaussian', 'concatenate')


class ConcatAffinity(nn.Module):
  """The reference's `W_f`: ReLU(1x1 conv of concat[theta_i, phi_j]).

  A 1x1 conv of a concatenation is the sum of two projections, so the
  `[2C', N, K]` concatenation is never built. `q [B, N, C']`, `k [B, K, C']`
  -> `[B, N, K]`.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q, k):
    ci = q.shape[-1]
    kernel = self.param(
        'kernel', nn.initializers.lecun_normal(), (1, 1, 2 * ci, 1), jnp.float32
    )
    bias = self.param('bias', nn.initializers.zeros, (1,), jnp.float32)
    wk = kernel.reshape(2 * ci).astype(self.dtype)
    f = (q @ wk[:ci])[:, :, None] + (k @ wk[ci:])[:, None, :]
    return nn.relu(f + bias.astype(self.dtype))


class TPAVI(nn.Module):
  """`x [B, T, H, W, C]`, `audio [B, T, 128] | None` -> (`[B, T, H, W, C]`, `[B, T, C] | None`).

  `align_bias=False`: `align_channel` without bias (the reference's AVSS).
  """

  mode: str = 'dot'
  train: bool = False
  dtype: Dtype = jnp.float32
  align_bias: bool = True

  @nn.compact
  def __call__(self, x, audio=None):
    # long: the four reference modes and the audio/visual branches in one
    # place, each checked against a naive [THW, THW] derivation.
    if self.mode not in MODES:
      raise ValueError(f'TPAVI mode must be one of {MODES}, got {self.mode!r}')
    b, t, h, w, c = x.shape
    ci = max(c // 2, 1)
    n = t * h * w
    proj = lambda name, f=ci: Conv1x1(f, 3, self.dtype, name=name)
    # The reference builds these two in its constructor whatever the input.
    align = nn.Dense(
        c,
        use_bias=self.align_bias,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name='align_channel',
    )
    norm = nn.LayerNorm(
        epsilon=1e-5,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name='norm_layer',
    )

    a_fea = None
    g = proj('g')(x).reshape(b, n, ci)
    if audio is not None:
      a_fea = align(audio.astype(self.dtype))  # [B, T, C]
      key_in = a_fea  # [B, T, C]
      values = g.reshape(b, t, h * w, ci).sum(2)  # [B, T, C']
      multiplicity = h * w
    else:
      if self.is_initializing():
        align(jnp.zeros((b, t, 128), self.dtype))
      key_in = x.reshape(b, n, c)
      values = g
      multiplicity = 1
    xq = x.reshape(b, n, c)

    if self.mode == 'gaussian':
      q, k = xq, key_in
    else:
      q = proj('theta')(xq)
      k = proj('phi')(key_in)
    hp = jax.lax.Precision.HIGHEST
    if self.mode == 'dot':
      kv = jnp.einsum('bkc,bkd->bcd', k, values, precision=hp)
      y = jnp.einsum('bqc,bcd->bqd', q, kv, precision=hp) / n
    elif self.mode == 'concatenate':
      f = ConcatAffinity(self.dtype, name='W_f_0')(q, k)  # [B, N, K]
      y = jnp.einsum('bqk,bkd->bqd', f, values, precision=hp) / n
    else:
      s = jnp.einsum('bqc,bkc->bqk', q, k, precision=hp)
      f32 = jnp.promote_types(self.dtype, jnp.float32)  # bf16 -> f32, f64 stays
      p = nn.softmax(s.astype(f32), axis=-1).astype(self.dtype)
      y = jnp.einsum('bqk,bkd->bqd', p, values / multiplicity, precision=hp)

    y = y.reshape(b, t, h, w, ci)
    w_y = Conv1x1(c, 3, self.dtype, name='W_z_0')(y)
    # Zero-initialised as in the reference: a new block is LayerNorm(x).
    w_y = BatchNorm(
        not self.train,
        dtype=self.dtype,
        scale_init=nn.initializers.zeros,
        name='W_z_1',
    )(w_y)
    return norm(w_y + x), a_fea
