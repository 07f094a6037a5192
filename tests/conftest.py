import atexit
import os
import shutil
import tempfile

# Tests run on the CPU in float32; keep TensorFlow off any accelerator.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ["JAX_PLATFORMS"] != "cpu":
  # On NVIDIA GPUs XLA's default float32 precision is TF32 (measured on an
  # H200: 3e-4 relative per matmul or conv); the golden tolerances are
  # float32's. On the H200 the golden model/VGGish/loss/metric tests: 77 of
  # 77 pass with this, 5 of 9 fail without (docs/PERFORMANCE.md).
  os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# One persistent compilation cache for the whole session and the run.py
# subprocesses it starts (they inherit the environment): many tests compile
# the same model; the cache is keyed by the program and the XLA flags.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="avs_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

from avs_jax.xla_flags import set_xla_flags  # noqa: E402

set_xla_flags()  # the flags run.py uses
