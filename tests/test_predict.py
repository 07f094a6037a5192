"""`run.py --mode predict` on short generated videos (ffmpeg from imageio-ffmpeg)."""

import os

import cv2
import imageio_ffmpeg
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import procs
from avs_jax import checkpoint as ckpt_lib
from avs_jax import predict
from avs_jax.models import build_model
from configs import synthetic

_video = procs.video


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('predict')
  c = synthetic.get_config()
  c.model.channels = 16
  c.data.image_size = 32
  c.data.synthetic.enabled = False
  model = build_model(c.model)
  variables = model.init(
      jax.random.key(0), jnp.zeros((1, 5, 32, 32, 3)), jnp.zeros((1, 5, 128))
  )
  ckpt = str(tmp / 'ckpt')
  ckpt_lib.save_variables(jax.device_get(variables), ckpt, step=3)
  c.predict.restore = ckpt
  return c, tmp, model, variables


def test_windows_cover_every_second_once_padded_by_repetition():
  w = predict.windows(7)
  assert [list(x) for x in w] == [[0, 1, 2, 3, 4], [5, 6, 6, 6, 6]]
  assert [list(x) for x in predict.windows(5)] == [[0, 1, 2, 3, 4]]


def test_predict_writes_masks_and_overlay_with_sound(setup):
  c, tmp, _, _ = setup
  c = c.copy_and_resolve_references()
  c.predict.video = _video(str(tmp / 'clip.mp4'), 7)
  c.predict.out = str(tmp / 'out')
  out = predict.predict_video(c, str(tmp))
  masks = sorted(os.listdir(os.path.join(out, 'masks')))
  assert masks == [f'clip_{s:04d}.png' for s in range(1, 8)]  # 7 s, 2 windows
  m = np.asarray(Image.open(os.path.join(out, 'masks', masks[0])))
  assert m.shape == (48, 64) and set(np.unique(m)) <= {0, 255}  # video size
  video = os.path.join(out, 'clip_overlay.mp4')
  gen = imageio_ffmpeg.read_frames(video)
  meta = next(gen)
  assert tuple(meta['size']) == (64, 48)
  assert sum(1 for _ in gen) == 70  # every frame of the source
  samples = predict.read_audio(video)  # the original sound is muxed in
  assert len(samples) > 6 * 16000
  spectrum = np.abs(np.fft.rfft(samples[:16000]))
  assert abs(np.argmax(spectrum) - 440) <= 2  # 1 Hz bins over one second


def test_overlay_is_the_whole_video_when_the_sound_is_shorter(setup):
  c, tmp, _, _ = setup
  c = c.copy_and_resolve_references()
  c.predict.video = _video(str(tmp / 'long.mp4'), 10, rate=25, audio_s=5.3)
  c.predict.out = str(tmp / 'long_out')
  c.predict.mask_size = 'model'
  out = predict.predict_video(c, str(tmp))
  masks = sorted(os.listdir(os.path.join(out, 'masks')))
  assert len(masks) == 10  # every second of video; audio padded by repetition
  m = np.asarray(Image.open(os.path.join(out, 'masks', masks[0])))
  assert m.shape == (32, 32)  # mask_size='model'
  gen = imageio_ffmpeg.read_frames(os.path.join(out, 'long_overlay.mp4'))
  meta = next(gen)
  assert sum(1 for _ in gen) == 250  # not cut where the sound ends
  assert meta['duration'] >= 9.9
  samples = predict.read_audio(os.path.join(out, 'long_overlay.mp4'))
  assert len(samples) >= 9.9 * 16000
  assert np.abs(samples[int(8 * 16000) :]).max() < 1e-3  # silence padded


def test_bad_mask_size_is_refused(setup):
  c, tmp, _, _ = setup
  c = c.copy_and_resolve_references()
  c.predict.video = _video(str(tmp / 'two.mp4'), 2)
  c.predict.mask_size = 'huge'
  with pytest.raises(predict.VideoError, match='mask_size'):
    predict.predict_video(c, str(tmp))


