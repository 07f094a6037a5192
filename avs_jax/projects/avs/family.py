"""The paper's model as a family (`model.name='avs'`, the default).

The model (`avs_jax.models.avs`: ResNet-50 / PVT-v2 encoder, ASPP, TPAVI,
decoder) and its losses (`avs_jax.losses`: BCE or AVSS's cross-entropy, plus
AVM) are shared modules; this file is their family interface
(`avs_jax.families`).
"""

from avs_jax import families
from avs_jax import losses
from avs_jax import torch_weights
from avs_jax.models import build_model as _build_model

LOSS_KINDS = ('bce', 'avss')


def build_model(model_config, *, dtype, remat=False):
  return _build_model(model_config, dtype=dtype, remat=remat)


def check(config):
  families.check_backbone(config)
  families.check_loss_kind(config, LOSS_KINDS, 'configs/avss.py sets avss')
  kind = config.loss.get('kind', 'bce')
  avss = config.data.setting == 'avss'
  classes = config.model.get('num_classes', 1)
  if avss != (kind == 'avss') or avss != (classes > 1):
    raise families.ConfigError(
        f'data.setting={config.data.setting!r}, loss.kind={kind!r} and '
        f'model.num_classes={classes} do not fit together: AVSS needs '
        'setting avss, loss.kind avss and num_classes > 1 (configs/avss.py); '
        'S4/MS3 need loss.kind bce and one class'
    )


def avm_options(lc):
  """The AVM arguments of `losses.avs_loss` / `avss_loss` from `config.loss`."""
  return dict(
      avm_weight=lc.avm_weight,
      avm_stages=tuple(lc.avm_stages),
      avm_loss=lc.avm_loss,
      avm_closer=lc.avm_closer,
      avm_threshold=lc.avm_threshold,
      avm_norm=lc.avm_norm,
      avm_pooling=lc.avm_pooling,
  )


def loss(out, batch, config):
  """BCE (S4/MS3) or AVSS's cross-entropy, + AVM: `(loss, {'bce' or 'ce',
  'avm'})`."""
  lc = config.loss
  if lc.get('kind', 'bce') == 'avss':
    return losses.avss_loss(
        out, batch['labels'], batch['gt_mask'], **avm_options(lc)
    )
  return losses.avs_loss(
      out, batch['masks'], setting=config.data.setting, **avm_options(lc)
  )


def optimizer(tc, lr, frozen_steps=0):
  del frozen_steps
  return families.adam(tc, lr)


def train_frames(config):
  del config
  return None


def init_backbone(state_dict, config, variables):
  """ImageNet ResNet-50 / PVT-v2 weights into the encoder."""
  encoder = torch_weights.torch_to_flax(state_dict, config.model)
  return torch_weights.merge_variables(variables, encoder)


def to_flax(state_dict, config):
  """A released AVS checkpoint (`Pred_endecoder`'s state dict)."""
  kind = torch_weights.checkpoint_kind(
      torch_weights.strip_module_prefix(state_dict)
  )
  if kind != 'avs':
    raise torch_weights.ConversionError(
        f'an ImageNet backbone checkpoint ({kind}): use it as '
        '--config.train.init_backbone, not as an eval checkpoint'
    )
  return torch_weights.torch_to_flax(state_dict, config.model)


def to_torch(variables, config, vggish_state_dict=None):
  del vggish_state_dict  # the reference's AVS state dicts hold no VGGish
  return torch_weights.flax_to_torch(variables, config.model)
