"""Pictures: overlays, denormalisation, the report's PNGs."""

import json

import numpy as np
from PIL import Image

from avs_jax import draw
from avs_jax.data import IMAGENET_MEAN
from avs_jax.data import IMAGENET_STD


def test_overlay_tints_the_mask_and_outlines_it():
  frame = np.full((6, 6, 3), 100, np.uint8)
  mask = np.zeros((6, 6), bool)
  mask[1:5, 1:5] = True
  out = draw.overlay(frame, mask)
  np.testing.assert_array_equal(out[~mask], frame[~mask])  # outside: as is
  edge = mask.copy()
  edge[2:4, 2:4] = False
  assert (out[edge] == 255).all()  # white outline
  np.testing.assert_array_equal(
      out[2:4, 2:4].reshape(-1, 3), [[177, 70, 70]] * 4
  )  # half grey, half red
  # On an object of the tint's colour the outline still shows.
  red = np.zeros_like(frame)
  red[...] = (255, 40, 40)
  assert (draw.overlay(red, mask)[edge] != red[edge]).any(axis=-1).all()


def test_denormalize_inverts_the_input_normalisation():
  rgb = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), np.uint8)
  x = (rgb / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
  np.testing.assert_array_equal(draw.denormalize(x.astype(np.float32)), rgb)


def test_training_curve_and_clip_grid_write_pngs(tmp_path):
  jsonl = tmp_path / 'metrics.jsonl'
  rows = [{'step': s, 'loss': 1.0 / s} for s in range(1, 5)]
  rows.append({'step': 4, 'val_miou': 0.5})
  jsonl.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  draw.training_curve(str(jsonl), str(tmp_path / 'curve.png'))
  frames = np.zeros((2, 3, 8, 8, 3), np.uint8)
  masks = np.zeros((2, 3, 8, 8), np.float32)
  draw.clip_grid(
      frames, masks, masks > 0, ['a', 'b'], str(tmp_path / 'grid.png')
  )
  for name, rows_cols in (('curve.png', None), ('grid.png', (2 * 3, 3))):
    img = Image.open(tmp_path / name)
    assert img.size[0] > 100 and img.size[1] > 100, name
    if rows_cols:  # taller than wide: 6 rows of 3 columns
      assert img.size[1] > img.size[0]
