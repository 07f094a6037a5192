"""Inference on a user's video: masks per second and an overlay video with sound.

Sampling follows the reference preprocessing: with `fps` rounded to an
integer `r`, second `s` is represented by frame `int(s*r + 15/16*r)` (near
the end of the second), resized to the model's size; the audio track is
resampled to 16 kHz mono and cut into 0.96 s log-mel examples. The model
runs over windows of 5 seconds; a last, partial window is filled by
repeating its last second and the filler is dropped. ffmpeg comes from the
`imageio-ffmpeg` package.
"""
import os
import subprocess
import tempfile
import warnings

import jax
import numpy as np
from PIL import Image

from avs_jax import audio as audio_lib
from avs_jax import checkpoint as ckpt_lib
from avs_jax import data as data_lib
from avs_jax import evaluate
from avs_jax import utils

WINDOW = 5

# ffmpeg is started with fork+exec; JAX's warning about fork() does not apply.
warnings.filterwarnings('ignore', message='os.fork\\(\\) was called')


class VideoError(ValueError):
  """A video that cannot be used: names the file and the reason."""


def _ffmpeg():
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  return imageio_ffmpeg.get_ffmpeg_exe()


def _open(path):
  """(frame generator of `[H, W, 3]` uint8, meta dict) of a video file."""
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise VideoError(f'{path}: no such file')
  try:
    gen = imageio_ffmpeg.read_frames(path)
    meta = next(gen)
  except (RuntimeError, OSError, StopIteration) as e:
    last = (str(e).strip().splitlines() or ['unknown error'])[-1]
    raise VideoError(f'{path}: not a readable video ({last})') from e
  w, h = meta['size']

  def frames():
    for raw in gen:
      yield np.frombuffer(raw, np.uint8).reshape(h, w, 3)
  return frames(), meta


