"""Flax models: the AVS model (ResNet-50 / PVT-v2 encoders, ASPP, TPAVI, decoder) and VGGish."""

from avs_jax.models.avs import AVSModel, build_model


def build_vggish(*args, **kwargs):
  """The VGGish audio network; see `avs_jax.models.vggish.build_vggish`."""
  from avs_jax.models.vggish import build_vggish as _build  # pylint: disable=g-import-not-at-top

  return _build(*args, **kwargs)
