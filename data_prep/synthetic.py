r"""Synthetic AVSBench: AVSBench-object layout clips that need the audio.

Every clip shows 2-4 objects of distinct classes on a textured background,
drifting a few pixels per frame. Each class has a look (colour, shape,
texture) and a sound (a signature in its own band of the VGGish mel range:
chord, pulses, noise band, chirps). Only some objects sound; the silent ones
stay visible, so the mask cannot be found without the audio.

- Single-source (S4): one object sounds for the whole clip; its class is the
  clip's category.
- Multi-sources (MS3): one or two sources per clip, each silent in some
  seconds (then that second's mask has one object, or none).

"Second" t of a clip is the t-th VGGish example window, [0.96 t, 0.96 (t+1))
seconds (the last one runs to 5 s), so the log-mel example t describes exactly
mask t. Masks are the union of the objects sounding in that second. Audio is
5 s, 16 kHz, mono int16. Splits are 70/15/15; output is deterministic per seed.

  python -m data_prep.synthetic --out /tmp/avsbench_synth --clips 300 \
      --seed 0 --size 96

`ensure_synthetic_data(config)` gives the demo its data: generated and
prepared once, reused while the parameters match.
"""

import argparse
import csv
import dataclasses
import json
import multiprocessing
import os
import sys

import jax
import numpy as np
from PIL import Image
import soundfile
import tqdm

from avs_jax import data as data_lib
from avs_jax import utils
from avs_jax.data import records
from data_prep import avsbench
from data_prep import layout

SAMPLE_RATE = 16000
NUM_FRAMES = records.NUM_FRAMES
NUM_SAMPLES = NUM_FRAMES * SAMPLE_RATE
GENERATOR_VERSION = 2  # of the generator's output; bump when clips change
MS3_PAUSE = 0.1  # MS3: chance that a source is silent in a given second
SEGMENT_SECONDS = 0.96  # VGGish example hop: example t <-> frame t.


@dataclasses.dataclass(frozen=True)
class SynthClass:
  """One object class: how it looks and how it sounds."""

  name: str
  color: tuple  # RGB uint8
  shape: str  # circle|square|triangle|diamond|ring|plus|hexagon|cross
  texture: str  # solid|stripes|checker
  sound: str  # chord|pulses|noise|chirp
  band: tuple  # (low Hz, high Hz), disjoint between classes


def _mel_bands(num, lo=125.0, hi=7500.0, keep=0.6):
  """`num` disjoint bands: the central `keep` of equal mel-range slices."""
  mel = lambda f: 1127.0 * np.log1p(f / 700.0)
  hz = lambda m: 700.0 * np.expm1(m / 1127.0)
  edges = np.linspace(mel(lo), mel(hi), num + 1)
  width = np.diff(edges)
  return [
      (float(hz(e + w * (1 - keep) / 2)), float(hz(e + w * (1 + keep) / 2)))
      for e, w in zip(edges[:-1], width)
  ]


_LOOKS = (  # name, colour, shape, texture, sound
    ('red_circle', (225, 35, 35), 'circle', 'solid', 'chord'),
    ('green_square', (40, 205, 60), 'square', 'solid', 'pulses'),
    ('blue_triangle', (45, 85, 235), 'triangle', 'solid', 'noise'),
    ('yellow_diamond', (245, 225, 35), 'diamond', 'solid', 'chirp'),
    ('magenta_ring', (225, 45, 225), 'ring', 'solid', 'chord'),
    ('cyan_plus', (35, 225, 235), 'plus', 'solid', 'pulses'),
    ('orange_hexagon', (250, 140, 15), 'hexagon', 'stripes', 'chirp'),
    ('white_cross', (245, 245, 245), 'cross', 'checker', 'noise'),
)
CLASSES = tuple(
    SynthClass(*look, band=band)
    for look, band in zip(_LOOKS, _mel_bands(len(_LOOKS)))
)


# ----------------------------------------------------------------------------
# Pictures.