def read_audio(path, sample_rate=16000):
  """The video's audio track as mono float32 at 16 kHz."""
  with tempfile.TemporaryDirectory() as tmp:
    wav = os.path.join(tmp, 'audio.wav')
    proc = subprocess.run(
        [_ffmpeg(), '-nostdin', '-v', 'error', '-i', path, '-vn', '-ac', '1',
         '-ar', str(sample_rate), '-f', 'wav', wav],
        capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not os.path.exists(wav) or \
        os.path.getsize(wav) <= 44:
      reason = proc.stderr.strip().splitlines()[-1:] or ['no audio stream']
      if 'does not contain any stream' in proc.stderr or \
          'matches no streams' in proc.stderr or proc.returncode == 0:
        reason = ['the video has no audio track']
      raise VideoError(f'{path}: cannot read its audio: {reason[0]}')
    return audio_lib.load_audio(wav, sample_rate)


def sample_seconds(path, image_size):
  """`frames [S, H, W, 3]` (model size, normalised), raw frames, meta."""
  gen, meta = _open(path)
  fps = float(meta.get('fps') or 0)
  if fps <= 0:
    raise VideoError(f'{path}: unknown frame rate')
  r = int(round(fps))
  duration = float(meta.get('duration') or 0)
  seconds = int(duration) if duration > 0 else None
  wanted, picked, last = {}, [], None
  for i, frame in enumerate(gen):
    s = i // r
    wanted.setdefault(s, int(s * r + 15 / 16 * r))
    last = frame
    if i == wanted[s]:
      picked.append(frame)
  if last is None:
    raise VideoError(f'{path}: no video frames')
  n_frames_seconds = (i + 1) // r
  if seconds is None or seconds > n_frames_seconds:
    seconds = n_frames_seconds
  picked = picked[:seconds]
  if seconds < 1:
    raise VideoError(f'{path}: too short ({(i + 1) / fps:.2f} s); at least '
                     '1 s of video with sound is needed')
  h, w = data_lib.records.image_hw(image_size)
  small = np.stack([np.asarray(Image.fromarray(f).resize((w, h),
                                                         Image.BILINEAR))
                    for f in picked]).astype(np.float32) / 255.0
  norm = (small - np.asarray(data_lib.IMAGENET_MEAN)) / np.asarray(
      data_lib.IMAGENET_STD)
  return norm.astype(np.float32), fps, seconds


def windows(num_seconds, size=WINDOW):
  """Index arrays `[size]` covering 0..num_seconds-1, the last padded by repetition."""
  out = []
  for start in range(0, num_seconds, size):
    idx = np.arange(start, start + size)
    out.append(np.minimum(idx, num_seconds - 1))
  return out


def predict_video(config, workdir):
  """Writes `OUT/masks/*.png` and `OUT/<name>_overlay.mp4` (with sound)."""
  from avs_jax import train  # pylint: disable=g-import-not-at-top
  from avs_jax.models import build_model, build_vggish  # pylint: disable=g-import-not-at-top
  pc = config.predict
  if not pc.video:
    raise VideoError('set --config.predict.video=PATH')
  if not pc.restore:
    raise VideoError('set --config.predict.restore=CHECKPOINT_DIR')
  name = os.path.splitext(os.path.basename(pc.video))[0]
  out = pc.out or os.path.join(workdir, 'predict', name)
  frames, fps, seconds = sample_seconds(pc.video, config.data.image_size)
  samples = read_audio(pc.video)
  examples = audio_lib.waveform_to_examples(samples, 16000)
  if len(examples) == 0:
    raise VideoError(f'{pc.video}: too short: less than 0.96 s of audio')
  if len(examples) < seconds:  # repeat the last second, as the reference
    examples = np.concatenate(
        [examples, np.repeat(examples[-1:], seconds - len(examples), 0)])
  examples = examples[:seconds]

  dtype = train.dtype_of(config)
  model = build_model(config.model, dtype=dtype)
  vggish = build_vggish(postprocess=config.audio.postprocess, dtype=dtype)
  restored, step = ckpt_lib.load_state(pc.restore)
  variables = {'params': restored['params'],
               'batch_stats': restored['batch_stats']}
  audio_vars = train.load_audio_variables(config, vggish)

  @jax.jit
  def run(f, lm):
    a = vggish.apply(audio_vars, lm)
    return model.apply(variables, f, a)['logits']

  probs = np.zeros((seconds,) + frames.shape[1:3], np.float32)
  for idx in windows(seconds):
    logits = run(frames[idx][None], examples[idx][None])[0]
    probs[idx] = np.asarray(jax.nn.sigmoid(logits))  # filler rewrites itself
  os.makedirs(os.path.join(out, 'masks'), exist_ok=True)
  for s in range(seconds):
    Image.fromarray(((probs[s] > 0.5) * 255).astype(np.uint8)).save(
        os.path.join(out, 'masks', f'{name}_{s + 1:04d}.png'))
  video = os.path.join(out, f'{name}_overlay.mp4')
  _write_overlay(pc.video, video, probs, fps)
  utils.log(f'{seconds} s of {pc.video} (checkpoint step {step}) -> '
            f'{out}/masks/*.png and {video}')
  return out


def _write_overlay(src, dst, probs, fps):
  """Every frame of `src` with its second's mask, muxed with `src`'s audio."""
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  gen, meta = _open(src)
  w, h = meta['size']
  r = int(round(fps))
  masks = [np.asarray(Image.fromarray((p * 255).astype(np.uint8)).resize(
      (w, h), Image.BILINEAR)) > 127 for p in probs]
  with tempfile.TemporaryDirectory() as tmp:
    silent = os.path.join(tmp, 'video.mp4')
    writer = imageio_ffmpeg.write_frames(silent, (w, h), fps=fps,
                                         macro_block_size=1,
                                         output_params=['-v', 'error'])
    writer.send(None)
    for i, frame in enumerate(gen):
      s = min(i // r, len(masks) - 1)
      writer.send(np.ascontiguousarray(evaluate.overlay(frame, masks[s])))
    writer.close()
    proc = subprocess.run(
        [_ffmpeg(), '-nostdin', '-v', 'error', '-y', '-i', silent, '-i', src,
         '-map', '0:v', '-map', '1:a', '-c:v', 'copy', '-c:a', 'aac',
         '-shortest', dst], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise VideoError(f'{dst}: ffmpeg could not write the overlay video: '
                       f'{proc.stderr.strip()[-300:]}')
