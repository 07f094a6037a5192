"""Prints the parity figures of docs/SAMA.md (relative L2 errors against
tests/data/golden_sama), using the helpers of tests/test_sama.py:

  .venv/bin/python tests/reference/sama_parity.py
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_HERE, '..'), os.path.join(_HERE, '..', '..')]

import conftest  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import test_sama as ts  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  d = ts.load()
  for attention in ('einsum', 'dot_product'):
    ours = ts.to_torch_layout(ts.forward(attention))
    for k in ('image_embedding', 'low_res_logits', 'logits', 'iou_pred'):
      print(f'float32 {attention:11s} {k:16s} {ts.rel(ours[k], d[k]):.1e}')
  logits = jnp.asarray(ts.forward('einsum')['logits'])
  for loss in ts.losses.LOSSES:
    ours = float(ts.losses.sama_loss(logits, jnp.asarray(d['x_masks']), loss))
    ref = float(d[f'loss_{loss}'])
    print(f'float32 loss {loss:4s} {abs(ours - ref) / abs(ref):.1e}')
  _, loss, logits0, g = ts.grads64.__wrapped__()
  print(f'float64 loss iou {abs(loss - d["loss_iou64"]) / d["loss_iou64"]:.1e}')
  print(f'float64 logits frame 0 {ts.rel(logits0, d["logits64_frame0"]):.1e}')
  worst = 0.0
  for k in [k for k in d if k.startswith('grad64/')]:
    ref = d[k]
    if np.any(ref):
      worst = max(worst, ts.rel(ts.torch_layout(g, k[len('grad64/') :]), ref))
  print(
      f'float64 gradients, worst of {sum(k.startswith("grad64/") for k in d)} '
      f'tensors: {worst:.1e}'
  )


if __name__ == '__main__':
  main()