def shape_mask(shape, u, v):
  """Inside-test of a unit-radius shape at coordinates `u, v` (any shape)."""
  au, av, r2 = np.abs(u), np.abs(v), u * u + v * v
  if shape == 'circle':
    return r2 <= 1.0
  if shape == 'square':
    return np.maximum(au, av) <= 0.82
  if shape == 'triangle':  # apex up (image v grows downwards)
    return (v <= 0.75) & (au <= (v + 0.95) * 0.55)
  if shape == 'diamond':
    return au + av <= 1.0
  if shape == 'ring':
    return (r2 <= 1.0) & (r2 >= 0.42**2)
  if shape == 'plus':
    return ((au <= 0.32) & (av <= 0.95)) | ((av <= 0.32) & (au <= 0.95))
  if shape == 'hexagon':
    return (av <= 0.85) & (au + 0.577 * av <= 0.98)
  if shape == 'cross':
    return (r2 <= 1.0) & ((np.abs(u - v) <= 0.45) | (np.abs(u + v) <= 0.45))
  raise ValueError(f'unknown shape {shape!r}')


def _texture(cls, u, v):
  """RGB float [..., 3] of class `cls` at coordinates `u, v`."""
  color = np.asarray(cls.color, np.float32)
  if cls.texture == 'stripes':
    dark = (np.floor((u + 1) * 2.5) % 2).astype(bool)
  elif cls.texture == 'checker':
    dark = ((np.floor(u * 2.5) + np.floor(v * 2.5)) % 2).astype(bool)
  else:
    dark = np.zeros(u.shape, bool)
  return np.where(dark[..., None], color * 0.45, color)


@dataclasses.dataclass
class _Object:
  cls: SynthClass
  radius: float
  center: np.ndarray  # [2] (y, x) at frame 0, pixels
  velocity: np.ndarray  # [2] pixels per frame

  def at(self, t):
    return self.center + t * self.velocity


def _place_objects(rng, classes, size, num_frames=NUM_FRAMES):
  """Non-overlapping drifting objects, inside the frame in all frames."""
  objects = []
  times = np.arange(num_frames)[:, None]
  for cls in classes:
    radius = size * rng.uniform(0.13, 0.17)
    for attempt in range(1000):
      if attempt and attempt % 100 == 0:
        radius *= 0.9
      velocity = size * rng.uniform(-0.02, 0.02, 2)
      center = rng.uniform(radius + 1, size - radius - 1, 2)
      path = center + times * velocity
      if np.any(path < radius + 1) or np.any(path > size - radius - 1):
        continue
      if all(
          np.min(np.linalg.norm(path - (o.center + times * o.velocity), axis=1))
          >= 1.1 * (radius + o.radius) + 1
          for o in objects
      ):
        objects.append(_Object(cls, radius, center, velocity))
        break
  return objects


def _background(rng, size):
  """Smooth muted colour field, float32 [size, size, 3] in [25, 150]."""
  grey = rng.uniform(40, 120, (4, 4, 1))
  tint = rng.uniform(-18, 18, (4, 4, 3))
  coarse = np.clip(grey + tint, 25, 150).astype(np.uint8)
  field = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
  return np.asarray(field, np.float32)


