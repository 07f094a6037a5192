"""VGGish log-mel front-end: reference fixture and basic properties."""

import os

import jax
import numpy as np
import pytest
import soundfile as sf

from avs_jax import audio

GOLDEN = os.path.join(
    os.path.dirname(__file__), 'data', 'golden', 'vggish_16k.npz'
)


def rel_l2(a, b):
  d = np.asarray(a, np.float64) - b
  return float(np.linalg.norm(d) / np.linalg.norm(b))


def tone(freq, seconds, sr, amp=0.5):
  t = np.arange(int(round(seconds * sr))) / sr
  return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds, seed=0, sr=16000):
  rng = np.random.default_rng(seed)
  return (0.3 * rng.standard_normal(int(seconds * sr))).astype(np.float32)


@pytest.fixture(scope='module')
def golden():
  return dict(np.load(GOLDEN))


def test_golden_log_mel(golden):
  assert int(golden['sample_rate']) == 16000
  ex = audio.waveform_to_examples(golden['pcm_int16'], 16000)
  ref = golden['log_mel_examples'][:, 0]
  assert ex.shape == ref.shape == (5, 96, 64) and ex.dtype == np.float32
  assert rel_l2(ex, ref) < 1e-4


def test_golden_log_mel_jax(golden):
  x = golden['pcm_int16'] / 32768.0
  ref = golden['log_mel_examples'][:, 0]
  out = jax.jit(audio.log_mel_examples_jax)(np.stack([x, x[::-1]]))
  assert out.shape == (2, 5, 96, 64) and out.dtype == np.float32
  assert np.abs(np.asarray(out[0]) - ref).max() < 1e-4
  np_rev = audio.waveform_to_examples(x[::-1], 16000)
  assert np.abs(np.asarray(out[1]) - np_rev).max() < 1e-4


def test_int16_is_scaled_like_float(golden):
  pcm = golden['pcm_int16']
  np.testing.assert_array_equal(
      audio.waveform_to_examples(pcm, 16000),
      audio.waveform_to_examples(pcm / 32768.0, 16000),
  )


def test_stereo_is_mono_mix(tmp_path):
  left, right = noise(2, seed=1), tone(440, 2, 16000)
  stereo = np.stack([left, right], axis=1)
  mono = (left.astype(np.float64) + right) / 2
  ref = audio.waveform_to_examples(mono, 16000)
  assert ref.shape == (2, 96, 64)
  np.testing.assert_allclose(
      audio.waveform_to_examples(stereo, 16000), ref, atol=1e-5
  )
  path = tmp_path / 'stereo.wav'
  sf.write(path, stereo, 16000, subtype='FLOAT')
  loaded = audio.load_audio(path)
  assert loaded.shape == (32000,) and loaded.dtype == np.float32
  np.testing.assert_allclose(loaded, mono, atol=1e-6)


def test_resampled_tone_lands_in_its_mel_band(tmp_path):
  freq = 1000.0
  path = tmp_path / 'tone_44k.wav'
  sf.write(path, tone(freq, 3, 44100), 44100, subtype='FLOAT')
  y = audio.load_audio(path)
  assert abs(y.shape[0] - 48000) <= 2
  ex = audio.clip_examples(path, num_seconds=3)
  ref = audio.waveform_to_examples(tone(freq, 3, 16000), 16000)
  # The band whose centre is closest to the tone, from the HTK mel formula.
  mel = lambda f: 1127.0 * np.log(1 + f / 700.0)
  centres = np.linspace(mel(125.0), mel(7500.0), 66)[1:-1]
  band = int(np.argmin(np.abs(centres - mel(freq))))
  spectrum = ex[:, 5:-5].mean(axis=(0, 1))  # away from the edges
  assert int(np.argmax(spectrum)) == band
  # Loose: soxr vs an exact 16 kHz tone, in the bands that carry energy.
  loud = ref[:, 5:-5].mean(axis=(0, 1)) > -2.0
  assert loud.sum() >= 1
  np.testing.assert_allclose(
      ex[:, 5:-5][..., loud], ref[:, 5:-5][..., loud], atol=0.05
  )
  # The array path resamples the same way.
  np.testing.assert_allclose(
      audio.waveform_to_examples(tone(freq, 3, 44100), 44100), ex, atol=1e-3
  )


def test_clip_pads_by_repeating_last_example():
  x = noise(3, seed=2)
  ex = audio.waveform_to_examples(x, 16000)
  assert ex.shape == (3, 96, 64)
  clip = audio.clip_examples(x)
  assert clip.shape == (5, 96, 64) and clip.dtype == np.float32
  np.testing.assert_array_equal(clip[:3], ex)
  np.testing.assert_array_equal(clip[3], ex[2])
  np.testing.assert_array_equal(clip[4], ex[2])
  assert not np.array_equal(ex[1], ex[2])


def test_clip_truncates_long_audio():
  x = noise(7.5, seed=3)
  ex = audio.waveform_to_examples(x, 16000)
  assert ex.shape[0] == 7
  np.testing.assert_array_equal(audio.clip_examples(x), ex[:5])
  assert audio.clip_examples(x, num_seconds=2).shape == (2, 96, 64)


def test_short_clip_error_names_file(tmp_path):
  path = tmp_path / 'short_clip.wav'
  sf.write(path, noise(0.9), 16000)
  with pytest.raises(ValueError, match='short_clip.wav'):
    audio.clip_examples(path)
  with pytest.raises(ValueError, match='shorter'):
    audio.clip_examples(noise(0.9))
  assert audio.waveform_to_examples(noise(0.9), 16000).shape == (0, 96, 64)


def test_unreadable_and_missing_files_error_names_file(tmp_path):
  bad = tmp_path / 'garbage.wav'
  bad.write_bytes(b'this is not audio' * 10)
  with pytest.raises(audio.AudioLoadError, match='garbage.wav') as e:
    audio.load_audio(bad)
  assert isinstance(e.value, ValueError) and isinstance(e.value, OSError)
  with pytest.raises(OSError, match='missing.wav'):
    audio.clip_examples(str(tmp_path / 'missing.wav'))
