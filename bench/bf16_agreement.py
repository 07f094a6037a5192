r"""How far bfloat16 (and TF32) steps land from a full-float32 step.

  python bench/bf16_agreement.py --backbone resnet50 --image_size 224 --batch 4
  python bench/bf16_agreement.py --backbone pvt_v2_b5 --image_size 224

One set of float32 weights (the model's own init), one random MS3 batch
(frames `[B, 5, H, W, 3]`, log-mel, masks). Three computations of the train
loss, its gradient and the eval-mode logits:

  * reference: float32 with `jax.default_matmul_precision('highest')` (on
    GPUs no TF32; on CPUs the same as the default);
  * float32: XLA's default precision (TF32 matmuls and convolutions on
    NVIDIA GPUs, bf16 passes on TPUs);
  * bfloat16: `train.dtype='bfloat16'` (float32 parameters, bf16 compute).

For each against the reference it prints the loss's relative difference,
the gradient's relative L2 error and cosine, the logits' relative L2 error,
and how many pixels the two masks (logit > 0) agree on and their IoU.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  from bench.vs_reference import add_step_args  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add_step_args(p)
  p.set_defaults(image_size=224, batch=2)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', default='', help='write the figures here')
  return p.parse_args(argv)


def rel_l2(a, b):
  """||a - b|| / ||b|| over all leaves, in float64."""
  num = sum(np.sum((np.float64(x) - np.float64(y)) ** 2) for x, y in zip(a, b))
  den = sum(np.sum(np.float64(y) ** 2) for y in b)
  return float(np.sqrt(num / den))


def cosine(a, b):
  dot = sum(np.sum(np.float64(x) * np.float64(y)) for x, y in zip(a, b))
  na = np.sqrt(sum(np.sum(np.float64(x) ** 2) for x in a))
  nb = np.sqrt(sum(np.sum(np.float64(y) ** 2) for y in b))
  return float(dot / (na * nb))


def compare(got, ref):
  """Figures of one computation `got` against `ref` (dicts of numpy)."""
  g, r = got['logits'] > 0, ref['logits'] > 0
  union = np.sum(g | r)
  return {
      'loss': float(got['loss']),
      'loss_rel_diff': abs(float(got['loss']) / float(ref['loss']) - 1),
      'grad_rel_l2': rel_l2(got['grads'], ref['grads']),
      'grad_cosine': cosine(got['grads'], ref['grads']),
      'logits_rel_l2': rel_l2([got['logits']], [ref['logits']]),
      'mask_pixels_agree': float(np.mean(g == r)),
      'mask_iou': float(np.sum(g & r) / union) if union else 1.0,
  }


def main(argv=None):
  args = parse_args(argv)
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from avs_jax import runtime
  from avs_jax import train
  from bench.vs_reference import FRAMES, host_inputs, step_config
  # pylint: enable=g-import-not-at-top

  config = step_config(args.config, args.backbone, args.set, args.image_size)
  b, t, s = args.batch, FRAMES, args.image_size
  batch = host_inputs(args.seed, b, s, s)
  model32, vggish32 = runtime.build(config)
  variables = jax.jit(lambda: runtime.init_variables(config, model32))()
  audio_vars = vggish32.init(jax.random.key(12345), jnp.zeros((1, 96, 64)))
  state = runtime.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      opt_state=(),
  )

  def run(dtype, precision):
    config.train.dtype = dtype
    model, vggish = runtime.build(config)

    @jax.jit
    def f(state, batch, audio_vars):
      (loss, _, _), grads = train.loss_and_grads(
          state, batch, audio_vars, model=model, vggish=vggish, config=config
      )
      logits = runtime.forward(
          model,
          vggish,
          {'params': state.params, 'batch_stats': state.batch_stats},
          audio_vars,
          batch['frames'],
          batch['log_mel'],
      )['logits']
      return loss, grads, logits

    with jax.default_matmul_precision(precision):
      loss, grads, logits = jax.device_get(f(state, batch, audio_vars))
    return {
        'loss': loss,
        'grads': [np.asarray(x, np.float32) for x in jax.tree.leaves(grads)],
        'logits': np.asarray(logits, np.float32),
    }

  device = jax.devices()[0].device_kind
  print(
      f'{config.model.backbone}, {b} clip(s) x {t} frames at {s}x{s}, '
      f'MS3 loss; device {device}; jax {jax.__version__}'
  )
  ref = run('float32', 'highest')
  res = {'device': device, 'backbone': config.model.backbone, 'batch': b}
  res['image_size'] = s
  res['reference_loss'] = float(ref['loss'])
  for name, dtype, precision in (
      ('float32 (default precision)', 'float32', 'default'),
      ('bfloat16', 'bfloat16', 'default'),
  ):
    res[name] = c = compare(run(dtype, precision), ref)
    print(
        f'{name:28s} vs float32 highest: loss {c["loss"]:.6f} (ref '
        f'{res["reference_loss"]:.6f}, rel {c["loss_rel_diff"]:.1e}); '
        f'grad rel L2 {c["grad_rel_l2"]:.1e}, cosine {c["grad_cosine"]:.5f}; '
        f'logits rel L2 {c["logits_rel_l2"]:.1e}; masks agree on '
        f'{100 * c["mask_pixels_agree"]:.2f}% of pixels (IoU '
        f'{c["mask_iou"]:.4f})',
        flush=True,
    )
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=2)
  return res


if __name__ == '__main__':
  main()