def render_clip(rng, objects, size, num_frames=NUM_FRAMES):
  """Frames uint8 [T, S, S, 3] and object masks bool [T, K, S, S] (T = 5)."""
  background = _background(rng, size)
  grid = np.arange(size, dtype=np.float32) + 0.5
  frames = np.empty((num_frames, size, size, 3), np.uint8)
  masks = np.zeros((num_frames, len(objects), size, size), bool)
  for t in range(num_frames):
    img = background.copy()
    for k, obj in enumerate(objects):
      cy, cx = obj.at(t)
      u = (grid[None, :] - cx) / obj.radius
      v = (grid[:, None] - cy) / obj.radius
      inside = shape_mask(obj.cls.shape, u, v)
      masks[t, k] = inside
      img[inside] = _texture(
          obj.cls,
          np.broadcast_to(u, inside.shape)[inside],
          np.broadcast_to(v, inside.shape)[inside],
      )
    img += rng.normal(0.0, 6.0, img.shape).astype(np.float32)
    frames[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
  return frames, masks


# ----------------------------------------------------------------------------
# Sounds.


def _band_noise(rng, lo, hi, n):
  spec = np.fft.rfft(rng.standard_normal(n))
  freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
  spec[(freqs < lo) | (freqs > hi)] = 0.0
  return np.fft.irfft(spec, n)


def class_sound(rng, cls, n=NUM_SAMPLES):
  """`n` samples of the class signature, float64, RMS 1."""
  lo, hi = cls.band
  t = np.arange(n) / SAMPLE_RATE
  if cls.sound == 'chord':  # three steady partials spread over the band
    freqs = lo * (hi / lo) ** ((np.arange(3) + 0.5) / 3)
    phases = rng.uniform(0, 2 * np.pi, 3)
    x = sum(
        a * np.sin(2 * np.pi * f * t + p)
        for a, f, p in zip((1.0, 0.7, 0.5), freqs, phases)
    )
  elif cls.sound == 'noise':  # steady noise band
    x = _band_noise(rng, lo, hi, n)
  elif cls.sound == 'pulses':  # noise band gated at 5 Hz
    gate = ((t * 5.0 + rng.uniform()) % 1.0) < 0.5
    x = _band_noise(rng, lo, hi, n) * _smooth(gate.astype(np.float64), 80)
  elif cls.sound == 'chirp':  # log sweeps low -> high, 4 per second
    frac = (t * 4.0 + rng.uniform()) % 1.0
    freq = lo * (hi / lo) ** frac
    x = np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE)
  else:
    raise ValueError(f'unknown sound {cls.sound!r}')
  return x / (np.sqrt(np.mean(x * x)) + 1e-12)


