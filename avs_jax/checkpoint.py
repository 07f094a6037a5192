"""Orbax checkpoints: train state + grain iterator state, last K + best by val J.

Layout: `WORKDIR/checkpoints/<step>/{state,data}`. `state` holds
`{'step', 'params', 'batch_stats', 'opt_state'}`; `data` the grain iterator of
each process. A checkpoint written by `python -m avs_jax.convert` has the same
`state` item (no optimizer state, no `data`), so `--mode eval` restores both.
"""
import os
import re

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

BEST_METRIC = 'val_miou'


def manager(directory, keep=2, async_save=True) -> ocp.CheckpointManager:
  """Keeps the last `keep` checkpoints and the best by validation J."""
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC],
                                    n=1, keep_checkpoints_without_metrics=False),
  ])
  # best_fn is what makes the manager write the metrics to disk (without it
  # they live in memory only and `best_step` of a reloaded run sees none).
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, enable_async_checkpointing=async_save,
      best_fn=lambda m: m[BEST_METRIC], best_mode='max', create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=('state', 'data'))


def save(mngr, step, state, data_iter=None, metrics=None, force=False):
  items = {'state': ocp.args.StandardSave(state)}
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iter)
  return mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                   force=force)


def best_step(mngr):
  """The step with the highest validation J, else the latest step."""
  scored = []
  for step in mngr.all_steps():
    m = mngr.metrics(step)
    if m and BEST_METRIC in m:
      scored.append((m[BEST_METRIC], step))
  return max(scored)[1] if scored else mngr.latest_step()


def restore(mngr, step, abstract_state, data_iter=None):
  """Restores `state` (onto `abstract_state`'s shardings) and the iterator."""
  items = {'state': ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
  return mngr.restore(step, args=ocp.args.Composite(**items))


def resolve(path):
  """`DIR` (a checkpoints dir, latest/best step) or `DIR/STEP` -> (dir, step)."""
  path = os.path.abspath(path.rstrip('/'))
  if re.fullmatch(r'\d+', os.path.basename(path)) and os.path.isdir(
      os.path.join(path, 'state')):
    return os.path.dirname(path), int(os.path.basename(path))
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no such checkpoint directory')
  return path, None


def load_state(path):
  """The `state` item of a checkpoint (best step if none given), as arrays.

  Returns `(state dict, step)`. Works for training checkpoints and for those
  written by `python -m avs_jax.convert` (which have no optimizer state).
  """
  directory, step = resolve(path)
  with ocp.CheckpointManager(directory, item_names=('state', 'data')) as mngr:
    if step is None:
      step = best_step(mngr)
    if step is None:
      raise FileNotFoundError(f'{directory}: no checkpoints in it')
    # Saved on another topology (e.g. a pod, evaluated on one device): the
    # saved shardings do not load; restore replicated instead.
    replicated = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(jax.devices()), ('data',)),
        jax.sharding.PartitionSpec())
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(fallback_sharding=replicated)))
  return restored['state'], step


def abstract(tree, sharding=None):
  """`ShapeDtypeStruct`s of `tree` (optionally all with one sharding)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=sharding or getattr(
                                         x, 'sharding', None)), tree)
