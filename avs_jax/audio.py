"""VGGish log-mel front-end: waveform -> examples `[N, 96, 64]`.

A NumPy port of the reference `vggish_input.waveform_to_examples` (torchvggish,
after the TF AudioSet `mel_features.py`): 16 kHz mono, 25 ms periodic-Hann
window (400 samples), 10 ms hop, 512-point |rfft|, 64 HTK-mel bands over
125-7500 Hz with the DC row zeroed, `log(mel + 0.01)`, then non-overlapping
0.96 s examples of 96 frames. Incomplete frames and examples are dropped.

Files are read and resampled with librosa (its default soxr resampler); the
reference resampled with resampy, so non-16 kHz audio differs slightly.
Multi-channel audio is mixed to mono by the channel mean, as the reference does.
"""

import functools
import os

import jax.numpy as jnp
import librosa
import numpy as np

SAMPLE_RATE = 16000
WINDOW = 400  # 25 ms
HOP = 160  # 10 ms
FFT_LENGTH = 512
NUM_BANDS = 64
MEL_MIN_HZ, MEL_MAX_HZ = 125.0, 7500.0
LOG_OFFSET = 0.01
EXAMPLE_FRAMES = 96  # 0.96 s
# Fewest samples that make one example: 96 frames of 400 with a hop of 160.
MIN_SAMPLES = WINDOW + (EXAMPLE_FRAMES - 1) * HOP


class AudioLoadError(ValueError, OSError):
  """An audio file that cannot be read or is too short (names the file)."""


