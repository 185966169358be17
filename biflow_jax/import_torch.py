"""`python -m biflow_jax.import_torch`, as the README writes it: the tool is biflow_jax.cli.import_torch."""
from biflow_jax.cli.import_torch import run

if __name__ == "__main__":
    run()
