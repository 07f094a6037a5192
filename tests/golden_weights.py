"""Rebuild the golden fixtures' deterministic PyTorch state_dicts by key.

Recipe (tests/data/golden/README.md): each tensor comes from
`default_rng(crc32(key))`'s standard normal draw of its shape, scaled by leaf
name and rank. `num_batches_tracked` entries are left out.
"""

import json
import zlib

import numpy as np


def rebuild_tensor(key, shape):
  """One float32 tensor of `shape` (PyTorch layout) for state_dict `key`."""
  shape = tuple(int(s) for s in shape)
  rng = np.random.default_rng(zlib.crc32(key.encode('utf-8')))
  n = rng.standard_normal(shape)
  leaf = key.rsplit('.', 1)[-1]
  if leaf == 'running_var':
    t = 1 + 0.1 * np.abs(n)
  elif leaf == 'running_mean':
    t = 0.1 * n
  elif leaf == 'bias':
    t = 0.02 * n
  elif len(shape) == 1:
    t = 1 + 0.1 * n
  else:
    t = n * np.sqrt(1.0 / np.prod(shape[1:]))
  return t.astype(np.float32)


def rebuild_state_dict(shapes):
  """`{key: shape}` (or its JSON string, as stored in the fixtures) ->
  `{key: float32 np.ndarray}`, in the same key order."""
  if isinstance(shapes, np.ndarray):
    shapes = shapes.item()
  if isinstance(shapes, (str, bytes)):
    shapes = json.loads(shapes)
  return {
      k: rebuild_tensor(k, s)
      for k, s in shapes.items()
      if not k.endswith('num_batches_tracked')
  }
