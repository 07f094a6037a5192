"""Training: one sharded `jax.jit` step over a mesh of all devices, one loop.

The global batch is split over the mesh's `data` axis; parameters are
replicated, or sharded over the same axis (`train.fsdp`). The frozen VGGish
runs inside the step on the log-mel examples, so the data never depends on
audio weights and `eval.audio` can break the audio at evaluation time.
BatchNorm statistics are computed over the global batch (synchronised).
"""
import functools
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from avs_jax import checkpoint as ckpt_lib
from avs_jax import convert
from avs_jax import data as data_lib
from avs_jax import evaluate
from avs_jax import losses
from avs_jax import metrics as metrics_lib
from avs_jax import utils
from avs_jax.models import build_model
from avs_jax.models import build_vggish

NUMERIC_KEYS = ('frames', 'log_mel', 'audio', 'masks', 'labelled', 'valid')


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any


def make_optimizer(tc, total_steps):
  """Adam (PyTorch defaults) with the optional schedule/decay/clip/accumulation."""
  if tc.schedule == 'cosine':
    lr = optax.warmup_cosine_decay_schedule(0.0, tc.lr, max(tc.warmup_steps, 1),
                                            max(total_steps, tc.warmup_steps + 1))
  elif tc.schedule == 'constant':
    lr = (optax.linear_schedule(0.0, tc.lr, tc.warmup_steps)
          if tc.warmup_steps else tc.lr)
    if tc.warmup_steps:
      lr = optax.join_schedules([lr, optax.constant_schedule(tc.lr)],
                                [tc.warmup_steps])
  else:
    raise ValueError(f'train.schedule must be constant or cosine, got '
                     f'{tc.schedule!r}')
  if tc.weight_decay > 0:
    opt = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8,
                      weight_decay=tc.weight_decay)
  else:
    opt = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
  if tc.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(tc.grad_clip), opt)
  if tc.accum_steps > 1:
    opt = optax.MultiSteps(opt, every_k_schedule=tc.accum_steps)
  return opt, lr


def make_mesh():
  """1-D mesh of every device; Auto axes: XLA propagates shardings (pjit)."""
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))


def state_shardings(abstract_state, mesh, fsdp):
  """Replicated, or FSDP: each leaf's largest axis divisible by the mesh."""
  n = mesh.shape['data']

  def spec(x):
    if not fsdp or x.ndim == 0 or n == 1:
      return NamedSharding(mesh, P())
    order = sorted(range(x.ndim), key=lambda a: -x.shape[a])
    for a in order:
      if x.shape[a] % n == 0 and x.size >= 2**14:
        parts = [None] * x.ndim
        parts[a] = 'data'
        return NamedSharding(mesh, P(*parts))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map(spec, abstract_state)


