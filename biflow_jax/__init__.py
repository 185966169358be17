"""biflow_jax: Bidirectional Normalizing Flows in JAX/Flax.

Importing it changes nothing in the process; process-wide settings (flags, the malloc setting of
`host_memory`) belong to the command-line tools in `biflow_jax.cli`.
"""
