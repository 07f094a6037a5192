"""A model in memory: mesh, dtype, the networks, their variables and state.

Training, evaluation, prediction, the demo report and `bench/` all build the
model, load VGGish, create or restore state and put host data on the devices
through this module, so that they agree on all of it.

Every global array is made from host values with `place` (each process holds
the whole host value and hands each of its devices its part), never with a
`device_put` of host values onto a global sharding, which multi-process JAX
does not allow.
"""

import atexit
import functools
import os
import sys
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from avs_jax import checkpoint as ckpt_lib
from avs_jax import data as data_lib
from avs_jax import families
from avs_jax import torch_weights
from avs_jax import utils
from avs_jax.data import records
from avs_jax.models import build_vggish

# Batch entries that go to the devices (the rest, e.g. clip ids, stay home).
DEVICE_KEYS = ('frames', 'log_mel', 'audio', 'masks', 'valid')
DEVICE_KEYS += ('labels', 'gt_mask', 'frame_mask')  # AVSS batches
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self):
    return {'params': self.params, 'batch_stats': self.batch_stats}

  def as_dict(self):
    """What a checkpoint's `state` item holds."""
    return {
        'step': self.step,
        'params': self.params,
        'batch_stats': self.batch_stats,
        'opt_state': self.opt_state,
    }


ConfigError = families.ConfigError
model_name = families.name


def check_config(config, devices=None):
  """Raises ConfigError for settings that would fail later, deep inside:
  the family's own checks (`families`), the dtype, the batch sizes.

  `devices`: the device count the batches are split over (default: JAX's).
  """
  families.get(config).check(config)
  if config.train.dtype not in DTYPES:
    raise ConfigError(
        f'train.dtype={config.train.dtype!r}: use one of '
        f'{", ".join(DTYPES)}'
    )
  n = devices or jax.device_count()
  for field in ('train.batch_size', 'eval.batch_size'):
    section, key = field.split('.')
    bs = config[section][key]
    if bs < 1 or bs % n:
      raise ConfigError(
          f'{field}={bs} must be a positive multiple of the '
          f'{n} devices (global batch); e.g. --config.{field}='
          f'{max(n, bs - bs % n)}'
      )


