"""Subprocesses for the end-to-end tests: environment, logs, run.py."""

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 1500  # a cold compilation cache on two busy cores


def env(cache, devices=None, **extra):
  """The environment of a CPU subprocess sharing the compilation `cache`."""
  e = dict(os.environ)
  flags = [
      f
      for f in e.get('XLA_FLAGS', '').split()
      if not f.startswith('--xla_force_host_platform_device_count')
  ]
  if devices:
    flags.append(f'--xla_force_host_platform_device_count={devices}')
  e.update(
      XLA_FLAGS=' '.join(flags),
      JAX_PLATFORMS='cpu',
      CUDA_VISIBLE_DEVICES='',
      TF_CPP_MIN_LOG_LEVEL='2',
      JAX_COMPILATION_CACHE_DIR=cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1',
      PYTHONPATH=os.pathsep.join(
          [REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]
      ),
  )
  e.update(extra)
  return e


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


class Proc:
  """A subprocess writing to a log file."""

  def __init__(self, args, log, env_):
    self.log = log
    self._f = open(log, 'w')
    self.popen = subprocess.Popen(
        args, cwd=REPO, env=env_, stdout=self._f, stderr=subprocess.STDOUT
    )

  def wait(self, timeout=TIMEOUT):
    try:
      rc = self.popen.wait(timeout)
    except subprocess.TimeoutExpired:
      self.popen.kill()
      self.popen.wait()
      raise
    finally:
      self._f.close()
    return rc

  def kill(self):
    if self.popen.poll() is None:
      self.popen.kill()
      self.popen.wait()

  def output(self):
    with open(self.log) as f:
      return f.read()

  def tail(self, n=3000):
    return self.output()[-n:]


def flags(overrides):
  return [f'--config.{k}={v}' for k, v in overrides.items()]


def run_py(workdir, overrides, log, env_, *extra):
  """`python run.py --config=configs/synthetic.py` with the overrides."""
  return Proc(
      [
          sys.executable,
          'run.py',
          '--config=configs/synthetic.py',
          f'--workdir={workdir}',
          *flags(overrides),
          *extra,
      ],
      log,
      env_,
  )


def run_config(config, cache, *args):
  """`python run.py --config=CONFIG ARGS` to completion; the CompletedProcess
  (text stdout/stderr), with the compilation `cache`."""
  return subprocess.run(
      [sys.executable, 'run.py', f'--config={config}', *args],
      cwd=REPO,
      env=env(cache),
      capture_output=True,
      text=True,
      timeout=TIMEOUT,
      check=False,
  )


def video(path, seconds=2, audio=True, size='64x48', rate=10, audio_s=None):
  """A test video at `path` (ffmpeg's test pattern; a 440 Hz tone, cut at
  `audio_s` s if given); returns the path as a string."""
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top

  cmd = [
      imageio_ffmpeg.get_ffmpeg_exe(),
      '-v',
      'error',
      '-y',
      '-f',
      'lavfi',
      '-i',
      f'testsrc=size={size}:rate={rate}',
  ]
  if audio:
    cmd += [
        '-f',
        'lavfi',
        '-i',
        'sine=frequency=440:sample_rate=16000'
        + (f':duration={audio_s}' if audio_s else ''),
    ]
  cmd += ['-t', str(seconds), '-pix_fmt', 'yuv420p', '-c:v', 'libx264']
  if audio:
    cmd += ['-c:a', 'aac']
  subprocess.run(cmd + [str(path)], check=True)
  return str(path)
