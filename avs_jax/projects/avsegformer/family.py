"""AVSegFormer as a family (`model.name='avsegformer'`): the model
(`model.py`), its losses (`losses.py`), its checkpoint converter
(`convert.py`) and the reference's AdamW with a frozen backbone at first."""

import jax
import optax

from avs_jax import families
from avs_jax import torch_weights
from avs_jax.projects.avsegformer import convert
from avs_jax.projects.avsegformer import losses
from avs_jax.projects.avsegformer import model

LOSS_KINDS = ('avsegformer',)
build_model = model.build_model


def check(config):
  families.check_backbone(config)
  families.check_loss_kind(
      config,
      LOSS_KINDS,
      'configs/avsegformer_*.py set model.name avsegformer with loss.kind '
      'avsegformer',
  )
  avss = config.data.setting == 'avss'
  classes = config.model.get('num_classes', 1)
  if avss != (classes > 1):
    raise families.ConfigError(
        f'data.setting={config.data.setting!r} and model.num_classes='
        f'{classes} do not fit together: AVSegFormer on AVSS needs '
        'num_classes > 1 (configs/avsegformer_avss.py), on S4/MS3 one class'
    )


def loss(out, batch, config):
  """`(loss, {'iou', 'mix'})`: binary masks (S4/MS3), or AVSS's class labels
  on its labelled frames."""
  lc, setting = config.loss, config.data.setting
  avss = setting == 'avss'
  return losses.avsegformer_loss(
      out,
      batch['labels'] if avss else batch['masks'],
      setting=setting,
      loss_type=lc.get('loss_type', 'dice'),
      iou_weight=lc.iou_weight,
      mix_weight=lc.mix_weight,
      labelled=batch['gt_mask'] if avss else None,
  )


def param_labels(params):
  """The parameter group of every leaf: 'backbone' (the encoder subtree),
  'unused' (`head/fpn`, `head/attn_fc_*`: built, never used) or 'rest'."""

  def label(path, _):
    keys = [str(getattr(k, 'key', k)) for k in path]
    if keys[0] == 'backbone':
      return 'backbone'
    if keys[0] == 'head' and (
        keys[1] == 'fpn' or keys[1].startswith('attn_fc')
    ):
      return 'unused'
    return 'rest'

  return jax.tree_util.tree_map_with_path(label, params)


def optimizer(tc, lr, frozen_steps=0):
  """The reference's `torch.optim.AdamW` with a frozen backbone at first.

  Adam moments and bias correction per group, as PyTorch's per-parameter
  state: the backbone's start when it is unfrozen (optimizer step
  `frozen_steps`); until then it gets no update, no decay and its moments
  do not move. The unused modules never change (PyTorch skips parameters
  without gradients). The learning rate schedule is global.
  """

  def adamw():
    return optax.chain(
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.add_decayed_weights(tc.weight_decay),
    )

  backbone = adamw()
  if frozen_steps > 0:
    backbone = optax.transforms.conditionally_mask(
        backbone, lambda step: step >= frozen_steps
    )
  groups = optax.multi_transform(
      {'backbone': backbone, 'rest': adamw(), 'unused': optax.set_to_zero()},
      param_labels,
  )
  return optax.chain(groups, optax.scale_by_learning_rate(lr))


def train_frames(config):
  del config
  return None


def init_backbone(state_dict, config, variables):
  """ImageNet ResNet-50 / PVT-v2 weights into `backbone`."""
  encoder = torch_weights.backbone_variables(state_dict, config.model.backbone)
  return torch_weights.merge_variables(variables, encoder)


def to_flax(state_dict, config):
  """A released AVSegFormer `.pth` (its `vggish.*` keys set aside)."""
  return convert.torch_to_flax(state_dict, config.model)


def to_torch(variables, config, vggish_state_dict=None):
  """`vggish_state_dict`: a VGGish checkpoint (or a released AVSegFormer
  `.pth`) whose weights become the `vggish.*` keys."""
  vggish_vars = None
  if vggish_state_dict:
    vsd = torch_weights.strip_module_prefix(vggish_state_dict)
    vggish_vars = convert.vggish_variables(
        vsd
    ) or torch_weights.vggish_torch_to_flax(vsd)
  return convert.flax_to_torch(variables, config.model, vggish_vars)
