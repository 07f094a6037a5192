"""Logging helpers: console (process 0), TensorBoard + JSONL metrics, progress bars."""

import json
import os
import sys

import itertools

from absl import flags
import jax
import orbax.checkpoint as ocp
import tqdm

_BARRIERS = itertools.count()


def barrier(name, timeout=1800):
  """Waits until every process is here (a no-op with one process).

  The coordination service's barrier, not a device collective: it has a
  timeout and does not care how long each process took to get here.
  """
  if jax.process_count() > 1:
    ocp.multihost.get_barrier_sync_fn()(
        key=f'{name}:{next(_BARRIERS)}', timeout_ms=timeout * 1000
    )


def use_service_barriers():
  """Orbax's barriers through the coordination service too (see `barrier`)."""
  flags.FLAGS['experimental_orbax_use_distributed_barrier'].value = True


class CompileThenMeet:
  """A jitted function compiled on its first call; then all processes meet.

  With several processes, the first run of a program sets up its
  cross-process communicators, and on CPUs gloo gives the peers only 30 s to
  join: one host compiling slower than another would fail the others.
  Compiling first and meeting at a `barrier` removes that race. Later calls
  run the compiled program (same shapes every call).
  """

  def __init__(self, jitted, name):
    self.jitted, self.name, self.compiled = jitted, name, None

  def __call__(self, *args):
    if self.compiled is None:
      self.compiled = self.jitted.lower(*args).compile()
      barrier(f'compiled {self.name}')
    return self.compiled(*args)


def log(msg):
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


def progress(total, initial=0, desc='', iterable=None):
  return tqdm.tqdm(
      iterable,
      total=total,
      initial=initial,
      desc=desc,
      dynamic_ncols=True,
      disable=jax.process_index() != 0,
      file=sys.stderr,
  )


def _truncate_jsonl(path, last_step):
  """Keeps the rows of `path` up to `last_step` (and complete lines only)."""
  keep = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a line cut by a kill
        continue
      if row.get('step', 0) <= last_step:
        keep.append(json.dumps(row) + '\n')
  with open(path + '.tmp', 'w') as f:
    f.writelines(keep)
  os.replace(path + '.tmp', path)


class MetricWriter:
  """Scalars to TensorBoard (`WORKDIR/tb`) and `WORKDIR/metrics.jsonl`; process 0 only."""

  def __init__(self, workdir, resume_step=None):
    """`resume_step`: rows of later steps (a run resumed there) are dropped."""
    self.active = jax.process_index() == 0
    self._tb = None
    if self.active:
      path = os.path.join(workdir, 'metrics.jsonl')
      if resume_step is not None and os.path.exists(path):
        _truncate_jsonl(path, resume_step)
      self._jsonl = open(path, 'a')
      try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        tf.config.set_visible_devices([], 'GPU')  # keep TF off accelerators
        self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tb'))
        self._tf = tf
      except ImportError:  # TensorBoard is optional
        pass

  def write(self, step, scalars):
    if not self.active:
      return
    self._jsonl.write(
        json.dumps(
            {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
        )
        + '\n'
    )
    self._jsonl.flush()
    if self._tb is not None:
      with self._tb.as_default(step=int(step)):
        for k, v in scalars.items():
          self._tf.summary.scalar(k, float(v))
      self._tb.flush()

  def close(self):
    if self.active:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()
