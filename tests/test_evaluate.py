"""Evaluation pieces that need no model: broken audio, result names, rows."""

import jax
import numpy as np
import pytest

from avs_jax import evaluate
from avs_jax import runtime


def _log_mel(b, seed=0):
  return (
      np.random.default_rng(seed).normal(size=(b, 5, 96, 64)).astype(np.float32)
  )


def test_break_audio_true_and_silent():
  x = _log_mel(3)
  valid = np.array([True, True, False])
  assert evaluate.break_audio(x, valid, 'true') is x
  s = evaluate.break_audio(x, valid, 'silent')
  assert s.shape == x.shape and s.dtype == x.dtype
  np.testing.assert_array_equal(s, np.full_like(x, np.log(0.01)))
  np.testing.assert_allclose(evaluate.SILENT_LOG_MEL, np.log(0.01))
  with pytest.raises(ValueError, match='eval.audio'):
    evaluate.break_audio(x, valid, 'reversed')


def test_break_audio_shuffled_permutes_valid_clips_only():
  x = _log_mel(5)
  before = x.copy()
  valid = np.array([True, False, True, True, False])
  out = evaluate.break_audio(x, valid, 'shuffled')
  np.testing.assert_array_equal(x, before)  # input untouched
  # Valid clips get each other's audio (a derangement: never their own).
  src = [
      int(np.flatnonzero([(out[i] == x[j]).all() for j in range(5)])[0])
      for i in range(5)
  ]
  assert sorted(src[i] for i in (0, 2, 3)) == [0, 2, 3]
  assert all(src[i] != i for i in (0, 2, 3))
  # Padding keeps its own (ignored) audio.
  np.testing.assert_array_equal(out[[1, 4]], x[[1, 4]])


def test_break_audio_single_valid_clip_borrows_previous_batch():
  x = _log_mel(2)
  valid = np.array([True, False])
  previous = _log_mel(3, seed=1)
  out = evaluate.break_audio(x, valid, 'shuffled', previous)
  np.testing.assert_array_equal(out[0], previous[0])
  np.testing.assert_array_equal(out[1], x[1])
  # With no previous batch there is nothing to swap with.
  np.testing.assert_array_equal(evaluate.break_audio(x, valid, 'shuffled'), x)


def test_result_names():
  assert evaluate.result_name('test', 'true') == 'eval_test.json'
  assert evaluate.result_name('val', 'silent') == 'eval_val_silent.json'


def test_local_rows_of_a_batch_sharded_array():
  mesh = runtime.make_mesh()
  x = np.arange(4 * jax.device_count() * 3).reshape(-1, 3)
  arr = runtime.to_device({'frames': x}, runtime.batch_sharding(mesh))['frames']
  np.testing.assert_array_equal(evaluate.local_rows(arr), x)
