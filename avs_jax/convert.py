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

The config (loaded like `run.py` loads it, `--config.model.x=y` overrides
included) gives the model the checkpoint must fit: the paper's AVS model
(mapping in `avs_jax.torch_weights`) or, with `model.name='avsegformer'`,
AVSegFormer (`avs_jax.avsegformer_convert`).
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from avs_jax import avsegformer_convert
from avs_jax import checkpoint as ckpt_lib
from avs_jax import runtime
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
      'AVSegFormer with --to_torch: a VGGish checkpoint (vggish-10086976.pth '
      'or a released AVSegFormer .pth) whose weights become the vggish.* keys, '
      'so that the result loads strictly into the reference.',
  )
  flags.mark_flags_as_required(['config', 'src', 'out'])


def to_orbax(src, out, config):
  """A PyTorch AVS checkpoint file -> Orbax checkpoint dir; returns its path."""
  model_config = config.model
  sd = torch_weights.load_state_dict(src)
  if runtime.model_name(config) == 'avsegformer':
    variables = avsegformer_convert.torch_to_flax(sd, model_config)
    return ckpt_lib.save_variables(variables, out)
  kind = torch_weights.checkpoint_kind(torch_weights.strip_module_prefix(sd))
  if kind != 'avs':
    raise torch_weights.ConversionError(
        f'{src} is an ImageNet backbone checkpoint ({kind}): use it as '
        '--config.train.init_backbone, not as an eval checkpoint'
    )
  variables = torch_weights.torch_to_flax(sd, model_config)
  return ckpt_lib.save_variables(variables, out)


def to_torch(src, out, config, vggish=''):
  """An Orbax checkpoint -> .pth (needs torch) or .npz; returns (n, step).

  AVSegFormer: `vggish`, a checkpoint file whose VGGish becomes `vggish.*`.
  """
  model_config = config.model
  state, step = ckpt_lib.load_state(src)
  if runtime.model_name(config) == 'avsegformer':
    vggish_vars = None
    if vggish:
      vsd = torch_weights.strip_module_prefix(
          torch_weights.load_state_dict(vggish)
      )
      vggish_vars = avsegformer_convert.vggish_variables(
          vsd
      ) or torch_weights.vggish_torch_to_flax(vsd)
    sd = avsegformer_convert.flax_to_torch(state, model_config, vggish_vars)
  else:
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
      n, step = to_torch(FLAGS.src, FLAGS.out, config, FLAGS.vggish)
      print(f'wrote {n} tensors (step {step}) to {FLAGS.out}')
    else:
      out = to_orbax(FLAGS.src, FLAGS.out, config)
      print(
          f'wrote {out} ({config.model.backbone}); evaluate it with '
          f'--mode=eval --config.eval.restore={FLAGS.out}'
      )
  except (torch_weights.ConversionError, FileNotFoundError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