def initialize_distributed(
    coordinator_address=None,
    num_processes=None,
    process_id=None,
    heartbeat_timeout=100,
):
  """`jax.distributed.initialize`, explicit or auto-detected (TPU, SLURM).

  With several processes the CPU backend's collectives use gloo (they are
  off by default); other backends are not affected. A process that stops
  sending heartbeats for `heartbeat_timeout` seconds is declared dead and
  the others stop with an error instead of waiting for it.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(x is not None for x in explicit) and None in explicit:
    missing = [
        n
        for n, x in zip(
            ('coordinator_address', 'num_processes', 'process_id'), explicit
        )
        if x is None
    ]
    raise ValueError(
        '--coordinator_address, --num_processes and '
        '--process_id go together; missing: '
        + ', '.join(f'--{m}' for m in missing)
    )
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(
        f'--process_id={process_id} must be in [0, ' f'{num_processes})'
    )
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  # The coordination service's own heartbeats end a survivor with a fatal
  # log and abort() (no Python error, a core dump), and the callback it
  # takes instead cannot be a Python function; so they are left to a day
  # and `Heartbeats` (Python, one line, exit 3) watches the peers.
  jax.distributed.initialize(
      coordinator_address,
      num_processes,
      process_id,
      heartbeat_timeout_seconds=max(86400, 2 * heartbeat_timeout),
  )
  utils.use_service_barriers()
  Heartbeats(heartbeat_timeout).start()


def peer_failure_message(detail):
  """The one line a process prints when another process of the run died."""
  first = (str(detail).strip().splitlines() or [''])[0][:300]
  return (
      f'error: process {jax.process_index()}: another process stopped '
      f'({first}); relaunch all {jax.process_count()} processes with the '
      'same command to resume from the last checkpoint'
  )


class Heartbeats(threading.Thread):
  """Ends this process (one line, exit 3) when a peer stops beating.

  Every `timeout / 10` s each process increments its counter in the
  coordination service's key-value store and reads the others'; a counter
  unchanged for `timeout` s (by this host's clock), or a store that no
  longer answers (process 0, which holds it, died), is a dead peer. A
  process that ends normally calls `stop(finished=True)` and is then no
  longer watched.
  """

  PREFIX = 'avs_jax/heartbeat/'
  current = None  # the running one (several processes), if any

  def __init__(self, timeout):
    super().__init__(daemon=True, name='heartbeats')
    self.timeout, self.me = timeout, jax.process_index()
    self.client = jax._src.distributed.global_state.client  # pylint: disable=protected-access
    self.stopping = threading.Event()
    Heartbeats.current = self
    # Before JAX's own exit handler shuts the client down (atexit: last
    # registered, first run): a process that exits on an error stops
    # beating, so its peers end too instead of waiting at a barrier.
    atexit.register(self.stop, finished=False)

  def run(self):
    seen = {}  # process -> (counter, when it last changed)
    while not self.stopping.wait(self.timeout / 10):
      try:
        self.client.key_value_increment(f'{self.PREFIX}{self.me}', 1)
        beats = dict(self.client.key_value_dir_get(self.PREFIX))
      except Exception as e:  # pylint: disable=broad-except
        if self.stopping.is_set():
          return
        self.die(f'the coordination service does not answer: {e}')
      now = time.monotonic()
      for key, value in beats.items():
        p = key.rsplit('/', 1)[-1]
        if p == str(self.me):
          continue
        if value == 'finished':
          seen.pop(p, None)
          continue
        if seen.get(p, (None,))[0] != value:
          seen[p] = (value, now)
        elif now - seen[p][1] > self.timeout:
          self.die(f'process {p} sent no heartbeat for {self.timeout} s')

  def die(self, why):
    try:
      print(peer_failure_message(why), file=sys.stderr, flush=True)
    finally:
      os._exit(3)  # pylint: disable=protected-access

  def stop(self, finished):
    """Stops beating; `finished`: peers no longer expect beats from here."""
    self.stopping.set()
    if finished:
      self.client.key_value_set(
          f'{self.PREFIX}{self.me}', 'finished', allow_overwrite=True
      )


def make_mesh(devices=None):
  """1-D mesh of every device (or of `devices`, e.g. a TPU topology's for an
  ahead-of-time compile); Auto axes: XLA propagates shardings (pjit)."""
  n = len(devices) if devices is not None else jax.device_count()
  return jax.make_mesh(
      (n,),
      ('data',),
      axis_types=(jax.sharding.AxisType.Auto,),
      devices=devices,
  )


def local_mesh():
  """1-D mesh of this process's devices: host-local work, no collectives."""
  return jax.sharding.Mesh(np.asarray(jax.local_devices()), ('data',))


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  return NamedSharding(mesh, P('data'))


def compute_dtype(config):
  if config.train.dtype not in DTYPES:
    raise ValueError(
        f'train.dtype must be one of {sorted(DTYPES)}, got '
        f'{config.train.dtype!r}'
    )
  return DTYPES[config.train.dtype]


def build(config, remat=False):
  """`(model, vggish)` computing in `train.dtype` (parameters float32);
  the model of `config.model.name`'s family (`families`)."""
  dtype = compute_dtype(config)
  model = families.get(config).build_model(
      config.model, dtype=dtype, remat=remat
  )
  vggish = build_vggish(postprocess=config.audio.postprocess, dtype=dtype)
  return model, vggish


def place(tree, shardings):
  """Host values (whole on every process) -> global arrays with `shardings`.

  `shardings`: one sharding for every leaf, or a tree of them.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree_util.tree_map(lambda _: shardings, tree)

  def one(x, sharding):
    x = host_value(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  return jax.tree_util.tree_map(one, tree, shardings)


def host_value(x):
  """numpy value of `x`; a replicated global array gives its local copy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.sharding.is_fully_replicated:
      raise ValueError('a sharded multi-process array has no host value here')
    x = x.addressable_data(0)
  return np.asarray(x)


def to_device(batch, sharding):
  """A process's host batch -> global arrays split over `data` (its part)."""
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in batch.items()
      if k in DEVICE_KEYS
  }


