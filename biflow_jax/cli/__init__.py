"""The command-line tools, one module each, all on absl flags; each is a thin wrapper over library functions.

main (train / describe / compile / sample / eval / classify / editing), bench, export, import_torch,
encode_latents, ref_stats. Only these modules set process-wide state (flags, the malloc setting of
biflow_jax.host_memory); importing the library changes nothing in the process.
"""
