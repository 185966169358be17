"""`python -m biflow_jax.export`, as the README writes it: the tool is biflow_jax.cli.export."""
from absl import flags

from biflow_jax.cli import export as tool

flags.adopt_module_key_flags(tool)  # --helpshort lists the tool's flags
__doc__ = tool.__doc__  # and absl's usage text is the tool's

if __name__ == "__main__":
    tool.run()
