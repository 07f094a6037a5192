r"""Command line: PyTorch AVS checkpoints <-> Orbax checkpoints.

  python -m avs_jax.convert --config=configs/ms3.py:pvt_v2_b5 \
      --src=ms3_pvt.pth --out=workdirs/ms3_pvt_converted
  python run.py --mode=eval --config=configs/ms3.py:pvt_v2_b5 \
      --config.eval.restore=workdirs/ms3_pvt_converted
  python -m avs_jax.convert --config=configs/ms3.py --to_torch \
      --src=workdirs/ms3 --out=ms3.pth                    # and back

The config (loaded like `run.py` loads it, `--config.model.x=y` overrides
included) gives the model the checkpoint must fit. The mapping itself is
`avs_jax.torch_weights`.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from avs_jax import checkpoint as ckpt_lib
from avs_jax import torch_weights

config_flags.DEFINE_config_file(
    'config',
    None,
    'Config file whose `model` matches the checkpoint.',
    lock_config=True,
)
flags.DEFINE_string(
    'src',
    None,
    'Checkpoint to convert: .pth/.npz/'
    '.safetensors, or with --to_torch an Orbax checkpoint.',
)
flags.DEFINE_string(
    'out',
    None,
    'Output: an Orbax checkpoint directory, or '
    'with --to_torch a .pth/.npz file.',
)
flags.DEFINE_bool('to_torch', False, 'Orbax checkpoint -> PyTorch state dict.')
flags.mark_flags_as_required(['config', 'src', 'out'])
FLAGS = flags.FLAGS


def to_orbax(src, out, model_config):
  """A PyTorch AVS checkpoint file -> Orbax checkpoint dir; returns its path."""
  sd = torch_weights.load_state_dict(src)
  kind = torch_weights.checkpoint_kind(torch_weights.strip_module_prefix(sd))
  if kind != 'avs':
    raise torch_weights.ConversionError(
        f'{src} is an ImageNet backbone checkpoint ({kind}): use it as '
        '--config.train.init_backbone, not as an eval checkpoint'
    )
  variables = torch_weights.torch_to_flax(sd, model_config)
  return ckpt_lib.save_variables(variables, out)


def to_torch(src, out, model_config):
  """An Orbax checkpoint -> .pth (needs torch) or .npz; returns (n, step)."""
  state, step = ckpt_lib.load_state(src)
  sd = torch_weights.flax_to_torch(state, model_config)
  if out.endswith('.npz'):
    np.savez(out, **sd)
  else:
    import torch  # pylint: disable=g-import-not-at-top  # optional dependency

    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, out)
  return len(sd), step


def main(argv):
  del argv
  config = FLAGS.config
  try:
    if FLAGS.to_torch:
      n, step = to_torch(FLAGS.src, FLAGS.out, config.model)
      print(f'wrote {n} tensors (step {step}) to {FLAGS.out}')
    else:
      out = to_orbax(FLAGS.src, FLAGS.out, config.model)
      print(
          f'wrote {out} ({config.model.backbone}); evaluate it with '
          f'--mode=eval --config.eval.restore={FLAGS.out}'
      )
  except (torch_weights.ConversionError, FileNotFoundError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