def init_variables(config, model):
  """The model's fresh `{'params', 'batch_stats'}` (host-independent;
  `batch_stats` empty for models without BatchNorm)."""
  h, w = records.image_hw(config.data.image_size)
  variables = model.init(
      jax.random.key(config.seed),
      jnp.zeros((1, 1, h, w, 3)),
      jnp.zeros((1, 1, 128)),
  )
  return {'batch_stats': {}, **variables}


def pretrained(config, variables):
  """`variables` with `train.init_backbone` / `train.init_from` loaded."""
  tc = config.train
  if tc.init_backbone:
    sd = torch_weights.load_state_dict(tc.init_backbone)
    variables = families.get(config).init_backbone(sd, config, variables)
    utils.log(f'initialised the encoder from {tc.init_backbone}')
  if tc.init_from:
    restored, step = ckpt_lib.load_state(tc.init_from)
    variables = torch_weights.merge_variables(
        variables,
        {
            'params': restored['params'],
            'batch_stats': restored.get('batch_stats', {}),
        },
    )
    utils.log(f'initialised the model from {tc.init_from} (step {step})')
  return variables


def audio_variables(config, vggish, mesh):
  """Frozen VGGish: `audio.vggish_checkpoint`, else random (demo); replicated."""
  ac = config.audio
  if ac.vggish_checkpoint:
    sd = torch_weights.load_state_dict(ac.vggish_checkpoint)
    pca = (
        torch_weights.load_state_dict(ac.pca_checkpoint)
        if ac.pca_checkpoint
        else None
    )
    host = torch_weights.vggish_torch_to_flax(sd, pca)
  else:
    utils.log(
        'audio.vggish_checkpoint is empty: VGGish has RANDOM frozen '
        'weights (fine for the synthetic demo, not for AVSBench).'
    )
    host = vggish.init(jax.random.key(12345), jnp.zeros((1, 96, 64)))
  return place(jax.device_get(host), replicated(mesh))


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


def new_state(variables, optimizer):
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=variables['params'],
      batch_stats=variables.get('batch_stats', {}),  # none in ViTs
      opt_state=optimizer.init(variables['params']),
  )


def abstract_train_state(config, model, optimizer, mesh):
  """`(abstract state, its shardings)`: the shapes, nothing computed."""
  abstract = jax.eval_shape(
      lambda: new_state(init_variables(config, model), optimizer)
  )
  return abstract, state_shardings(abstract, mesh, config.train.fsdp)


def initial_state(config, model, optimizer, shardings):
  """The fresh (or pretrained) train state, placed with `shardings`."""
  variables = pretrained(config, init_variables(config, model))
  return place(jax.device_get(new_state(variables, optimizer)), shardings)