def _frame(x, window, hop):
  """`[n, ...]` -> `[1 + (n - window) // hop, window, ...]` (no padding)."""
  num = max(0, 1 + (x.shape[0] - window) // hop)
  idx = np.arange(num)[:, None] * hop + np.arange(window)[None, :]
  return x[idx]


def periodic_hann(n):
  """`[n]` Hann window of period n (ends one sample before the final zero)."""
  return 0.5 - 0.5 * np.cos(2 * np.pi / n * np.arange(n))


def hertz_to_mel(hz):
  return 1127.0 * np.log(1.0 + np.asarray(hz) / 700.0)


@functools.lru_cache(maxsize=None)
def mel_matrix(
    num_bands=NUM_BANDS,
    num_bins=FFT_LENGTH // 2 + 1,
    sample_rate=SAMPLE_RATE,
    lo=MEL_MIN_HZ,
    hi=MEL_MAX_HZ,
):
  """`[num_bins, num_bands]` triangular HTK-mel weights, DC row zeroed."""
  bins_mel = hertz_to_mel(np.linspace(0.0, sample_rate / 2, num_bins))
  edges = np.linspace(hertz_to_mel(lo), hertz_to_mel(hi), num_bands + 2)
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  up = (bins_mel[:, None] - lower) / (center - lower)
  down = (upper - bins_mel[:, None]) / (upper - center)
  m = np.maximum(0.0, np.minimum(up, down))
  m[0, :] = 0.0
  m.flags.writeable = False
  return m


def _as_float(samples):
  """int arrays are scaled to [-1, 1) (int16 by 1/32768); float64 out."""
  x = np.asarray(samples)
  if np.issubdtype(x.dtype, np.integer):
    return x.astype(np.float64) / float(2 ** (8 * x.dtype.itemsize - 1))
  return x.astype(np.float64)


def log_mel(samples):
  """16 kHz mono `[n]` -> log-mel spectrogram `[frames, 64]` (float64)."""
  frames = _frame(samples, WINDOW, HOP) * periodic_hann(WINDOW)
  spec = np.abs(np.fft.rfft(frames, FFT_LENGTH))
  return np.log(spec @ mel_matrix() + LOG_OFFSET)


def waveform_to_examples(samples, sample_rate):
  """Waveform `[n]` or `[n, channels]` -> float32 log-mel `[N, 96, 64]`.

  Floats are taken in [-1, 1]; int16 is scaled by 1/32768. Audio not at
  16 kHz is resampled with librosa (soxr). Returns `[0, 96, 64]` when the
  audio is shorter than one example (15600 samples at 16 kHz).
  """
  x = _as_float(samples)
  if x.ndim == 2:
    x = x.mean(axis=1)
  elif x.ndim != 1:
    raise ValueError(f'samples must be [n] or [n, channels], got {x.shape}')
  if sample_rate != SAMPLE_RATE:
    x = librosa.resample(x, orig_sr=sample_rate, target_sr=SAMPLE_RATE)
  examples = _frame(log_mel(x), EXAMPLE_FRAMES, EXAMPLE_FRAMES)
  return examples.astype(np.float32)


def load_audio(path, sample_rate=SAMPLE_RATE):
  """Any audio file librosa reads -> float32 mono `[n]` at `sample_rate`.

  Raises AudioLoadError (a ValueError and an OSError) naming the file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise AudioLoadError(f'cannot read audio {path!r}: no such file')
  try:
    y, _ = librosa.load(path, sr=sample_rate, mono=True)
  except Exception as e:  # soundfile, audioread and librosa all differ.
    raise AudioLoadError(
        f'cannot read audio {path!r}: {type(e).__name__}: {e}'
    ) from e
  return np.asarray(y, np.float32)


def clip_examples(path_or_samples, num_seconds=5, sample_rate=SAMPLE_RATE):
  """A clip's log-mel examples, exactly `[num_seconds, 96, 64]` float32.

  `path_or_samples`: an audio file path (read at 16 kHz; `sample_rate` is then
  unused) or a waveform at `sample_rate` as in `waveform_to_examples`. Extra
  examples are dropped; missing ones repeat the last example, as the reference
  preprocessing (`preprocess_s4.py` / `preprocess_ms3.py`) pads short clips.
  Raises AudioLoadError when the audio is shorter than one example (0.96 s).
  """
  if isinstance(path_or_samples, (str, bytes, os.PathLike)):
    name = repr(os.fspath(path_or_samples))
    ex = waveform_to_examples(load_audio(path_or_samples), SAMPLE_RATE)
  else:
    name = 'waveform'
    ex = waveform_to_examples(path_or_samples, sample_rate)
  if ex.shape[0] == 0:
    raise AudioLoadError(
        f'audio {name} is shorter than one VGGish example (0.96 s, '
        f'{MIN_SAMPLES} samples at 16 kHz)'
    )
  ex = ex[:num_seconds]
  if ex.shape[0] < num_seconds:
    pad = np.repeat(ex[-1:], num_seconds - ex.shape[0], axis=0)
    ex = np.concatenate([ex, pad], axis=0)
  return ex


def log_mel_examples_jax(samples):
  """jnp version of `waveform_to_examples` for 16 kHz mono float input.

  `samples [..., n]` -> `[..., N, 96, 64]` float32, N = frames // 96 (static).
  Jittable; computes in float32, within ~1e-4 of the NumPy (float64) version.
  """
  samples = jnp.asarray(samples, jnp.float32)
  n = samples.shape[-1]
  num_frames = 1 + (n - WINDOW) // HOP
  num_examples = max(0, num_frames) // EXAMPLE_FRAMES
  num_frames = num_examples * EXAMPLE_FRAMES
  idx = np.arange(num_frames)[:, None] * HOP + np.arange(WINDOW)[None, :]
  frames = samples[..., idx] * jnp.asarray(periodic_hann(WINDOW), jnp.float32)
  spec = jnp.abs(jnp.fft.rfft(frames, FFT_LENGTH))
  mel = jnp.matmul(
      spec, jnp.asarray(mel_matrix(), jnp.float32), precision='highest'
  )
  out = jnp.log(mel + LOG_OFFSET)
  return out.reshape(
      samples.shape[:-1] + (num_examples, EXAMPLE_FRAMES, NUM_BANDS)
  )
