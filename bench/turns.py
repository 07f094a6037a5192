"""Compile side by side, time one at a time: the turns of concurrent benches.

`bench/gpu_check.py` starts several benches at once on one GPU so that their
compiles (CPU-bound, minutes) overlap. Their timed sections must not overlap.
A bench given `--turn DIR/NAME` calls `take_turn` when its programs are
compiled and its state is on the device: it writes `DIR/NAME.ready`, waits
for `DIR/go` (written by the orchestrator once every bench is ready or
gone), then holds an exclusive lock on `DIR/lock` until the process exits.
Without `--turn` (`spec` empty) `take_turn` returns at once.
"""

import fcntl
import os
import time

GO = 'go'
LOCK = 'lock'


def ready_path(spec):
  return spec + '.ready'


def take_turn(spec, poll_s=0.2, timeout_s=3600.0):
  """Marks `spec` ready, waits for the go, takes the timing lock (kept)."""
  if not spec:
    return None
  folder = os.path.dirname(spec) or '.'
  with open(ready_path(spec), 'w') as f:
    f.write(str(os.getpid()))
  t0 = time.monotonic()
  while not os.path.exists(os.path.join(folder, GO)):
    if time.monotonic() - t0 > timeout_s:
      raise SystemExit(f'--turn {spec}: no {GO} file after {timeout_s:.0f} s')
    time.sleep(poll_s)
  fd = os.open(os.path.join(folder, LOCK), os.O_CREAT | os.O_RDWR)
  fcntl.flock(fd, fcntl.LOCK_EX)  # released when the process exits
  print(f'turn {os.path.basename(spec)}: timing now', flush=True)
  return fd
