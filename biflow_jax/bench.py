"""`python -m biflow_jax.bench`, as the README writes it: the tool is biflow_jax.cli.bench."""
from biflow_jax.cli.bench import run

if __name__ == "__main__":
    run()
