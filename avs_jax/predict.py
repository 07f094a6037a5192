"""Inference on a user's video: masks per second and an overlay video with sound.

Sampling follows the reference preprocessing: with `fps` rounded to an
integer `r`, second `s` is represented by frame `int(s*r + 15/16*r)` (near
the end of the second), resized to the model's size with OpenCV's
`INTER_LINEAR` (no antialiasing, as the frames of AVSBench were made); the
audio track is
resampled to 16 kHz mono and cut into 0.96 s log-mel examples. The model
runs over windows of 5 seconds; a last, partial window is filled by
repeating its last second and the filler is dropped. ffmpeg comes from the
`imageio-ffmpeg` package.

AVSS (`data.setting='avss'`): windows of 10 seconds, the last one completed
with padded frames (frame mask 0), as 5-frame clips are in training; each
second gets the argmax class, written as a PNG in the official palette
(`avss.palette`), with `legend.png` / `legend.json` naming the classes
present (names from `data.label2idx`, see `avss.class_names`).
"""

import json
import os
import subprocess
import tempfile
import warnings

import cv2
import imageio_ffmpeg
import jax
import numpy as np
from PIL import Image

from avs_jax import audio as audio_lib
from avs_jax import avss
from avs_jax import data as data_lib
from avs_jax import draw
from avs_jax import runtime
from avs_jax import utils

WINDOW = 5

# ffmpeg is started with fork+exec; JAX's warning about fork() does not apply.
warnings.filterwarnings('ignore', message='os.fork\\(\\) was called')


class VideoError(ValueError):
  """A video that cannot be used: names the file and the reason."""


def _ffmpeg():
  return imageio_ffmpeg.get_ffmpeg_exe()


def _open(path):
  """(frame generator of `[H, W, 3]` uint8, meta dict) of a video file."""
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
        [
            _ffmpeg(),
            '-nostdin',
            '-v',
            'error',
            '-i',
            path,
            '-vn',
            '-ac',
            '1',
            '-ar',
            str(sample_rate),
            '-f',
            'wav',
            wav,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if (
        proc.returncode != 0
        or not os.path.exists(wav)
        or os.path.getsize(wav) <= 44
    ):
      reason = proc.stderr.strip().splitlines()[-1:] or ['no audio stream']
      if (
          'does not contain any stream' in proc.stderr
          or 'matches no streams' in proc.stderr
          or proc.returncode == 0
      ):
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
    raise VideoError(
        f'{path}: too short ({(i + 1) / fps:.2f} s); at least '
        '1 s of video with sound is needed'
    )
  h, w = data_lib.records.image_hw(image_size)
  small = (
      np.stack([resize_frame(f, h, w) for f in picked]).astype(np.float32)
      / 255.0
  )
  norm = (small - np.asarray(data_lib.IMAGENET_MEAN)) / np.asarray(
      data_lib.IMAGENET_STD
  )
  return norm.astype(np.float32), fps, seconds


def resize_frame(frame, h, w):
  """`[H, W, 3]` uint8 -> `[h, w, 3]`: OpenCV bilinear, as the reference."""
  return cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)


def upsample_probs(probs, h, w):
  """`[S, h', w']` probabilities -> `[S, h, w]` (bilinear, float)."""
  return np.stack(
      [
          cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR)
          for p in np.asarray(probs, np.float32)
      ]
  )


def windows(num_seconds, size=WINDOW):
  """Index arrays `[size]` covering 0..num_seconds-1, the last padded by repetition."""
  out = []
  for start in range(0, num_seconds, size):
    idx = np.arange(start, start + size)
    out.append(np.minimum(idx, num_seconds - 1))
  return out


def audio_examples(path, seconds):
  """The video's log-mel examples `[seconds, 96, 64]` (last one repeated)."""
  samples = read_audio(path)
  try:
    return audio_lib.clip_examples(samples, seconds, audio_lib.SAMPLE_RATE)
  except audio_lib.AudioLoadError as e:
    raise VideoError(f'{path}: too short: less than 0.96 s of audio') from e


