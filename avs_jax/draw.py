"""Pictures: frames back to RGB, mask overlays, training curves, clip grids."""

import json
import os

from matplotlib.figure import Figure
import numpy as np

from avs_jax.data import IMAGENET_MEAN
from avs_jax.data import IMAGENET_STD


def denormalize(frames):
  """ImageNet-normalised `[..., 3]` floats -> uint8 RGB."""
  x = frames * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
  return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def overlay(frame, mask, color=(255, 40, 40), alpha=0.5, edge=(255, 255, 255)):
  """`frame [H, W, 3] uint8`, `mask [H, W] bool` -> blended uint8 image.

  The mask is tinted with `color` and outlined with `edge`, so that it shows
  on objects of the tint's colour too.
  """
  out = frame.astype(np.float32)
  out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, np.float32)
  inner = mask.copy()
  inner[1:] &= mask[:-1]
  inner[:-1] &= mask[1:]
  inner[:, 1:] &= mask[:, :-1]
  inner[:, :-1] &= mask[:, 1:]
  out[mask & ~inner] = edge
  return out.astype(np.uint8)


def color_overlay(frame, label, pal, alpha=0.5):
  """`frame [H, W, 3] uint8`, `label [H, W]` class indices -> a blend of the
  frame with each class's palette colour (`pal [K, 3]`), class 0 (the
  background) left as is, class borders in white."""
  out = frame.astype(np.float32)
  fg = label > 0
  out[fg] = (1 - alpha) * out[fg] + alpha * pal[label[fg]].astype(np.float32)
  edge = np.zeros_like(fg)
  edge[1:] |= label[1:] != label[:-1]
  edge[:, 1:] |= label[:, 1:] != label[:, :-1]
  out[edge] = 255
  return out.astype(np.uint8)


def legend(names, colors, path):
  """A PNG with a colour swatch and the name of each class given."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top

  row = 18
  img = Image.new('RGB', (220, row * max(len(names), 1) + 4), 'white')
  pen = ImageDraw.Draw(img)
  for i, (name, color) in enumerate(zip(names, colors)):
    y = 2 + i * row
    pen.rectangle(
        [4, y + 2, 24, y + row - 2], fill=tuple(int(c) for c in color)
    )
    pen.text((30, y + 3), str(name), fill='black')
  img.save(path)


def training_curve(metrics_jsonl, path):
  """Train loss and validation J over steps from `metrics.jsonl` -> PNG."""
  with open(metrics_jsonl) as f:
    rows = [json.loads(line) for line in f]
  loss = [(r['step'], r['loss']) for r in rows if 'loss' in r]
  val = [(r['step'], r['val_miou']) for r in rows if 'val_miou' in r]
  fig = Figure(figsize=(6, 3.5))
  ax = fig.add_subplot()
  if loss:
    ax.plot(*zip(*loss), label='train loss', color='tab:blue')
  ax.set_xlabel('step')
  ax.set_ylabel('loss')
  ax2 = ax.twinx()
  if val:
    ax2.plot(*zip(*val), 'o-', label='val J', color='tab:red')
  ax2.set_ylabel('val J')
  ax2.set_ylim(0, 1)
  fig.legend(loc='upper center', ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def clip_grid(frames, truth, pred, ids, path):
  """Rows per clip: frames, ground truth, prediction; a column per second.

  `frames [N, T, H, W, 3]` uint8, `truth`, `pred [N, T, H, W]` in {0, 1},
  `ids [N]` clip names.
  """
  n, t = frames.shape[:2]
  fig = Figure(figsize=(1.6 * t, 1.6 * 3 * n))
  axes = fig.subplots(3 * n, t, squeeze=False)
  for c in range(n):
    for j in range(t):
      rows = (
          (frames[c, j], 'frame'),
          (truth[c, j], 'truth'),
          (pred[c, j], 'prediction'),
      )
      for r, (img, label) in enumerate(rows):
        ax = axes[3 * c + r, j]
        if img.ndim == 2:
          ax.imshow(np.asarray(img, np.float32), cmap='gray', vmin=0, vmax=1)
        else:
          ax.imshow(img)
        ax.set_xticks([])
        ax.set_yticks([])
        if j == 0:
          ax.set_ylabel(label, fontsize=7)
      axes[3 * c, j].set_title(f'{ids[c]} s{j + 1}', fontsize=6)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
