"""Which SAMA parameters train (`train_avs.py:183-185`), as an optax mask.

The reference freezes every parameter named `image_encoder.*` but the
audio prompt generator. Of the rest, `mask_decoder.iou_prediction_head`
takes no part in the loss (`multimask_output=False` and no IoU loss), so its
gradient stays `None` and AdamW skips it (no update, no weight decay);
`pe_layer`'s Gaussian matrix is a buffer. Trained: the prompt generator,
the mask decoder but its IoU head, and `no_mask_embed`.
"""

from flax import traverse_util
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


def labels(params):
  """'train' or 'freeze' for every leaf of `params`."""
  flat = traverse_util.flatten_dict(dict(params))
  return traverse_util.unflatten_dict(
      {p: 'train' if is_trainable(p) else 'freeze' for p in flat}
  )


def masked_optimizer(tx: optax.GradientTransformation):
  """`tx` on the trainable leaves; the frozen ones get zero updates (no
  weight decay, no optimizer state)."""
  return optax.multi_transform(
      {'train': tx, 'freeze': optax.set_to_zero()}, labels
  )
