"""`python -m biflow_jax.import_torch`, as the README writes it: the tool is biflow_jax.cli.import_torch."""
from absl import flags

from biflow_jax.cli import import_torch as tool

flags.adopt_module_key_flags(tool)  # --helpshort lists the tool's flags
__doc__ = tool.__doc__  # and absl's usage text is the tool's

if __name__ == "__main__":
    tool.run()