def test_masks_match_the_model_on_the_sampled_frames(setup):
  """Second s uses frame int(s*r + 15/16*r), as the reference preprocessing."""
  c, tmp, model, variables = setup
  c = c.copy_and_resolve_references()
  c.predict.video = _video(str(tmp / 'five.mp4'), 5)
  frames, fps, seconds = predict.sample_seconds(c.predict.video, 32)
  assert seconds == 5 and round(fps) == 10
  gen, _ = predict._open(c.predict.video)  # pylint: disable=protected-access
  raw = list(gen)
  want = [raw[int(s * 10 + 15 / 16 * 10)] for s in range(5)]
  # OpenCV's bilinear without antialiasing, as the reference preprocessing.
  resized = (
      np.stack(
          [
              cv2.resize(f, (32, 32), interpolation=cv2.INTER_LINEAR)
              for f in want
          ]
      )
      / 255.0
  )
  got = frames * np.asarray([0.229, 0.224, 0.225]) + np.asarray(
      [0.485, 0.456, 0.406]
  )
  np.testing.assert_allclose(got, resized, atol=1e-5)
  # PIL's antialiasing filter gives other inputs: the check tells them apart.
  pil = (
      np.stack(
          [
              np.asarray(Image.fromarray(f).resize((32, 32), Image.BILINEAR))
              for f in want
          ]
      )
      / 255.0
  )
  assert np.abs(got - pil).max() > 0.05


@pytest.mark.parametrize(
    'kind', ['no_audio', 'unreadable', 'too_short', 'missing']
)
def test_bad_videos_give_clear_errors(setup, kind):
  c, tmp, _, _ = setup
  c = c.copy_and_resolve_references()
  path = str(tmp / f'{kind}.mp4')
  if kind == 'no_audio':
    _video(path, 3, audio=False)
    expect = 'no audio track'
  elif kind == 'unreadable':
    with open(path, 'wb') as f:
      f.write(b'not a video at all')
    expect = 'not a readable video'
  elif kind == 'too_short':
    _video(path, 0.5)
    expect = 'too short'
  else:
    expect = 'no such file'
  c.predict.video = path
  with pytest.raises(predict.VideoError, match=expect) as e:
    predict.predict_video(c, str(tmp))
  assert path in str(e.value)


# ---------------------------------------------------------------------------
# AVSS: coloured class masks with a legend, from a converted checkpoint.


@pytest.fixture(scope='module')
def avss_setup(tmp_path_factory):
  """A small random AVSS model saved as the official release is (a PyTorch
  state dict, here .npz) and converted by `avs_jax.convert`, plus a
  label2idx.json with its own names."""
  import json  # pylint: disable=g-import-not-at-top

  from avs_jax import avss  # pylint: disable=g-import-not-at-top
  from avs_jax import convert  # pylint: disable=g-import-not-at-top
  from configs import avss as avss_config  # pylint: disable=g-import-not-at-top

  tmp = tmp_path_factory.mktemp('predict_avss')
  c = avss_config.get_config('resnet_tiny')
  c.model.channels, c.model.head_channels = 16, 8
  c.data.image_size = 32
  c.data.dir = str(tmp / 'no_data')
  model = build_model(c.model)
  variables = jax.device_get(
      model.init(
          jax.random.key(1),
          jnp.zeros((1, 10, 32, 32, 3)),
          jnp.zeros((1, 10, 128)),
      )
  )
  np.savez(str(tmp / 'official.npz'), **avss.flax_to_torch(variables, c.model))
  convert.to_orbax(str(tmp / 'official.npz'), str(tmp / 'ckpt'), c)
  names = {f'name_{i:02d}': i for i in range(71)}
  with open(tmp / 'label2idx.json', 'w') as f:
    json.dump(names, f)
  c.data.label2idx = str(tmp / 'label2idx.json')
  c.predict.restore = str(tmp / 'ckpt')
  return c, tmp, model, variables


def _expected_classes(c, model, variables, video):
  """argmax of the model on the sampled seconds: one 10-frame window, the
  seconds past the video padded with zero frames under a frame mask of 0."""
  from avs_jax import runtime  # pylint: disable=g-import-not-at-top

  frames, _, seconds = predict.sample_seconds(video, 32)
  examples = predict.audio_examples(video, seconds)
  _, vggish = runtime.build(c)
  audio_vars = jax.device_get(
      runtime.audio_variables(c, vggish, runtime.local_mesh())
  )
  f = np.zeros((1, 10, 32, 32, 3), np.float32)
  a = np.zeros((1, 10, 96, 64), np.float32)
  f[0, :seconds], a[0, :seconds] = frames, examples
  fm = (np.arange(10) < seconds).astype(np.float32)[None]
  out = model.apply(variables, f, vggish.apply(audio_vars, a), frame_mask=fm)
  return np.asarray(jnp.argmax(out['logits'], -1))[0, :seconds]


