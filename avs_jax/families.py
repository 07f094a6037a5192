"""Model families: what `run.py`, the train loop and the converters need of
each, behind one small interface.

`config.model.name` picks a family module (`FAMILIES`); each provides:

  LOSS_KINDS        the `loss.kind` values it trains with
  build_model(model_config, *, dtype, remat)
                    a Flax module: `(frames [B, T, H, W, 3], audio [B, T, 128],
                    train)` -> `{'logits': [B, T, H, W] (or [..., K]), ...}`
  check(config)     raises `ConfigError` for settings it cannot run
  loss(out, batch, config)
                    `(loss, {name: scalar})` of a train-mode forward
  optimizer(tc, lr, frozen_steps)
                    its optax update rule (`train.make_optimizer` adds clipping
                    and accumulation)
  train_frames(config)
                    frames per clip the train step feeds the model (None: all)
  init_backbone(state_dict, config, variables)
                    `variables` with `train.init_backbone`'s weights loaded
  to_flax(state_dict, config)
                    a released / reference checkpoint -> our variables
  to_torch(variables, config, vggish_state_dict)
                    our variables -> the reference's state dict

Families live in `avs_jax/projects/<name>/` (model, losses, converter,
`family.py`); encoders, VGGish, metrics, checkpoints and the train loop are
shared.
"""

import importlib

FAMILIES = {
    'avs': 'avs_jax.projects.avs.family',  # the paper's TPAVI model
    'avsegformer': 'avs_jax.projects.avsegformer.family',
    'sama': 'avs_jax.projects.sama.family',  # SAM with audio prompts
}


class ConfigError(ValueError):
  """A config that cannot run here: names the field and what to do."""


def name(config):
  """`config.model.name`; 'avs' when unset."""
  return config.model.get('name', 'avs')


def get(config_or_name):
  """The family module of a config (or of a `model.name`)."""
  n = (
      config_or_name
      if isinstance(config_or_name, str)
      else name(config_or_name)
  )
  if n not in FAMILIES:
    raise ConfigError(f'model.name={n!r}: choose one of {", ".join(FAMILIES)}')
  return importlib.import_module(FAMILIES[n])


def check_loss_kind(config, kinds, hint):
  """`loss.kind` must be one of the family's `kinds`; `hint` says which
  configs set them."""
  kind = config.loss.get('kind', 'bce')
  if kind not in kinds:
    raise ConfigError(
        f'loss.kind={kind!r} does not fit model.name={name(config)!r}: use '
        f'loss.kind {" or ".join(kinds)} ({hint})'
    )


def check_backbone(config, image_multiple=32):
  """`model.backbone` is one of the shared encoders; the frames are whole
  multiples of their stride."""
  from avs_jax.data import records  # pylint: disable=g-import-not-at-top
  from avs_jax.models import pvt  # pylint: disable=g-import-not-at-top
  from avs_jax.models import resnet  # pylint: disable=g-import-not-at-top

  backbones = sorted(resnet.SPECS) + sorted(pvt.SPECS)
  if config.model.backbone not in backbones:
    raise ConfigError(
        f'model.backbone={config.model.backbone!r} is not a '
        f'backbone; choose one of {", ".join(backbones)}'
    )
  h, w = records.image_hw(config.data.image_size)
  if h % image_multiple or w % image_multiple:
    raise ConfigError(
        f'data.image_size={config.data.image_size}: height and width must be '
        f'multiples of {image_multiple} (the encoders stride '
        f'{image_multiple})'
    )


def adam(tc, lr):
  """PyTorch's Adam (or AdamW with `train.weight_decay > 0`) at `lr`."""
  import optax  # pylint: disable=g-import-not-at-top

  if tc.weight_decay > 0:
    return optax.adamw(
        lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=tc.weight_decay
    )
  return optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