def to_device(batch, sharding):
  """Per-process numpy batch -> global arrays sharded over `data`."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items() if k in NUMERIC_KEYS}


def dtype_of(config):
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[config.train.dtype]


def load_audio_variables(config, vggish):
  """VGGish variables from `audio.vggish_checkpoint`, else random (demo)."""
  ac = config.audio
  if ac.vggish_checkpoint:
    sd = convert.load_state_dict(ac.vggish_checkpoint)
    pca = convert.load_state_dict(ac.pca_checkpoint) if ac.pca_checkpoint \
        else None
    return convert.vggish_torch_to_flax(sd, pca)
  utils.log('audio.vggish_checkpoint is empty: VGGish has RANDOM frozen '
            'weights (fine for the synthetic demo, not for AVSBench).')
  return vggish.init(jax.random.key(12345), jnp.zeros((1, 96, 64)))


def init_variables(config, model, image_size):
  h, w = data_lib.records.image_hw(image_size)
  frames = jnp.zeros((1, 1, h, w, 3))
  audio = jnp.zeros((1, 1, 128))
  return model.init(jax.random.key(config.seed), frames, audio)


def apply_pretrained(config, variables):
  """ImageNet backbone (`train.init_backbone`) or a whole checkpoint (`init_from`)."""
  tc = config.train
  if tc.init_backbone:
    sd = convert.load_state_dict(tc.init_backbone)
    variables = convert.merge_variables(
        variables, convert.torch_to_flax(sd, config.model))
    utils.log(f'initialised the encoder from {tc.init_backbone}')
  if tc.init_from:
    restored, step = ckpt_lib.load_state(tc.init_from)
    variables = convert.merge_variables(
        variables, {'params': restored['params'],
                    'batch_stats': restored['batch_stats']})
    utils.log(f'initialised the model from {tc.init_from} (step {step})')
  return variables


def audio_embeddings(vggish, audio_vars, log_mel):
  """`[B, T, 96, 64]` -> `[B, T, 128]`, frozen."""
  return jax.lax.stop_gradient(vggish.apply(audio_vars, log_mel))


def embedding_table(config, vggish, audio_vars, split='train'):
  """`{clip id: [T, 128]}`: the frozen VGGish run once over a split.

  Every process computes the whole split on its local devices (no
  collectives); VGGish has no batch-dependent ops, so the embeddings are
  those the train step would compute from the clip's log-mel.
  """
  dc = config.data
  apply = jax.jit(functools.partial(audio_embeddings, vggish))
  ds = data_lib.eval_dataset(dc.dir, dc.setting, split,
                             batch_size=config.eval.batch_size,
                             image_size=dc.image_size,
                             num_workers=dc.num_workers,
                             process_index=0, process_count=1)
  total = -(-data_lib.num_examples(dc.dir, dc.setting, split) //
            config.eval.batch_size)
  table = {}
  for batch in utils.progress(total, 0, f'VGGish on {split}', iterable=ds):
    emb = np.asarray(apply(audio_vars, batch['log_mel']))
    for i, e, ok in zip(batch['id'], emb, batch['valid']):
      if ok:
        table[str(i)] = e
  return table


def with_audio(batch, table):
  """The batch with `audio` `[B, T, 128]` from `table` in place of `log_mel`."""
  batch = dict(batch)
  del batch['log_mel']
  batch['audio'] = np.stack([table[str(i)] for i in batch['id']])
  return batch


def train_step(state, batch, audio_vars, *, model, vggish, optimizer, config):
  """One optimizer step on a global batch. Returns (state, metrics).

  Audio: `batch['audio']` embeddings if present (`audio.precompute`), else
  the frozen VGGish on `batch['log_mel']`.
  """
  lc = config.loss
  audio = batch['audio'] if 'audio' in batch else audio_embeddings(
      vggish, audio_vars, batch['log_mel'])

  def loss_fn(params):
    out, new_stats = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch['frames'],
        audio, train=True, mutable=['batch_stats'],
        rngs={'dropout': jax.random.fold_in(jax.random.key(config.seed),
                                            state.step)})
    loss, aux = losses.avs_loss(
        out, batch['masks'], setting=config.data.setting,
        avm_weight=lc.avm_weight, avm_stages=tuple(lc.avm_stages),
        avm_loss=lc.avm_loss, avm_closer=lc.avm_closer,
        avm_threshold=lc.avm_threshold, avm_norm=lc.avm_norm,
        avm_pooling=lc.avm_pooling)
    return loss, (aux, new_stats['batch_stats'])

  (loss, (aux, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=batch_stats, opt_state=opt_state)
  return new_state, {'loss': loss, 'bce': aux['bce'], 'avm': aux['avm'],
                     'grad_norm': optax.tree.norm(grads)}


class Preemption:
  """Turns SIGTERM into a flag the loop polls (save, then exit cleanly)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config, workdir):
  """Trains per `config`, resuming from `workdir`; ends with test evaluation."""
  tc, dc = config.train, config.data
  os.makedirs(workdir, exist_ok=True)
  writer = utils.MetricWriter(workdir)
  mesh = make_mesh()
  data_sharding = NamedSharding(mesh, P('data'))
  nproc = jax.process_count()
  if tc.batch_size % jax.device_count():
    raise ValueError(f'train.batch_size={tc.batch_size} must be a multiple of '
                     f'the device count {jax.device_count()}')
  local_bs = tc.batch_size // nproc

  num_train = data_lib.num_examples(dc.dir, dc.setting, 'train')
  steps_per_epoch = max(num_train // tc.batch_size, 1)
  total_steps = tc.num_steps if tc.num_steps > 0 else \
      tc.num_epochs * steps_per_epoch
  eval_every = max(steps_per_epoch * tc.eval_every_epochs, 1)
  ckpt_every = tc.checkpoint_every or eval_every
  utils.log(f'{num_train} train clips, {steps_per_epoch} steps/epoch, '
            f'{total_steps} steps, global batch {tc.batch_size} on '
            f'{jax.device_count()} devices / {nproc} processes')

  train_ds = data_lib.train_dataset(
      dc.dir, dc.setting, batch_size=local_bs, image_size=dc.image_size,
      seed=config.seed, num_workers=dc.num_workers,
      process_index=jax.process_index(), process_count=nproc)
  train_iter = iter(train_ds)

  dtype = dtype_of(config)
  model = build_model(config.model, dtype=dtype, remat=tc.remat)
  vggish = build_vggish(postprocess=config.audio.postprocess, dtype=dtype)
  optimizer, lr_fn = make_optimizer(tc, total_steps)

  def init_state():
    variables = init_variables(config, model, dc.image_size)
    return TrainState(step=jnp.zeros((), jnp.int32),
                      params=variables['params'],
                      batch_stats=variables['batch_stats'],
                      opt_state=optimizer.init(variables['params']))

  abstract_state = jax.eval_shape(init_state)
  shardings = state_shardings(abstract_state, mesh, tc.fsdp)
  replicated = NamedSharding(mesh, P())
  audio_vars = jax.device_put(load_audio_variables(config, vggish), replicated)

  table = None
  if config.audio.precompute:
    table = embedding_table(config, vggish, audio_vars)

  mngr = ckpt_lib.manager(os.path.join(workdir, 'checkpoints'), keep=tc.keep)
  start = mngr.latest_step()
  if start is not None:
    restored = ckpt_lib.restore(
        mngr, start, ckpt_lib.abstract(abstract_state_dict(abstract_state,
                                                           shardings)),
        train_iter)
    state = TrainState(**restored['state'])
    train_iter = restored['data']
    utils.log(f'resumed from {mngr.directory} at step {start}')
  else:
    variables = apply_pretrained(
        config, init_variables(config, model, dc.image_size))
    state = jax.device_put(TrainState(
        step=jnp.zeros((), jnp.int32), params=variables['params'],
        batch_stats=variables['batch_stats'],
        opt_state=optimizer.init(variables['params'])), shardings)
    start = 0

  step_fn = jax.jit(
      functools.partial(train_step, model=model, vggish=vggish,
                        optimizer=optimizer, config=config),
      in_shardings=(shardings, data_sharding, replicated),
      out_shardings=(shardings, replicated), donate_argnums=(0,))
  evaluator = evaluate.Evaluator(config, model, vggish, mesh)

  preempt = Preemption()
  pending = None  # (step, metrics) of the previous step: checked one step late
  t0, last_log = time.time(), start
  bar = utils.progress(total_steps, start, 'train')
  try:
    for step in range(start, total_steps):
      batch = next(train_iter)
      if table is not None:
        batch = with_audio(batch, table)
      batch = to_device(batch, data_sharding)
      state, step_metrics = step_fn(state, batch, audio_vars)
      if pending is not None:
        _check_finite(*pending)
      pending = (step + 1, step_metrics)
      bar.update(1)
      done = step + 1
      if done % tc.log_every == 0 or done == total_steps:
        _check_finite(*pending)
        m = jax.device_get(step_metrics)
        dt = (time.time() - t0) / max(done - last_log, 1)
        t0, last_log = time.time(), done
        scalars = {k: float(v) for k, v in m.items()}
        scalars.update(lr=float(lr_fn(done) if callable(lr_fn) else lr_fn),
                       step_time=dt, clips_per_sec=tc.batch_size / dt)
        writer.write(done, scalars)
        bar.set_postfix(loss=f'{scalars["loss"]:.4f}')
      is_eval = done % eval_every == 0 or done == total_steps
      metrics = None
      if is_eval or done % ckpt_every == 0:
        _check_finite(*pending)  # never evaluate or save a diverged state
      if is_eval:
        val = evaluator.run(state, dc.setting, config.eval.val_split,
                            desc=f'val@{done}')
        metrics = {ckpt_lib.BEST_METRIC: val['miou'],
                   'val_fscore': val['fscore']}
        writer.write(done, metrics)
        bar.write(f'step {done}: val J {val["miou"]:.4f} F {val["fscore"]:.4f}')
      preempted = preempt.requested or mngr.reached_preemption(done)
      if is_eval or done % ckpt_every == 0 or preempted:
        _check_finite(*pending)
        ckpt_lib.save(mngr, done, state_dict(state), train_iter,
                      metrics=metrics, force=True)
      if preempted:
        mngr.wait_until_finished()
        utils.log(f'preempted: saved step {done} to {mngr.directory}; '
                  're-run the same command to resume')
        return None
  finally:
    bar.close()
    preempt.restore()
    mngr.wait_until_finished()
  if pending is not None:
    _check_finite(*pending)

  best = ckpt_lib.best_step(mngr)
  utils.log(f'evaluating the best checkpoint (step {best}) on '
            f'{config.eval.split}')
  results = evaluate.evaluate_checkpoint(
      config, workdir, os.path.join(mngr.directory, str(best)))
  mngr.close()
  writer.close()
  return results


def state_dict(state):
  return {'step': state.step, 'params': state.params,
          'batch_stats': state.batch_stats, 'opt_state': state.opt_state}


def abstract_state_dict(abstract_state, shardings):
  a = state_dict(abstract_state)
  s = state_dict(shardings)
  return jax.tree_util.tree_map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), a, s)


def _check_finite(step, step_metrics):
  loss = float(jax.device_get(step_metrics['loss']))
  if not np.isfinite(loss):
    raise FloatingPointError(
        f'loss is {loss} at step {step}: stopping. Lower train.lr, enable '
        'train.grad_clip, or check the data; the last good checkpoint is '
        'kept in WORKDIR/checkpoints.')