def restore_target(abstract, shardings):
  """`ShapeDtypeStruct`s of a checkpoint's `state` item, with shardings."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract.as_dict(),
      shardings.as_dict(),
  )


class Inference:
  """A restored model for evaluation and prediction.

  Attributes: `model`, `vggish`, `variables` and `audio_vars` (replicated
  over `mesh`), `step` (of the checkpoint).
  """

  def __init__(self, config, path, mesh=None):
    self.mesh = mesh or make_mesh()
    self.model, self.vggish = build(config)
    restored, self.step = ckpt_lib.load_state(path)
    variables = {
        'params': restored['params'],
        'batch_stats': restored.get('batch_stats', {}),
    }
    ckpt_lib.check_shapes(
        variables,
        jax.eval_shape(lambda: init_variables(config, self.model)),
        path,
    )
    self.variables = place(variables, replicated(self.mesh))
    self.audio_vars = audio_variables(config, self.vggish, self.mesh)

  def logits(self, frames, log_mel, frame_mask=None):
    """`frames [B, T, H, W, 3]`, `log_mel [B, T, 96, 64]` -> `[B, T, H, W]`
    (`[B, T, H, W, K]` for K > 1 classes; AVSS: `frame_mask [B, T]`)."""
    return _logits(
        self.model,
        self.vggish,
        self.variables,
        self.audio_vars,
        frames,
        log_mel,
        frame_mask,
    )


def audio_embeddings(vggish, audio_vars, log_mel):
  """`[B, T, 96, 64]` -> `[B, T, 128]`, frozen."""
  return jax.lax.stop_gradient(vggish.apply(audio_vars, log_mel))


def local_embedder(vggish, audio_vars):
  """Host log-mel `[B, T, 96, 64]` -> numpy `[B, T, 128]` on this process's
  first device (no collectives)."""
  apply = jax.jit(functools.partial(audio_embeddings, vggish))
  local_vars = jax.tree_util.tree_map(
      lambda x: x.addressable_data(0), audio_vars
  )
  return lambda log_mel: np.asarray(apply(local_vars, log_mel))


def embedding_table(config, vggish, audio_vars, split='train', setting=None):
  """`{clip id: [T, 128]}`: the frozen VGGish run once over a split.

  Every process computes the whole split on its local devices (no
  collectives); VGGish has no batch-dependent ops, so the embeddings are
  those the train or eval step would compute from the clip's log-mel.
  """
  dc, bs = config.data, config.eval.batch_size
  setting = setting or dc.setting
  embed = local_embedder(vggish, audio_vars)
  ds = data_lib.eval_dataset(
      dc.dir,
      setting,
      split,
      batch_size=bs,
      image_size=dc.image_size,
      num_workers=dc.num_workers,
      process_index=0,
      process_count=1,
  )
  total = -(-data_lib.num_examples(dc.dir, setting, split) // bs)
  table = {}
  for batch in utils.progress(total, 0, f'VGGish on {split}', iterable=ds):
    for i, e, ok in zip(batch['id'], embed(batch['log_mel']), batch['valid']):
      if ok:
        table[str(i)] = e
  return table


def with_audio(batch, table):
  """The batch with `audio` `[B, T, 128]` from `table` in place of `log_mel`
  (zeros for padding rows, `valid` False)."""
  batch = dict(batch)
  log_mel = batch.pop('log_mel')
  valid = batch.get('valid', np.ones(len(log_mel), bool))
  zeros = np.zeros(log_mel.shape[1:2] + (128,), np.float32)
  batch['audio'] = np.stack(
      [table[str(i)] if ok else zeros for i, ok in zip(batch['id'], valid)]
  )
  return batch


def forward(
    model, vggish, variables, audio_vars, frames, log_mel, frame_mask=None
):
  """Eval-mode model outputs with VGGish on `log_mel [B, T, 96, 64]`, or
  precomputed embeddings `[B, T, 128]` in its place (AVSS: real frames
  `frame_mask [B, T]`)."""
  audio = log_mel if log_mel.ndim == 3 else vggish.apply(audio_vars, log_mel)
  if frame_mask is None:
    return model.apply(variables, frames, audio, train=False)
  return model.apply(
      variables, frames, audio, train=False, frame_mask=frame_mask
  )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _logits(
    model, vggish, variables, audio_vars, frames, log_mel, frame_mask=None
):
  return forward(
      model, vggish, variables, audio_vars, frames, log_mel, frame_mask
  )['logits']
