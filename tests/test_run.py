"""run.py: every user mistake is one `error:` line, exit 1, no traceback."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import procs
from avs_jax import checkpoint as ckpt_lib
from avs_jax import runtime
from configs import synthetic


def run(tmp_path, *args):
  env = procs.env(str(tmp_path / 'cache'))
  p = subprocess.run(
      [sys.executable, 'run.py', *args],
      cwd=procs.REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  return p.returncode, p.stderr


@pytest.fixture(scope='module')
def small_checkpoint(tmp_path_factory):
  """A checkpoint of the synthetic config's model with 16 channels."""
  c = synthetic.get_config()
  c.model.channels = 16
  c.data.image_size = 32
  model, _ = runtime.build(c)
  variables = model.init(
      jax.random.key(0),
      jnp.zeros((1, 5, 32, 32, 3)),
      jnp.zeros((1, 5, 128)),
  )
  path = str(tmp_path_factory.mktemp('ckpt') / 'small')
  ckpt_lib.save_variables(jax.device_get(variables), path)
  return path


def mistakes(tmp_path, small_checkpoint):
  # A workdir that cannot be made, for root too: its parent is a file.
  (tmp_path / 'a_file').write_text('')
  base = [
      '--config=configs/synthetic.py',
      '--config.data.synthetic.enabled=False',
      f'--workdir={tmp_path / "w"}',
  ]
  return {
      'no such config file': (['--config=configs/nope.py'], 'nope.py'),
      'unknown field': (base + ['--config.train.nope=1'], 'train.nope'),
      'unknown backbone': (
          base + ['--config.model.backbone=resnet51'],
          'model.backbone',
      ),
      'batch size': (
          base + ['--config.train.batch_size=0'],
          'train.batch_size',
      ),
      'workdir not writable': (
          [*base[:2], f'--workdir={tmp_path / "a_file" / "w"}'],
          'not writable',
      ),
      'checkpoint of another size': (
          base
          + [
              '--mode=predict',
              f'--config.predict.video={procs.video(tmp_path / "v.mp4")}',
              f'--config.predict.restore={small_checkpoint}',
          ],
          'does not fit the model',
      ),
  }


@pytest.mark.parametrize(
    'kind',
    [
        'no such config file',
        'unknown field',
        'unknown backbone',
        'batch size',
        'workdir not writable',
        'checkpoint of another size',
    ],
)
def test_mistakes_are_one_line(tmp_path, small_checkpoint, kind):
  args, expect = mistakes(tmp_path, small_checkpoint)[kind]
  rc, err = run(tmp_path, *args)
  lines = [l for l in err.splitlines() if l.startswith('error:')]
  assert rc == 1, err[-3000:]
  assert 'Traceback' not in err, err[-3000:]
  assert len(lines) == 1 and expect in lines[0], err[-3000:]
