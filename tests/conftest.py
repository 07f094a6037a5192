import os

# Tests run on the CPU in float32; keep TensorFlow off any accelerator.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from avs_jax.xla_flags import set_xla_flags  # noqa: E402

set_xla_flags()  # the flags run.py uses
