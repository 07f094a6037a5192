r"""Command line: PyTorch AVS checkpoints <-> Orbax checkpoints.

  python -m avs_jax.convert --config=configs/ms3.py:pvt_v2_b5 \
      --src=ms3_pvt.pth --out=workdirs/ms3_pvt_converted
  python run.py --mode=eval --config=configs/ms3.py:pvt_v2_b5 \
      --config.eval.restore=workdirs/ms3_pvt_converted
  python -m avs_jax.convert --config=configs/ms3.py --to_torch \
      --src=workdirs/ms3 --out=ms3.pth                    # and back
  python -m avs_jax.convert --config=configs/avsegformer_s4.py:pvt_v2_b5 \
      --src=AVSegFormer_pvt2_s4.pth --out=workdirs/avsf_s4_converted
  python -m avs_jax.convert --config=configs/avsegformer_s4.py:pvt_v2_b5 \
      --to_torch --src=workdirs/avsf_s4_converted --out=avsf_s4.pth \
      --vggish=AVSegFormer_pvt2_s4.pth       # back, loads into the reference
  python -m avs_jax.convert --config=configs/sama_s4.py:vit_h \
      --src=sama_s4_best.pth --out=workdirs/sama_s4_converted   # SAMA-AVS

The config (loaded like `run.py` loads it, `--config.model.x=y` overrides
included) gives the model the checkpoint must fit, and `model.name` its
family's converter (`avs_jax.families`): the paper's AVS model (mapping in
`avs_jax.torch_weights`), AVSegFormer (`avs_jax.projects.avsegformer.convert`)
or SAMA-AVS (`avs_jax.projects.sama.convert`).
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from avs_jax import checkpoint as ckpt_lib
from avs_jax import families
from avs_jax import torch_weights

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags (defined only when run as a program, so that
  importing this module next to another absl program defines nothing)."""
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
  flags.DEFINE_bool(
      'to_torch', False, 'Orbax checkpoint -> PyTorch state dict.'
  )
  flags.DEFINE_string(
      'vggish',
      '',
      'AVSegFormer / SAMA-AVS with --to_torch: a VGGish checkpoint '
      '(vggish-10086976.pth, or a released AVSegFormer or SAMA-AVS .pth) whose '
      "weights become the state dict's VGGish keys, so that the result loads "
      'strictly into the reference.',
  )
  flags.mark_flags_as_required(['config', 'src', 'out'])


def to_orbax(src, out, config):
  """A PyTorch checkpoint file of `config.model`'s family -> Orbax checkpoint
  dir; returns its path."""
  sd = torch_weights.load_state_dict(src)
  try:
    variables = families.get(config).to_flax(sd, config)
  except torch_weights.ConversionError as e:
    raise torch_weights.ConversionError(f'{src}: {e}') from None
  return ckpt_lib.save_variables(variables, out)


def to_torch(src, out, config, vggish=''):
  """An Orbax checkpoint -> .pth (needs torch) or .npz; returns (n, step).

  AVSegFormer, SAMA-AVS: `vggish`, a checkpoint file whose VGGish becomes
  the state dict's VGGish keys.
  """
  state, step = ckpt_lib.load_state(src)
  vsd = torch_weights.load_state_dict(vggish) if vggish else None
  sd = families.get(config).to_torch(state, config, vsd)
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
      n, step = to_torch(FLAGS.src, FLAGS.out, config, FLAGS.vggish)
      print(f'wrote {n} tensors (step {step}) to {FLAGS.out}')
    else:
      out = to_orbax(FLAGS.src, FLAGS.out, config)
      print(
          f'wrote {out} ({families.name(config)}); evaluate it with '
          f'--mode=eval --config.eval.restore={FLAGS.out}'
      )
  except (
      torch_weights.ConversionError,
      families.ConfigError,
      FileNotFoundError,
      ImportError,
  ) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
