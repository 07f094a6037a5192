"""Orbax manager policy: the last K checkpoints plus the best by val J."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avs_jax import checkpoint as ckpt_lib


def test_best_by_val_j_is_kept_and_found_after_reload(tmp_path):
  d = str(tmp_path / 'ckpt')
  mngr = ckpt_lib.manager(d, keep=1)
  # val J per step; step 4 is a preemption save without metrics.
  for step, j in [(1, 0.3), (2, np.float64(0.9)), (3, 0.5), (4, None)]:
    ckpt_lib.save(
        mngr,
        step,
        {'w': jnp.full((3,), float(step))},
        metrics=None if j is None else {ckpt_lib.BEST_METRIC: j},
        force=True,
    )
  mngr.wait_until_finished()
  mngr.close()
  # A new manager (a new process: eval, resume) sees the metrics on disk.
  mngr = ckpt_lib.manager(d, keep=1)
  assert mngr.all_steps() == [2, 4]  # best + latest
  assert mngr.metrics(2) == {ckpt_lib.BEST_METRIC: 0.9}
  assert ckpt_lib.best_step(mngr) == 2
  mngr.close()
  state, step = ckpt_lib.load_state(d)  # no step given: the best
  assert step == 2
  np.testing.assert_array_equal(state['w'], [2.0, 2.0, 2.0])


def test_without_metrics_the_latest_is_used(tmp_path):
  d = str(tmp_path / 'ckpt')
  mngr = ckpt_lib.manager(d, keep=2)
  for step in (1, 2):
    ckpt_lib.save(mngr, step, {'w': jnp.zeros(2)}, force=True)
  mngr.wait_until_finished()
  assert ckpt_lib.best_step(mngr) == 2
  mngr.close()


def test_a_checkpoint_of_another_model_is_one_clear_error(tmp_path):
  """Resuming (`check_fits`, from the saved metadata) names the step's path
  and the first differing shapes, before anything is restored."""
  d = str(tmp_path / 'ckpt')
  mngr = ckpt_lib.manager(d, keep=1)
  saved = {
      'params': {'conv': {'kernel': jnp.zeros((3, 3, 8, 16))}},
      'batch_stats': {'bn': {'mean': jnp.zeros(16)}},
      'opt_state': jnp.zeros(2),
  }
  ckpt_lib.save(mngr, 5, saved, force=True)
  mngr.wait_until_finished()
  ckpt_lib.check_fits(mngr, 5, saved)  # the same model: no error
  other = jax.tree_util.tree_map(lambda x: x, saved)
  other['params']['conv']['kernel'] = jnp.zeros((3, 3, 8, 32))
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ckpt_lib.check_fits(mngr, 5, other)
  msg = str(e.value)
  assert os.path.join(d, '5') in msg and 'does not fit' in msg
  assert "['conv']['kernel']: saved (3, 3, 8, 16), model (3, 3, 8, 32)" in msg
  mngr.close()
