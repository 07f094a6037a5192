"""PVT-v2's CPU paths against plain autodiff of the reference's formulas.

`pvt.Mlp` on CPU is `_mlp_cpu` (hand-written gradient), `pvt.LayerNorm`
has a custom gradient and the spatial-reduction conv is a patch matmul;
each must equal the straightforward version (native grouped conv,
`nn.LayerNorm`, `nn.Conv`) to float64 rounding, and to float32 noise.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avs_jax.models import pvt


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def perturbed(variables, seed=0):
  """Nonzero biases and non-unit scales, so no branch is trivial."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), p.dtype),
      variables,
  )


def grads(apply, variables, x, seed=1):
  """Value and gradients (parameters, input) of a random projection."""
  g = np.random.default_rng(seed).standard_normal(
      jax.eval_shape(apply, variables, x).shape
  )
  f = lambda v, x: jnp.sum(apply(v, x) * jnp.asarray(g, x.dtype))
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(variables, x)


def assert_close(a, b, tol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert rel(x, y) < tol, rel(x, y)


@pytest.mark.parametrize(
    'dtype,tol', [(jnp.float64, 1e-12), (jnp.float32, 1e-5)]
)
def test_mlp_matches_native_autodiff(dtype, tol):
  with jax.enable_x64(dtype == jnp.float64):
    n, h, w, c, hidden = 2, 5, 7, 8, 32
    x = jnp.asarray(
        np.random.default_rng(2).standard_normal((n, h * w, c)), dtype
    )
    mlp = pvt.Mlp(hidden, dtype)
    v = perturbed(mlp.init(jax.random.key(0), x, h, w))
    v = jax.tree_util.tree_map(lambda p: p.astype(dtype), v)

    def native(v, x):
      p = v['params']
      y = pvt._mlp_native(
          x.reshape(n, h, w, c),
          p['fc1']['kernel'],
          p['fc1']['bias'],
          p['dwconv']['dwconv']['kernel'],
          p['dwconv']['dwconv']['bias'],
          p['fc2']['kernel'],
          p['fc2']['bias'],
      )
      return y.reshape(x.shape)

    ours = grads(lambda v, x: mlp.apply(v, x, h, w), v, x)
    assert_close(ours, grads(native, v, x), tol)


@pytest.mark.parametrize(
    'dtype,tol', [(jnp.float64, 1e-12), (jnp.float32, 1e-5)]
)
def test_layer_norm_matches_flax(dtype, tol):
  with jax.enable_x64(dtype == jnp.float64):
    rng = np.random.default_rng(3)
    x = jnp.asarray(3 * rng.standard_normal((2, 9, 24)) + 1, dtype)
    ref = nn.LayerNorm(1e-6, dtype=dtype, param_dtype=dtype)
    v = perturbed(ref.init(jax.random.key(0), x))
    ours = pvt.LayerNorm(1e-6, dtype)
    assert_close(grads(ours.apply, v, x), grads(ref.apply, v, x), tol)


def test_spatial_reduction_is_the_strided_conv():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 8, 12, 6)), jnp.float32)
  conv = nn.Conv(5, (4, 4), strides=(4, 4), padding='VALID')
  v = perturbed(conv.init(jax.random.key(0), x))
  ours = lambda v, x: pvt._patch_conv(
      x, v['params']['kernel'], v['params']['bias'], jnp.float32
  )
  want = lambda v, x: conv.apply(v, x).reshape(2, -1, 5)
  assert_close(grads(ours, v, x), grads(want, v, x), 1e-5)


def test_mlp_bfloat16_gradients_follow_float32():
  """bf16 compute (float32 parameters): the custom gradient's dtypes line up."""
  n, h, w, c, hidden = 2, 4, 4, 8, 32
  x = jnp.asarray(np.random.default_rng(5).standard_normal((n, h * w, c)))
  v = perturbed(pvt.Mlp(hidden).init(jax.random.key(0), x, h, w))
  out = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    mlp = pvt.Mlp(hidden, dtype)
    out[dtype] = grads(lambda v, x: mlp.apply(v, x, h, w), v, x)
  for a, b in zip(*(jax.tree_util.tree_leaves(out[d]) for d in out)):
    assert a.dtype == b.dtype == jnp.float32
    assert rel(b, a) < 3e-2, rel(b, a)
