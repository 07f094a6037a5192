"""The paper's model (TPAVI; `avs_jax.models.avs`), S4/MS3 and AVSS."""
