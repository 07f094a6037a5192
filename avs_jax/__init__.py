"""avs_jax: Audio-Visual Segmentation (Zhou et al., ECCV 2022) in JAX/Flax."""
