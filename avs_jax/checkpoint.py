"""Orbax checkpoints: train state + grain iterator state, last K + best by val J.

Layout: `WORKDIR/checkpoints/<step>/{state,data}`. `state` holds
`{'step', 'params', 'batch_stats', 'opt_state'}`; `data` the grain iterator of
each process. A checkpoint written by `python -m avs_jax.convert` has the same
`state` item (no optimizer state, no `data`), so `--mode eval` restores both.
"""

import os
import re
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from avs_jax import utils

BEST_METRIC = 'val_miou'


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: names the step directory and why."""


def reason(e):
  """One line of an exception: its type and its message's first line."""
  lines = str(e).strip().splitlines()
  return f'{type(e).__name__}: {lines[0][:300] if lines else ""}'.rstrip(': ')


def set_aside(mngr, step, why):
  """Renames a damaged step `DIR/N` to `DIR/N.damaged` (nothing deleted).

  Every process calls it; process 0 renames, then all re-read the steps.
  """
  src = os.path.join(str(mngr.directory), str(step))
  dst = src + '.damaged'
  if jax.process_index() == 0:
    n = 1
    while os.path.exists(dst):
      n += 1
      dst = f'{src}.damaged{n}'
    os.rename(src, dst)
    print(
        f'warning: checkpoint step {step} ({src}) is damaged ({why}); '
        f'moved to {dst}, using the previous one',
        file=sys.stderr,
        flush=True,
    )
  utils.barrier(f'set aside {step}')
  mngr.reload()


def manager(directory, keep=2, async_save=True) -> ocp.CheckpointManager:
  """Keeps the last `keep` checkpoints and the best by validation J."""
  policy = ocp.checkpoint_managers.AnyPreservationPolicy(
      [
          ocp.checkpoint_managers.LatestN(n=keep),
          ocp.checkpoint_managers.BestN(
              get_metric_fn=lambda m: m[BEST_METRIC],
              n=1,
              keep_checkpoints_without_metrics=False,
          ),
      ]
  )
  # best_fn is what makes the manager write the metrics to disk (without it
  # they live in memory only and `best_step` of a reloaded run sees none).
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      enable_async_checkpointing=async_save,
      best_fn=lambda m: m[BEST_METRIC],
      best_mode='max',
      create=True,
  )
  return ocp.CheckpointManager(
      os.path.abspath(directory), options=options, item_handlers=_handlers()
  )


def _handlers():
  return {
      'state': ocp.StandardCheckpointHandler(),
      'data': grain.checkpoint.CheckpointHandler(),
  }


def save(mngr, step, state, data_iter=None, metrics=None, force=False):
  items = {'state': ocp.args.StandardSave(state)}
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iter)
  return mngr.save(
      step, args=ocp.args.Composite(**items), metrics=metrics, force=force
  )


def best_step(mngr):
  """The step with the highest validation J, else the latest step."""
  scored = []
  for step in mngr.all_steps():
    m = mngr.metrics(step)
    if m and BEST_METRIC in m:
      scored.append((m[BEST_METRIC], step))
  return max(scored)[1] if scored else mngr.latest_step()


def check_fits(mngr, step, abstract_state):
  """Raises CheckpointError when the saved shapes are not the model's."""
  meta = mngr.item_metadata(step)['state']
  meta = getattr(meta, 'tree', meta)
  model = lambda t: {c: t[c] for c in ('params', 'batch_stats')}
  check_shapes(
      model(meta),
      model(abstract_state),
      os.path.join(str(mngr.directory), str(step)),
      ' Use the config it was trained with, or another workdir.',
  )


def check_shapes(saved, want, path, advice=''):
  """CheckpointError naming `path` unless the trees `saved` and `want` have
  the same leaves and shapes (up to 3 differences shown)."""

  def shapes(tree):
    return {
        jax.tree_util.keystr(k): tuple(v.shape)
        for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }

  saved, want = shapes(saved), shapes(want)
  if saved == want:
    return
  diff = (
      sorted(set(saved) ^ set(want))[:3]
      + [
          f'{k}: saved {saved[k]}, model {want[k]}'
          for k in sorted(set(saved) & set(want))
          if saved[k] != want[k]
      ][:3]
  )
  raise CheckpointError(
      f'{path} does not fit the model of this config (another model size or '
      f'backbone?): {"; ".join(diff)}.{advice}'
  )


def restore(mngr, step, abstract_state, data_iter=None):
  """Restores `state` (onto `abstract_state`'s shardings) and the iterator.

  Raises CheckpointError if the checkpoint does not fit `abstract_state`;
  other exceptions mean damaged files.
  """
  check_fits(mngr, step, abstract_state)
  items = {'state': ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
  return mngr.restore(step, args=ocp.args.Composite(**items))


def resolve(path):
  """`DIR` (a checkpoints dir, latest/best step) or `DIR/STEP` -> (dir, step)."""
  path = os.path.abspath(path.rstrip('/'))
  if re.fullmatch(r'\d+', os.path.basename(path)) and os.path.isdir(
      os.path.join(path, 'state')
  ):
    return os.path.dirname(path), int(os.path.basename(path))
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no such checkpoint directory')
  return path, None


def best_checkpoint(path):
  """`(DIR/STEP, STEP)` of `path`: its own step, else the best by val J."""
  directory, step = resolve(path)
  if step is None:
    with ocp.CheckpointManager(directory, item_handlers=_handlers()) as m:
      step = best_step(m)
  if step is None:
    raise FileNotFoundError(f'{directory}: no checkpoints in it')
  return os.path.join(directory, str(step)), step


def load_state(path):
  """The `state` item of a checkpoint (best step if none given), as arrays.

  Returns `(state dict, step)`. Works for training checkpoints and for those
  written by `python -m avs_jax.convert` (which have no optimizer state).
  """
  directory, step = resolve(best_checkpoint(path)[0])
  # Replicated over every device whatever the topology it was saved on (N
  # processes or devices -> M): a global array that every process reads.
  replicated = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.asarray(jax.devices()), ('data',)),
      jax.sharding.PartitionSpec(),
  )
  with ocp.CheckpointManager(directory, item_handlers=_handlers()) as mngr:
    try:
      meta = mngr.item_metadata(step)['state']
      target = jax.tree_util.tree_map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
          getattr(meta, 'tree', meta),
      )
      restored = mngr.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
      )
    except Exception as e:  # pylint: disable=broad-except  # any damage
      raise CheckpointError(
          f'{os.path.join(directory, str(step))}: damaged checkpoint, cannot '
          f'be read ({reason(e)}); use another step '
          f'(DIR/STEP)'
      ) from e
  return restored['state'], step


def save_variables(variables, out_dir, step=0):
  """`{'params', 'batch_stats'}` as a checkpoint `load_state` restores.

  Returns the step's directory. What `python -m avs_jax.convert` writes.
  """
  state = {
      'step': np.asarray(step, np.int32),
      'params': variables['params'],
      'batch_stats': variables.get('batch_stats', {}),
  }
  mngr = manager(out_dir, keep=1, async_save=False)
  mngr.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
      force=True,
  )
  mngr.wait_until_finished()
  mngr.close()
  return os.path.join(os.path.abspath(out_dir), str(step))


def abstract(tree, sharding=None):
  """`ShapeDtypeStruct`s of `tree` (optionally all with one sharding)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=sharding or getattr(x, 'sharding', None)
      ),
      tree,
  )
