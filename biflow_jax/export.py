"""`python -m biflow_jax.export`, as the README writes it: the tool is biflow_jax.cli.export."""
from biflow_jax.cli.export import run

if __name__ == "__main__":
    run()