def _smooth(x, width):
  """Moving average over `width` samples: linear ramps instead of clicks."""
  c = np.cumsum(np.pad(x, (width // 2, width - width // 2)))
  return (c[width:] - c[:-width]) / width


def segment_of_sample(n=NUM_SAMPLES, num_frames=NUM_FRAMES):
  """int [n]: which second (VGGish example window, 0..T-1) each sample is in."""
  return np.minimum(
      np.arange(n) // round(SEGMENT_SECONDS * SAMPLE_RATE), num_frames - 1
  )


def mix_audio(rng, objects, sounding):
  """int16 [T * 16000]: the sounding objects' sounds, second by second.

  `sounding`: per second, a set of indices into `objects` (T = 5 seconds).
  """
  n = len(sounding) * SAMPLE_RATE
  seg = segment_of_sample(n, len(sounding))
  mix = 3e-4 * rng.standard_normal(n)
  for k, obj in enumerate(objects):
    on = np.array([k in s for s in sounding])
    if not on.any():
      continue
    gain = 0.1 * rng.uniform(0.7, 1.0)
    mix += (
        gain
        * _smooth(on[seg].astype(np.float64), 160)
        * class_sound(rng, obj.cls, n)
    )
  return np.round(np.clip(mix, -1, 1) * 32767).astype(np.int16)


# ----------------------------------------------------------------------------
# Clips and layout.


def sounding_schedule(rng, num_objects, setting):
  """Per second, the set of sounding object indices.

  MS3: one or two of the objects are the clip's sources; each second, each
  source is silent with probability `MS3_PAUSE` (so some seconds have one
  source or none). The sources stay the same within a clip, as in
  AVSBench-MS3: the reference's TPAVI sums the audio of all 5 seconds into
  every frame, so a faithful model knows which objects sound in the clip but
  barely which second they sound in.
  """
  if setting == 's4':
    return [{int(rng.integers(num_objects))}] * NUM_FRAMES
  count = min(int(rng.choice((1, 2), p=(0.4, 0.6))), num_objects)
  sources = rng.choice(num_objects, count, replace=False).tolist()
  return [
      {k for k in sources if rng.random() >= MS3_PAUSE}
      for _ in range(NUM_FRAMES)
  ]


def make_clip(seed, setting, index, size):
  """One clip: frames, masks (union of sounding objects), audio, info."""
  rng = np.random.default_rng([seed, {'s4': 4, 'ms3': 3}[setting], index])
  num = int(rng.integers(2, 5))
  classes = [CLASSES[i] for i in rng.choice(len(CLASSES), num, replace=False)]
  objects = _place_objects(rng, classes, size)
  frames, object_masks = render_clip(rng, objects, size)
  sounding = sounding_schedule(rng, len(objects), setting)
  masks = np.stack(
      [
          object_masks[t, sorted(s)].any(axis=0)
          if s
          else np.zeros((size, size), bool)
          for t, s in enumerate(sounding)
      ]
  )
  return dict(
      frames=frames,
      masks=masks,
      audio=mix_audio(rng, objects, sounding),
      objects=[o.cls.name for o in objects],
      sounding=[sorted(objects[k].cls.name for k in s) for s in sounding],
  )


def split_of(index, num_clips):
  """70/15/15 split by clip index (no split empty when num_clips >= 3)."""
  num_val = max(1, round(0.15 * num_clips))
  num_train = num_clips - 2 * num_val
  if index < num_train:
    return 'train'
  return 'val' if index < num_train + num_val else 'test'


def _save_png(path, img):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img.save(path, compress_level=1)


def _palette_mask(mask):
  """Palette ('P') PNG: index 0 black, 1 white, as MS3 masks are stored."""
  img = Image.fromarray(mask.astype(np.uint8), mode='P')
  img.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
  return img


def write_clip(root, seed, setting, index, num_clips, size):
  """Writes clip `index` of `setting`; returns (setting, its CSV row)."""
  clip = make_clip(seed, setting, index, size)
  split = split_of(index, num_clips)
  name = f'{setting}_{index:05d}'
  if setting == 's4':
    category = clip['sounding'][0][0]
    row = dict(name=name, start_time=0, category=category, split=split)
  else:
    category = ''
    row = dict(video_id=name, split=split)
  files = layout.locate(root, setting, name, split, category)
  for path, frame in zip(files.frames, clip['frames']):
    _save_png(path, Image.fromarray(frame))
  for path, mask in zip(files.masks, clip['masks']):
    if path is None:  # S4 train: only the first frame is labelled
      continue
    if setting == 's4':  # 0/255 grayscale
      _save_png(path, Image.fromarray(mask.astype(np.uint8) * 255))
    else:
      _save_png(path, _palette_mask(mask))
  os.makedirs(os.path.dirname(files.wav), exist_ok=True)
  soundfile.write(files.wav, clip['audio'], SAMPLE_RATE, subtype='PCM_16')
  row['objects'] = ' '.join(clip['objects'])
  row['sounding'] = '|'.join('+'.join(s) for s in clip['sounding'])
  return setting, row


def _write_job(args):
  return write_clip(*args)


def generate(
    root, num_clips, seed=0, size=224, workers=None, settings=('s4', 'ms3')
):
  """Writes the subsets (`settings`) of `num_clips` clips each under `root`."""
  jobs = [
      (root, seed, setting, i, num_clips, size)
      for setting in settings
      for i in range(num_clips)
  ]
  workers = workers or os.cpu_count() or 1
  ctx = multiprocessing.get_context('spawn')  # safe beside JAX's threads
  with ctx.Pool(workers) if workers > 1 else _NoPool() as pool:
    rows = list(
        tqdm.tqdm(
            pool.imap(_write_job, jobs, chunksize=4),
            total=len(jobs),
            desc='synthetic clips',
            unit='clip',
        )
    )
  for setting in settings:
    fields = list(layout.CSV_FIELDS[setting]) + ['objects', 'sounding']
    with open(layout.csv_path(root, setting), 'w', newline='') as f:
      writer = csv.DictWriter(f, fields)
      writer.writeheader()
      writer.writerows(row for s, row in rows if s == setting)


class _NoPool:
  """In-process stand-in for multiprocessing.Pool (workers=1)."""

  imap = staticmethod(lambda fn, it, chunksize=1: map(fn, it))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


# ----------------------------------------------------------------------------
# The demo's data: generated and prepared once, reused while parameters match.


class SyntheticDataError(ValueError):
  """The synthetic data on disk was made with other parameters."""


def _recorded(folder, want, config):
  """The parameters recorded in `folder` (None if none); raises if not `want`.

  The message names both folders of `config.data` to delete.
  """
  path = os.path.join(folder, 'synthetic.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    have = json.load(f)
  if have != want:
    raise SyntheticDataError(
        f'{folder} holds synthetic data made with {have}, the config asks '
        f'for {want}: delete {config.data.dir} and '
        f'{config.data.synthetic.root}, or point --config.data.dir and '
        '--config.data.synthetic.root elsewhere'
    )
  return have


def _record(folder, want):
  with open(os.path.join(folder, 'synthetic.json'), 'w') as f:
    json.dump(want, f)


def ensure_synthetic_data(config):
  """Generates the synthetic AVSBench and its shards unless already there.

  `config.data`: dir (the shards), setting, and synthetic.{root, clips, seed,
  size}. The generation parameters are recorded in both folders
  (`synthetic.json`); data made with other parameters (or by an older
  generator) is not reused: that raises SyntheticDataError naming the folders
  to delete. An interrupted generation or preparation is redone (resumed) on
  the next call.
  """
  sc, dc = config.data.synthetic, config.data
  want = dict(
      version=GENERATOR_VERSION, clips=sc.clips, seed=sc.seed, size=sc.size
  )
  want_raw = dict(want, settings=[dc.setting])
  want_shards = dict(want, setting=dc.setting)
  if _recorded(dc.dir, want_shards, config):
    data_lib.num_examples(dc.dir, dc.setting, 'train')  # readable
    return
  if jax.process_index() != 0:
    raise RuntimeError('prepare the synthetic data on process 0 first')
  if not _recorded(sc.root, want_raw, config):  # absent, or interrupted
    utils.log(f'generating {sc.clips} synthetic clips in {sc.root}')
    generate(
        sc.root, sc.clips, seed=sc.seed, size=sc.size, settings=(dc.setting,)
    )
    _record(sc.root, want_raw)
  utils.log(f'preparing shards in {dc.dir}')
  errors, _ = avsbench.prepare(sc.root, dc.setting, dc.dir)
  if errors:
    raise RuntimeError(
        f'{len(errors)} synthetic clips failed to prepare; see '
        f'{dc.dir}/errors.jsonl'
    )
  _record(dc.dir, want_shards)


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m data_prep.synthetic', description=__doc__.split('\n')[0]
  )
  parser.add_argument(
      '--out',
      required=True,
      help='root directory to write (the AVSBench-object layout)',
  )
  parser.add_argument(
      '--clips',
      type=int,
      default=300,
      help='clips per subset (Single-source and Multi-sources), >= 3',
  )
  parser.add_argument('--seed', type=int, default=0, help='random seed')
  parser.add_argument(
      '--size',
      type=int,
      default=224,
      help='frame height and width in pixels, >= 32',
  )
  parser.add_argument(
      '--workers',
      type=int,
      default=0,
      help='processes (default: all CPU cores)',
  )
  args = parser.parse_args(argv)
  if args.clips < 3:
    parser.exit(2, 'error: --clips must be at least 3 (one clip per split)\n')
  if args.size < 32:
    parser.exit(2, 'error: --size must be at least 32 pixels\n')
  generate(args.out, args.clips, args.seed, args.size, args.workers or None)
  print(
      f'wrote {args.clips} Single-source and {args.clips} Multi-sources clips '
      f'({args.size}x{args.size}) to {args.out}'
  )


if __name__ == '__main__':
  sys.exit(main())
