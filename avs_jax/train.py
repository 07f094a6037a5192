"""Training: one sharded `jax.jit` step over a mesh of all devices, one loop.

The global batch is split over the mesh's `data` axis; parameters are
replicated, or sharded over the same axis (`train.fsdp`). BatchNorm
statistics are computed over the global batch (synchronised). The frozen
VGGish runs inside the step on the log-mel examples, or, with
`audio.precompute`, once per training clip before training (the same
embeddings: VGGish has no batch-dependent ops). Either way the data does not
depend on audio weights, and `eval.audio` can break the audio at evaluation.
"""

import dataclasses
import functools
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from avs_jax import checkpoint as ckpt_lib
from avs_jax import data as data_lib
from avs_jax import evaluate
from avs_jax import families
from avs_jax import runtime
from avs_jax import utils


def make_optimizer(
    tc, total_steps, *, model_name='avs', frozen_steps=0, per_epoch=1
):
  """The family's update rule (`families`: Adam with PyTorch's defaults, or
  AdamW, for the paper's model) at `train.lr` on `train.schedule`, with the
  optional clipping and accumulation. `frozen_steps`: optimizer steps with a
  frozen backbone (AVSegFormer); `per_epoch`: steps per epoch (the per-epoch
  cosine). Returns `(optimizer, learning rate or schedule)`.
  """
  lr = _learning_rate(tc, total_steps, per_epoch)
  opt = families.get(model_name).optimizer(tc, lr, frozen_steps)
  if tc.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(tc.grad_clip), opt)
  if tc.accum_steps > 1:
    opt = optax.MultiSteps(opt, every_k_schedule=tc.accum_steps)
  return opt, lr


