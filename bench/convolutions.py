r"""Every convolution of the compiled train step, timed alone.

  python bench/convolutions.py --backbone resnet50 --image_size 160
  python bench/convolutions.py --backbone pvt_v2_b5 --top 20 --json c.json

Builds the MS3 train step as `bench/vs_reference.py` does (`--batch` clips
of 5 frames, float32, the frozen VGGish in the step, random weights), reads
its convolutions from the optimized HLO (shapes, window, dimension labels
and the JAX op name, which tells the module and whether it is the forward
pass or the backward), compiles each alone as one `lax.conv_general_dilated`
on ones and times it (median of `--repeats`). Identical convolutions are
timed once and counted. Prints the total and the convolutions by time: ms
(x count), GFLOP/s, GFLOP each, shapes, window, op name.

On XLA:CPU a `--profile` trace names the fusions but not the Eigen
convolutions, which take most of the step (docs/PERFORMANCE.md): this is
where their time shows. Times alone are not times in the step (caches,
the other threads), but they rank the convolutions and give their rates.
"""

import argparse
import json
import math
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

_NAME = re.compile(r'\s*(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]')


def parse_convolutions(hlo_text):
  """The convolutions of optimized HLO text, one dict per distinct one:
  `lhs`, `rhs`, `out` shapes, `dimension_numbers` (lax's strings), `strides`,
  `padding`, `lhs_dilation`, `rhs_dilation`, `feature_group_count`,
  `batch_group_count`, `window` (HLO's text), `gflop`, `op_name`, `count`."""
  shapes = {}
  for line in hlo_text.splitlines():
    m = _NAME.match(line)
    if m:
      shapes[m.group(1)] = tuple(int(v) for v in m.group(2).split(',') if v)
  convs = {}
  for line in hlo_text.splitlines():
    if ' convolution(' not in line:
      continue
    out = tuple(int(v) for v in _NAME.match(line).group(2).split(',') if v)
    args = re.search(r'convolution\(([^)]*)\)', line).group(1).split(', ')
    lhs, rhs = (shapes[a.split(' ')[-1].lstrip('%')] for a in args[:2])
    labels = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', line).groups()
    window = re.search(r'window=\{([^}]*)\}', line)
    window = window.group(1) if window else ''
    spatial = len(labels[0]) - 2

    def field(name, default, window=window, spatial=spatial):
      m = re.search(name + r'=([\dx_\-]+)', window)
      return m.group(1).split('x') if m else [default] * spatial

    group = lambda name, line=line: int(
        (re.search(name + r'=(\d+)', line) or [None, 1])[1]
    )
    op = re.search(r'op_name="([^"]*)"', line)
    # HLO's b/f (batch, feature), o/i, 0/1/2 (spatial) -> lax's letters.
    lax_labels = tuple(
        s.translate(str.maketrans('bfoi012', 'NCOIHWD')) for s in labels
    )
    size = [int(v) for v in field('size', '1')]
    key = (lhs, rhs, labels, window, group('feature_group_count'))
    if key in convs:
      convs[key]['count'] += 1
      continue
    convs[key] = {
        'lhs': lhs,
        'rhs': rhs,
        'out': out,
        'dimension_numbers': lax_labels,
        'strides': [int(v) for v in field('stride', '1')],
        'padding': [
            tuple(int(v) for v in p.split('_')) for p in field('pad', '0_0')
        ],
        'lhs_dilation': [int(v) for v in field('lhs_dilate', '1')],
        'rhs_dilation': [int(v) for v in field('rhs_dilate', '1')],
        'feature_group_count': group('feature_group_count'),
        'batch_group_count': group('batch_group_count'),
        'window': window,
        'gflop': 2
        * math.prod(out)
        * math.prod(size)
        * rhs[labels[1].index('i')]
        / 1e9,
        'op_name': op.group(1) if op else '',
        'count': 1,
    }
  return list(convs.values())


def conv_fn(c):
  """`(lhs, rhs) -> out`: the convolution `c` as one jitted lax call."""
  import jax  # pylint: disable=g-import-not-at-top

  return jax.jit(
      lambda x, k: jax.lax.conv_general_dilated(
          x,
          k,
          c['strides'],
          c['padding'],
          c['lhs_dilation'],
          c['rhs_dilation'],
          c['dimension_numbers'],
          feature_group_count=c['feature_group_count'],
          batch_group_count=c['batch_group_count'],
      )
  )


def time_convolution(c, repeats):
  """Median seconds of the convolution `c` alone, on ones."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  f = conv_fn(c)
  x, k = jnp.ones(c['lhs']), jnp.ones(c['rhs'])
  jax.block_until_ready(f(x, k))
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(x, k))
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  vs_reference.add_step_args(p)
  p.add_argument('--cores', type=int, default=2, help='pin to this many')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--top', type=int, default=30, help='rows printed')
  p.add_argument('--json', default='', help='write every row here')
  args = p.parse_args(argv)
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
  vs_reference.set_xla_flags()

  config = vs_reference.step_config(
      args.config, args.backbone, args.set, args.image_size
  )
  size = args.image_size
  host = vs_reference.host_inputs(0, args.batch, size, size)
  step = vs_reference.JaxStep(config, host)
  convs = parse_convolutions(step.fn.as_text())
  for c in convs:
    c['seconds'] = time_convolution(c, args.repeats)
  convs.sort(key=lambda c: -c['seconds'] * c['count'])
  total_s = sum(c['seconds'] * c['count'] for c in convs)
  total_gf = sum(c['gflop'] * c['count'] for c in convs)
  print(
      f'{args.backbone} at {size}x{size}, {args.batch} clip(s): '
      f'{sum(c["count"] for c in convs)} convolutions ({len(convs)} distinct)'
      f', {total_gf:.1f} GFLOP, {total_s * 1e3:.0f} ms alone, '
      f'{total_gf / max(total_s, 1e-9):.0f} GFLOP/s'
  )
  for c in convs[: args.top]:
    dn = '_'.join(c['dimension_numbers'][:2]) + '->' + c['dimension_numbers'][2]
    op = re.sub(r'jit\(\w+\)/', '', c['op_name'])[-80:]
    print(
        f'{c["seconds"] * c["count"] * 1e3:8.1f} ms x{c["count"]:<3d}'
        f'{c["gflop"] / c["seconds"]:6.0f} GF/s {c["gflop"]:7.2f} GF  '
        f'{dn} {list(c["lhs"])}*{list(c["rhs"])} {c["window"]}  {op}'
    )
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(convs, f, indent=1)
    print(f'wrote {args.json}')


if __name__ == '__main__':
  vs_reference.use_huge_pages()  # as run.py does (restarts once)
  main()
