"""VGGish network against the reference fixture (golden weights)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avs_jax.torch_weights import vggish_torch_to_flax
from avs_jax.models import build_vggish
from golden_weights import rebuild_state_dict

GOLDEN = os.path.join(
    os.path.dirname(__file__), 'data', 'golden', 'vggish_16k.npz'
)


def rel_l2(a, b):
  d = np.asarray(a, np.float64) - b
  return float(np.linalg.norm(d) / np.linalg.norm(b))


@pytest.fixture(scope='module')
def golden():
  g = dict(np.load(GOLDEN))
  g['state_dict'] = rebuild_state_dict(g['state_dict_shapes'])
  g['variables'] = vggish_torch_to_flax(g['state_dict'])
  return g


def test_param_tree_mirrors_state_dict(golden):
  """`features.3.weight [O,I,kh,kw]` -> `features_3/kernel [kh,kw,I,O]`."""
  expected = {}
  for key, w in golden['state_dict'].items():
    module, leaf = key.rsplit('.', 1)
    shape = w.shape[2:] + w.shape[1::-1] if w.ndim == 4 else w.shape[::-1]
    expected.setdefault(module.replace('.', '_'), {})[
        'kernel' if leaf == 'weight' else leaf
    ] = shape
  init = jax.eval_shape(
      build_vggish().init, jax.random.key(0), jnp.zeros((1, 96, 64))
  )
  assert set(init) == {'params'}
  assert jax.tree.map(lambda x: x.shape, init['params']) == expected


def test_golden_embedding(golden):
  x = golden['log_mel_examples'][:, 0]
  out = jax.jit(build_vggish().apply)(golden['variables'], x)
  assert out.shape == (5, 128) and out.dtype == jnp.float32
  assert rel_l2(out, golden['embedding']) < 1e-4


def test_leading_batch_dims(golden):
  x = golden['log_mel_examples'][:, 0]
  model = build_vggish()
  flat = model.apply(golden['variables'], x)
  out = model.apply(golden['variables'], x.reshape(1, 5, 96, 64))
  assert out.shape == (1, 5, 128)
  np.testing.assert_allclose(out[0], flat, rtol=1e-5, atol=1e-6)


def test_pca_postprocess(golden):
  x = golden['log_mel_examples'][:, 0]
  emb = np.asarray(build_vggish().apply(golden['variables'], x), np.float64)
  rng = np.random.default_rng(0)
  eig = rng.standard_normal((128, 128)) / np.sqrt(128) * 12
  means = rng.standard_normal(128) * 0.1
  # The torchvggish Postprocessor keeps the means as a [128, 1] column.
  pca_sd = {'pca_eigen_vectors': eig, 'pca_means': means[:, None]}
  variables = vggish_torch_to_flax(golden['state_dict'], pca_sd)
  model = build_vggish(postprocess=True)
  init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 96, 64)))
  assert jax.tree.map(lambda v: v.shape, init['pca']) == {
      'eigen_vectors': (128, 128),
      'means': (128,),
  }
  out = np.asarray(model.apply(variables, x))
  # NumPy re-derivation: PCA on column vectors, clip to [-2, 2], 8-bit levels.
  pca = (eig @ (emb.T - means[:, None])).T
  scaled = (np.clip(pca, -2.0, 2.0) + 2.0) * (255.0 / 4.0)
  ref = np.round(scaled)
  assert out.shape == (5, 128)
  assert 0.05 < np.mean((pca > -2) & (pca < 2)) < 0.95  # both regimes occur
  near_half = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-3
  np.testing.assert_array_equal(out[~near_half], ref[~near_half])
  assert np.abs(out - ref).max() <= 1


def test_bf16_close_to_fp32(golden):
  x = golden['log_mel_examples'][:, 0]
  f32 = build_vggish().apply(golden['variables'], x)
  model = build_vggish(dtype=jnp.bfloat16)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 96, 64)))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  bf16 = jax.jit(model.apply)(golden['variables'], x)
  assert bf16.dtype == jnp.float32
  err = rel_l2(bf16, np.asarray(f32))
  assert 1e-6 < err < 3e-2  # really computed in bf16, yet close
