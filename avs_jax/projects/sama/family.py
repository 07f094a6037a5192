"""SAMA-AVS as a family (`model.name='sama'`): the model (`model.py`), the
reference's losses (`losses.py`), SAM's and SAMA-AVS's checkpoints
(`convert.py`) and its frozen/trainable split (`train_mask.py`)."""

import optax

from avs_jax import families
from avs_jax import torch_weights
from avs_jax.data import records
from avs_jax.projects.sama import convert
from avs_jax.projects.sama import losses
from avs_jax.projects.sama import model
from avs_jax.projects.sama import train_mask

LOSS_KINDS = ('sama',)
build_model = model.build_model


def check(config):
  mc = config.model
  families.check_loss_kind(
      config, LOSS_KINDS, 'configs/sama_*.py set model.name and loss.kind sama'
  )
  if config.loss.get('loss', 'iou') not in losses.LOSSES:
    raise families.ConfigError(
        f'loss.loss={config.loss.loss!r}: choose one of '
        f'{", ".join(losses.LOSSES)}'
    )
  if config.data.setting not in ('s4', 'ms3'):
    raise families.ConfigError(
        f'data.setting={config.data.setting!r}: SAMA-AVS segments binary '
        'masks (s4 or ms3)'
    )
  if mc.encoder not in tuple(model.ENCODERS) + ('custom',):
    raise families.ConfigError(
        f'model.encoder={mc.encoder!r}: choose one of '
        f'{", ".join(tuple(model.ENCODERS) + ("custom",))} (the config '
        'argument, e.g. configs/sama_s4.py:vit_h)'
    )
  h, w = records.image_hw(config.data.image_size)
  size = mc.get('image_size', 1024)
  if (h, w) != (size, size):
    raise families.ConfigError(
        f'data.image_size={config.data.image_size} must be model.image_size='
        f"{size} square (the ViT's positional embedding is {size} px)"
    )
  if size % mc.get('patch_size', 16):
    raise families.ConfigError(
        f'model.image_size={size} must be a multiple of model.patch_size='
        f'{mc.get("patch_size", 16)}'
    )


def loss(out, batch, config):
  """The reference's `loss.loss` on the frames the model saw (S4: each
  clip's first): `(loss, its terms)`, `{'bce', 'iou'}` for `iou` (BCE + soft
  IoU, the recipe), `{'bce'}` or `{'bbce'}` alone."""
  logits = out['logits']
  masks = batch['masks'][:, : logits.shape[1]].astype(logits.dtype)
  kind = config.loss.get('loss', 'iou')
  if kind == 'iou':
    terms = {'bce': losses.bce(logits, masks), 'iou': losses.iou(logits, masks)}
  else:
    terms = {kind: losses.sama_loss(logits, masks, kind)}
  return sum(terms.values()), terms


def optimizer(tc, lr, frozen_steps=0):
  """AdamW (PyTorch's defaults, `train.weight_decay`) on the parameters the
  reference trains (`train.freeze`, default True: SAM's ViT frozen but the
  audio prompt generator); all of them with `train.freeze=False`."""
  del frozen_steps
  tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=tc.weight_decay)
  if not tc.get('freeze', True):
    return tx
  return train_mask.masked_optimizer(tx)


def train_frames(config):
  """S4 trains on each clip's first frame (the reference's loader), MS3 on
  every frame."""
  return 1 if config.data.setting == 's4' else None


def init_backbone(state_dict, config, variables):
  """SAM's released checkpoint (`sam_vit_{b,l,h}_*.pth`) into the image
  encoder (but the prompt generator) and the mask decoder."""
  params = convert.sam_to_flax(state_dict, config.model, variables['params'])
  return {**variables, **params}


def to_flax(state_dict, config):
  """A trained SAMA-AVS state dict (its VGGish keys set aside)."""
  return convert.sama_to_flax(state_dict, config.model)


def to_torch(variables, config, vggish_state_dict=None):
  """`vggish_state_dict`: a VGGish checkpoint (or a SAMA-AVS state dict)
  whose weights become `audio_encoder.audio_backbone.*`."""
  del config
  vggish_vars = None
  if vggish_state_dict:
    vggish_vars = convert.vggish_variables(
        vggish_state_dict
    ) or torch_weights.vggish_torch_to_flax(
        torch_weights.strip_module_prefix(vggish_state_dict)
    )
  return convert.flax_to_torch(variables, vggish=vggish_vars)
