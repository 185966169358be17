"""biflow_jax: Bidirectional Normalizing Flows in JAX/Flax."""