def _learning_rate(tc, total_steps, per_epoch=1):
  """`train.schedule` (with `train.warmup_steps`): a schedule or a float.

  'cosine_per_epoch': PyTorch's `CosineAnnealingLR(T_max=epochs,
  eta_min=train.lr_min)` stepped once per epoch (SAMA-AVS).
  """
  if tc.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0,
        tc.lr,
        max(tc.warmup_steps, 1),
        max(total_steps, tc.warmup_steps + 1),
    )
  if tc.schedule == 'cosine_per_epoch':
    epochs, lo = max(total_steps // per_epoch, 1), tc.get('lr_min', 0.0)

    def lr_at(step):
      epoch = step // per_epoch
      return lo + (tc.lr - lo) * (1 + jnp.cos(jnp.pi * epoch / epochs)) / 2

    return lr_at
  if tc.schedule != 'constant':
    raise ValueError(
        'train.schedule must be constant, cosine or cosine_per_epoch, got '
        f'{tc.schedule!r}'
    )
  if not tc.warmup_steps:
    return tc.lr
  return optax.join_schedules(
      [
          optax.linear_schedule(0.0, tc.lr, tc.warmup_steps),
          optax.constant_schedule(tc.lr),
      ],
      [tc.warmup_steps],
  )


def run_optimizer(config, sched):
  """`make_optimizer` for a run of `config` with the `Schedule` `sched`."""
  return make_optimizer(
      config.train,
      sched.total,
      model_name=runtime.model_name(config),
      frozen_steps=frozen_backbone_steps(config, sched.per_epoch),
      per_epoch=-(-sched.per_epoch // config.train.accum_steps),
  )


def build_training(config, sched):
  """`(model, vggish, optimizer, lr_fn)` of a run of `config` and `sched`
  (`train.remat`, `train.dtype`, the optimizer of `config.model.name`)."""
  model, vggish = runtime.build(config, remat=config.train.remat)
  optimizer, lr_fn = run_optimizer(config, sched)
  return model, vggish, optimizer, lr_fn


def frozen_backbone_steps(config, per_epoch):
  """Optimizer steps with a frozen backbone (`train.freeze_backbone_epochs`)."""
  tc = config.train
  epochs = tc.get('freeze_backbone_epochs', 0)
  return -(-epochs * per_epoch // tc.accum_steps)


def loss_fn(params, state, batch, audio_vars, *, model, vggish, config):
  """`(loss, (aux, new batch_stats))` of a global batch in train mode.

  Audio: `batch['audio']` embeddings if present (`audio.precompute`), else
  the frozen VGGish on `batch['log_mel']`. The family's `train_frames` may
  keep each clip's first frames only; its `loss` gives the loss.
  """
  family = families.get(config)
  audio = (
      batch['audio']
      if 'audio' in batch
      else runtime.audio_embeddings(vggish, audio_vars, batch['log_mel'])
  )
  frames, n = batch['frames'], family.train_frames(config)
  if n is not None:
    frames, audio = frames[:, :n], audio[:, :n]
  extra = {'frame_mask': batch['frame_mask']} if 'frame_mask' in batch else {}
  out, new_stats = model.apply(
      {'params': params, 'batch_stats': state.batch_stats},
      frames,
      audio,
      train=True,
      mutable=['batch_stats'],
      rngs={
          'dropout': jax.random.fold_in(jax.random.key(config.seed), state.step)
      },
      **extra,
  )
  loss, aux = family.loss(out, batch, config)
  return loss, (aux, new_stats.get('batch_stats', {}))


def loss_and_grads(state, batch, audio_vars, *, model, vggish, config):
  """`(loss, aux, batch_stats), grads` of `loss_fn` at `state.params`."""
  (loss, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params,
      state,
      batch,
      audio_vars,
      model=model,
      vggish=vggish,
      config=config,
  )
  return (loss, aux, batch_stats), grads


def train_step(state, batch, audio_vars, *, model, vggish, optimizer, config):
  """One optimizer step on a global batch. Returns (state, metrics)."""
  (loss, aux, batch_stats), grads = loss_and_grads(
      state, batch, audio_vars, model=model, vggish=vggish, config=config
  )
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
      step=state.step + 1,
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
  )
  # aux: the family's terms, e.g. 'bce' and 'avm' (S4/MS3), 'ce' and 'avm'
  # (AVSS), 'iou' and 'mix' (AVSegFormer)
  return new_state, dict(loss=loss, **aux, grad_norm=optax.tree.norm(grads))


def state_loss(state, batch, audio_vars, *, model, vggish, config):
  """The loss the next step would see with `state` on `batch` (no update)."""
  return loss_fn(
      state.params,
      state,
      batch,
      audio_vars,
      model=model,
      vggish=vggish,
      config=config,
  )[0]


class Preemption:
  """Turns SIGTERM into a flag the loop polls (save, then exit cleanly).

  One process only: with several, JAX's own SIGTERM notifier tells every
  process at the same step (Orbax's `reached_preemption`).
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def check_finite(first_step, losses_since):
  """Raises FloatingPointError naming the first step with a non-finite loss.

  `losses_since`: the (device) losses of steps `first_step, first_step+1...`,
  fetched here in one transfer.
  """
  for step, loss in enumerate(jax.device_get(losses_since), first_step):
    if not np.isfinite(loss):
      raise FloatingPointError(
          f'loss is {float(loss)} at step {step}: stopping. Lower train.lr, '
          'enable train.grad_clip, or check the data; the checkpoints kept in '
          'WORKDIR/checkpoints are all finite.'
      )


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Step counts of a run, from the config and the training set's size."""

  total: int
  per_epoch: int
  eval_every: int
  checkpoint_every: int
  log_every: int
  eval_start: int = 0  # no validation before this step (train.eval_start_epoch)

  @classmethod
  def of(cls, config, num_train, log=True):
    """The schedule of a training set of `num_train` clips (logged)."""
    tc = config.train
    per_epoch = max(num_train // tc.batch_size, 1)
    total = tc.num_steps if tc.num_steps > 0 else tc.num_epochs * per_epoch
    eval_every = max(per_epoch * tc.eval_every_epochs, 1)
    if log:
      utils.log(
          f'{num_train} train clips, {per_epoch} steps/epoch, {total} steps, '
          f'global batch {tc.batch_size} on {jax.device_count()} devices / '
          f'{jax.process_count()} processes'
      )
    return cls(
        total,
        per_epoch,
        eval_every,
        tc.checkpoint_every or eval_every,
        tc.log_every,
        per_epoch * tc.get('eval_start_epoch', 0),
    )

  def is_eval(self, step):
    due = step % self.eval_every == 0 and step >= self.eval_start
    return due or step == self.total

  def is_save(self, step):
    return self.is_eval(step) or step % self.checkpoint_every == 0

  def is_log(self, step):
    return step % self.log_every == 0 or step == self.total


def _data_and_state(config, mngr, model, optimizer, mesh):
  """`(train iterator, state, first step)`: resumed from `mngr`, or fresh."""
  dc, tc = config.data, config.train
  nproc = jax.process_count()
  train_iter = iter(
      data_lib.train_dataset(
          dc.dir,
          dc.setting,
          batch_size=tc.batch_size // nproc,
          image_size=dc.image_size,
          seed=config.seed,
          num_workers=dc.num_workers,
          process_index=jax.process_index(),
          process_count=nproc,
      )
  )
  abstract, shardings = runtime.abstract_train_state(
      config, model, optimizer, mesh
  )
  target = runtime.restore_target(abstract, shardings)
  while mngr.latest_step() is not None:
    start = mngr.latest_step()
    try:
      restored = ckpt_lib.restore(mngr, start, target, train_iter)
    except ckpt_lib.CheckpointError:  # does not fit the model: stop, say why
      raise
    except Exception as e:  # pylint: disable=broad-except  # damaged files
      ckpt_lib.set_aside(mngr, start, ckpt_lib.reason(e))
      continue
    utils.log(f'resumed from {mngr.directory} at step {start}')
    return restored['data'], runtime.TrainState(**restored['state']), start
  return (
      train_iter,
      runtime.initial_state(config, model, optimizer, shardings),
      0,
  )


def jit_train_step(config, model, vggish, optimizer, mesh, shardings):
  """The jitted `train_step`: state in and out with `shardings` (donated),
  the batch split over `mesh`'s `data` axis, audio weights and metrics
  replicated. `--mode=train` runs it; `--mode=compile` (`aot`) compiles it
  for a TPU slice."""
  data, rep = runtime.batch_sharding(mesh), runtime.replicated(mesh)
  return jax.jit(
      functools.partial(
          train_step,
          model=model,
          vggish=vggish,
          optimizer=optimizer,
          config=config,
      ),
      in_shardings=(shardings, data, rep),
      out_shardings=(shardings, rep),
      donate_argnums=(0,),
  )


def _compile_steps(config, model, vggish, optimizer, mesh, state):
  """The jitted train step and the (no-update) loss check of a state."""
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  data, rep = runtime.batch_sharding(mesh), runtime.replicated(mesh)
  step_fn = jit_train_step(config, model, vggish, optimizer, mesh, shardings)
  loss_of = jax.jit(
      functools.partial(state_loss, model=model, vggish=vggish, config=config),
      in_shardings=(shardings, data, rep),
      out_shardings=rep,
  )
  return (
      utils.CompileThenMeet(step_fn, 'train step'),
      utils.CompileThenMeet(loss_of, 'state loss'),
  )


def train_and_evaluate(config, workdir):
  """Trains per `config`, resuming from `workdir`; ends with test evaluation.

  Returns the test results of the best checkpoint, or None when stopped by
  a preemption signal (after saving; the same command resumes).
  """
  tc, dc = config.train, config.data
  runtime.check_config(config)
  os.makedirs(workdir, exist_ok=True)
  sched = Schedule.of(
      config, data_lib.num_examples(dc.dir, dc.setting, 'train')
  )
  mesh = runtime.make_mesh()
  model, vggish, optimizer, lr_fn = build_training(config, sched)
  audio_vars = runtime.audio_variables(config, vggish, mesh)
  table = (
      runtime.embedding_table(config, vggish, audio_vars)
      if config.audio.precompute
      else None
  )
  mngr = ckpt_lib.manager(os.path.join(workdir, 'checkpoints'), keep=tc.keep)
  train_iter, state, start = _data_and_state(
      config, mngr, model, optimizer, mesh
  )
  step_fn, loss_of = _compile_steps(
      config, model, vggish, optimizer, mesh, state
  )
  loop = Loop(
      config,
      workdir,
      sched,
      mngr,
      start,
      lr_fn,
      evaluate.Evaluator(config, model, vggish, mesh, audio_vars),
  )
  sharding = runtime.batch_sharding(mesh)
  try:
    for step in range(start, sched.total):
      host = next(train_iter)
      batch = runtime.to_device(
          runtime.with_audio(host, table) if table is not None else host,
          sharding,
      )
      state, metrics = step_fn(state, batch, audio_vars)
      if loop.after_step(
          step + 1,
          state,
          metrics,
          train_iter,
          lambda s: loss_of(s, batch, audio_vars),
      ):
        return None  # preempted, saved
  finally:
    loop.close()
  best = ckpt_lib.best_step(mngr)
  mngr.close()
  utils.log(
      f'evaluating the best checkpoint (step {best}) on {config.eval.split}'
  )
  return evaluate.evaluate_checkpoint(
      config, workdir, os.path.join(mngr.directory, str(best))
  )


class Loop:
  """What happens between steps: finite checks, logs, validation, saving."""

  def __init__(self, config, workdir, sched, mngr, start, lr_fn, evaluator):
    self.config, self.sched, self.mngr = config, sched, mngr
    self.lr_fn, self.evaluator = lr_fn, evaluator
    self.writer = utils.MetricWriter(workdir, resume_step=start)
    self.bar = utils.progress(sched.total, start, 'train')
    self.preempt = Preemption()
    self.losses, self.first = [], start + 1  # unchecked losses since `first`
    self.t0, self.last_log = time.time(), start

  def after_step(self, done, state, metrics, train_iter, loss_of):
    """Returns True when preempted (the state is saved: stop now)."""
    self.bar.update(1)
    self.losses.append(metrics['loss'])
    preempted = self.preempt.requested or self.mngr.reached_preemption(done)
    save = self.sched.is_save(done) or preempted
    if self.sched.is_log(done) or save:
      check_finite(self.first, self.losses)
      self.losses, self.first = [], done + 1
    if self.sched.is_log(done):
      self._log(done, metrics)
    if save:
      self._validate_and_save(done, state, train_iter, loss_of)
    if preempted:
      self.mngr.wait_until_finished()
      utils.log(
          f'preempted: saved step {done} to {self.mngr.directory}; '
          're-run the same command to resume'
      )
    return preempted

  def _log(self, done, metrics):
    dt = (time.time() - self.t0) / max(done - self.last_log, 1)
    self.t0, self.last_log = time.time(), done
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    lr = self.lr_fn(done) if callable(self.lr_fn) else self.lr_fn
    scalars.update(
        lr=float(lr),
        step_time=dt,
        clips_per_sec=self.config.train.batch_size / dt,
    )
    self.writer.write(done, scalars)
    self.bar.set_postfix(loss=f'{scalars["loss"]:.4f}')

  def _validate_and_save(self, done, state, train_iter, loss_of):
    """Checkpoint `state` (after step `done`), with val J at eval steps.

    The state itself is checked first: its parameters must give a finite
    loss on the last batch, so no diverged state becomes a checkpoint.
    """
    loss = float(jax.device_get(loss_of(state)))
    if not np.isfinite(loss):
      raise FloatingPointError(
          f'the parameters after step {done} give a loss of {loss}: not saved,'
          ' stopping. Lower train.lr or enable train.grad_clip; the '
          'checkpoints kept in WORKDIR/checkpoints are all finite.'
      )
    metrics = None
    if self.sched.is_eval(done):
      val = self.evaluator.run(
          state.variables,
          self.config.data.setting,
          self.config.eval.val_split,
          desc=f'val@{done}',
      )
      metrics = {ckpt_lib.BEST_METRIC: val['miou'], 'val_fscore': val['fscore']}
      self.writer.write(done, metrics)
      if jax.process_index() == 0:
        self.bar.write(
            f'step {done}: val J {val["miou"]:.4f} F ' f'{val["fscore"]:.4f}'
        )
    ckpt_lib.save(
        self.mngr,
        done,
        state.as_dict(),
        train_iter,
        metrics=metrics,
        force=True,
    )

  def close(self):
    self.bar.close()
    self.preempt.restore()
    self.mngr.wait_until_finished()
    self.writer.close()