def test_avss_predict_writes_coloured_masks_and_legend(avss_setup):
  import json  # pylint: disable=g-import-not-at-top

  from avs_jax import avss  # pylint: disable=g-import-not-at-top

  c, tmp, model, variables = avss_setup
  c = c.copy_and_resolve_references()
  c.predict.video = _video(str(tmp / 'clip.mp4'), 7)
  c.predict.out = str(tmp / 'out')
  c.predict.mask_size = 'model'
  out = predict.predict_video(c, str(tmp))
  want = _expected_classes(c, model, variables, c.predict.video)
  pal = avss.palette()
  masks = sorted(os.listdir(os.path.join(out, 'masks')))
  assert masks == [f'clip_{s:04d}.png' for s in range(1, 8)]
  for s, name in enumerate(masks):
    got = np.asarray(Image.open(os.path.join(out, 'masks', name)))
    assert got.shape == (32, 32, 3)
    np.testing.assert_array_equal(got, pal[want[s]])
  with open(os.path.join(out, 'legend.json')) as f:
    legend = json.load(f)
  assert legend, 'the random model predicts some non-background class'
  assert [e['index'] for e in legend] == sorted(set(np.unique(want)) - {0})
  for e in legend:
    assert e['name'] == f'name_{e["index"]:02d}'  # from label2idx.json
    assert e['color'] == pal[e['index']].tolist()
  assert Image.open(os.path.join(out, 'legend.png')).size[1] >= 18 * len(legend)
  gen = imageio_ffmpeg.read_frames(os.path.join(out, 'clip_overlay.mp4'))
  assert tuple(next(gen)['size']) == (64, 48)
  assert sum(1 for _ in gen) == 70  # every frame of the source


def test_avss_predict_masks_at_video_size_are_palette_colours(avss_setup):
  from avs_jax import avss  # pylint: disable=g-import-not-at-top

  c, tmp, _, _ = avss_setup
  c = c.copy_and_resolve_references()
  c.predict.video = _video(str(tmp / 'three.mp4'), 3)
  c.predict.out = str(tmp / 'three_out')
  out = predict.predict_video(c, str(tmp))
  got = np.asarray(Image.open(os.path.join(out, 'masks', 'three_0001.png')))
  assert got.shape == (48, 64, 3)
  colours = {tuple(x) for x in got.reshape(-1, 3)}
  assert colours <= {tuple(x) for x in avss.palette().tolist()}


def test_avsegformer_predict_gives_the_model_masks(tmp_path):
  """AVSegFormer through `predict`: the masks are its own sigmoid > 0.5 on
  the sampled seconds (one 5-second window), written at the model's size,
  and the overlay covers the whole video."""
  from avs_jax import runtime  # pylint: disable=g-import-not-at-top
  from configs import synthetic_avsegformer  # pylint: disable=g-import-not-at-top

  c = synthetic_avsegformer.get_config()
  c.model.update(query_num=4, num_layers=1, generator_layers=1, ffn_dim=32)
  c.data.image_size = 32
  c.data.synthetic.enabled = False
  model, vggish = runtime.build(c)
  variables = jax.device_get(runtime.init_variables(c, model))
  ckpt_lib.save_variables(variables, str(tmp_path / 'ckpt'), step=2)
  c.predict.restore = str(tmp_path / 'ckpt')
  c.predict.video = _video(str(tmp_path / 'clip.mp4'), 5)
  c.predict.out = str(tmp_path / 'out')
  c.predict.mask_size = 'model'
  out = predict.predict_video(c, str(tmp_path))

  frames, _, seconds = predict.sample_seconds(c.predict.video, 32)
  log_mel = predict.audio_examples(c.predict.video, seconds)
  audio_vars = jax.device_get(
      runtime.audio_variables(c, vggish, runtime.local_mesh())
  )
  logits = model.apply(
      variables,
      jnp.asarray(frames[None]),
      vggish.apply(audio_vars, jnp.asarray(log_mel[None])),
      train=False,
  )['logits'][0]
  want = np.asarray(jax.nn.sigmoid(logits)) > 0.5
  assert 0 < want.mean() < 1, 'a random model: some pixels each way'
  masks = sorted(os.listdir(os.path.join(out, 'masks')))
  assert masks == [f'clip_{s:04d}.png' for s in range(1, 6)]
  for s, name in enumerate(masks):
    got = np.asarray(Image.open(os.path.join(out, 'masks', name))) > 0
    assert got.shape == (32, 32)
    assert (got != want[s]).mean() < 1e-3, s  # sigmoid at 0.5 +- rounding
  gen = imageio_ffmpeg.read_frames(os.path.join(out, 'clip_overlay.mp4'))
  assert tuple(next(gen)['size']) == (64, 48)
  assert sum(1 for _ in gen) == 50
