"""Which SAMA parameters train (`train_avs.py:183-185`), as an optax mask.

The reference freezes every parameter named `image_encoder.*` but the
audio prompt generator. Of the rest, `mask_decoder.iou_prediction_head`
takes no part in the loss (`multimask_output=False` and no IoU loss), so its
gradient stays `None` and AdamW skips it (no update, no weight decay);
`pe_layer`'s Gaussian matrix is a buffer. Trained: the prompt generator,
the mask decoder but its IoU head, and `no_mask_embed`.
"""

from flax import traverse_util
import jax.numpy as jnp
import optax


def is_trainable(path) -> bool:
  """`path`: a tuple of names under `params`."""
  if path[0] == 'image_encoder':
    return path[1] == 'prompt_generator'
  if path[0] == 'mask_decoder':
    return path[1] != 'iou_prediction_head'
  return path[0] == 'no_mask_embed'


def trainable_mask(params):
  """The tree of `params` with True where the reference trains."""
  flat = traverse_util.flatten_dict(dict(params))
  return traverse_util.unflatten_dict({p: is_trainable(p) for p in flat})


def masked_optimizer(tx: optax.GradientTransformation, params):
  """`tx` on the trainable leaves of `params`; the frozen ones get zero
  updates (no weight decay, no optimizer state)."""
  flat = traverse_util.flatten_dict(dict(params))
  labels = traverse_util.unflatten_dict(
      {p: 'train' if is_trainable(p) else 'freeze' for p in flat}
  )
  return optax.multi_transform(
      {'train': tx, 'freeze': optax.set_to_zero()}, labels
  )


def reference_optimizer(params, steps_per_epoch, epochs=80, lr=2e-4):
  """The reference's AdamW (PyTorch defaults: betas 0.9 / 0.999, eps 1e-8,
  weight decay 0.01) with `CosineAnnealingLR(T_max=epochs, eta_min=1e-7)`
  stepped once per epoch (`configs/sam_avs_adapter.yaml:101-106`,
  `train_avs.py:164, 199`), on the trainable leaves only."""

  def lr_at(step):
    epoch = step // steps_per_epoch
    return 1e-7 + (lr - 1e-7) * (1 + jnp.cos(jnp.pi * epoch / epochs)) / 2

  tx = optax.adamw(lr_at, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
  return masked_optimizer(tx, params)