def predict_video(config, workdir):
  """Writes `OUT/masks/*.png` and `OUT/<name>_overlay.mp4` (with sound)."""
  pc = config.predict
  if not pc.video:
    raise VideoError('set --config.predict.video=PATH')
  if not pc.restore:
    raise VideoError('set --config.predict.restore=CHECKPOINT_DIR')
  name = os.path.splitext(os.path.basename(pc.video))[0]
  out = pc.out or os.path.join(workdir, 'predict', name)
  if pc.mask_size not in ('video', 'model'):
    raise VideoError(
        f'predict.mask_size must be video or model, got ' f'{pc.mask_size!r}'
    )
  frames, fps, seconds = sample_seconds(pc.video, config.data.image_size)
  examples = audio_examples(pc.video, seconds)
  # Every process restores (Orbax reads collectively) and computes the same
  # thing on its own devices; process 0 writes.
  restored = runtime.Inference(config, pc.restore, mesh=runtime.local_mesh())
  if config.data.setting == 'avss':
    classes = class_maps(restored, frames, examples)
    if jax.process_index() == 0:
      _write_avss(config, out, name, classes, fps)
    return out
  probs = np.zeros((seconds,) + frames.shape[1:3], np.float32)
  for idx in windows(seconds):
    logits = restored.logits(frames[idx][None], examples[idx][None])[0]
    probs[idx] = np.asarray(jax.nn.sigmoid(logits))  # filler rewrites itself
  if jax.process_index() != 0:
    return out
  video_hw = _open(pc.video)[1]['size'][::-1]
  full = upsample_probs(probs, *video_hw)
  os.makedirs(os.path.join(out, 'masks'), exist_ok=True)
  for s in range(seconds):
    mask = full[s] if pc.mask_size == 'video' else probs[s]
    Image.fromarray(((mask > 0.5) * 255).astype(np.uint8)).save(
        os.path.join(out, 'masks', f'{name}_{s + 1:04d}.png')
    )
  video = os.path.join(out, f'{name}_overlay.mp4')
  _write_overlay(pc.video, video, full > 0.5, fps)
  utils.log(
      f'{seconds} s of {pc.video} (checkpoint step {restored.step}) -> '
      f'{out}/masks/*.png and {video}'
  )
  return out


def class_maps(restored, frames, examples, size=avss.FRAMES_PER_CLIP):
  """AVSS: `[S, h, w]` int32 class of each pixel of each second.

  `frames [S, h, w, 3]` (normalised), `examples [S, 96, 64]`; windows of
  `size` seconds, the last one's missing seconds padded with zero frames and
  audio under a frame mask of 0.
  """
  seconds = len(frames)
  out = np.zeros(frames.shape[:3], np.int32)
  for start in range(0, seconds, size):
    n = min(size, seconds - start)
    f = np.zeros((size,) + frames.shape[1:], np.float32)
    a = np.zeros((size,) + examples.shape[1:], np.float32)
    f[:n], a[:n] = frames[start : start + n], examples[start : start + n]
    fm = (np.arange(size) < n).astype(np.float32)
    logits = restored.logits(f[None], a[None], fm[None])[0]
    out[start : start + n] = np.asarray(np.argmax(logits, -1))[:n]
  return out


def _write_avss(config, out, name, classes, fps):
  """Coloured masks, the legend and the overlay video of AVSS classes."""
  pc = config.predict
  h, w = _open(pc.video)[1]['size'][::-1]
  full = np.stack(
      [
          cv2.resize(
              c.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST
          )
          for c in classes
      ]
  )
  pal = avss.palette(config.model.num_classes)
  os.makedirs(os.path.join(out, 'masks'), exist_ok=True)
  for s, c in enumerate(full if pc.mask_size == 'video' else classes):
    Image.fromarray(pal[c]).save(
        os.path.join(out, 'masks', f'{name}_{s + 1:04d}.png')
    )
  names = avss.class_names(config.data, config.model.num_classes)
  present = [int(i) for i in np.unique(full) if i != avss.BACKGROUND]
  with open(os.path.join(out, 'legend.json'), 'w') as f:
    json.dump(
        [dict(index=i, name=names[i], color=pal[i].tolist()) for i in present],
        f,
        indent=1,
    )
  draw.legend(
      [names[i] for i in present], pal[present], os.path.join(out, 'legend.png')
  )
  video = os.path.join(out, f'{name}_overlay.mp4')
  paint = lambda frame, c: draw.color_overlay(frame, c, pal)
  _write_overlay(pc.video, video, full, fps, paint)
  utils.log(
      f'{len(classes)} s of {pc.video}: classes '
      f'{", ".join(names[i] for i in present) or "none (background only)"} -> '
      f'{out}/masks/*.png, legend.png and {video}'
  )


def _write_overlay(src, dst, masks, fps, paint=draw.overlay):
  """Every frame of `src` painted with its second's mask (`masks [S, H, W]`,
  bool, or classes with `paint=draw.color_overlay`-like), muxed with `src`'s
  audio; the audio is padded with silence where it is shorter than the
  video."""
  gen, _ = _open(src)
  w, h = masks.shape[2], masks.shape[1]
  r = int(round(fps))
  with tempfile.TemporaryDirectory() as tmp:
    silent = os.path.join(tmp, 'video.mp4')
    writer = imageio_ffmpeg.write_frames(
        silent,
        (w, h),
        fps=fps,
        macro_block_size=1,
        output_params=['-v', 'error'],
    )
    writer.send(None)
    for i, frame in enumerate(gen):
      s = min(i // r, len(masks) - 1)
      writer.send(np.ascontiguousarray(paint(frame, masks[s])))
    writer.close()
    proc = subprocess.run(
        [
            _ffmpeg(),
            '-nostdin',
            '-v',
            'error',
            '-y',
            '-i',
            silent,
            '-i',
            src,
            '-map',
            '0:v',
            '-map',
            '1:a',
            '-c:v',
            'copy',
            '-c:a',
            'aac',
            '-af',
            'apad',
            '-shortest',
            dst,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
      raise VideoError(
          f'{dst}: ffmpeg could not write the overlay video: '
          f'{proc.stderr.strip()[-300:]}'
      )
