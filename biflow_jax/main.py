"""`python -m biflow_jax.main`, the README's command: the tool is biflow_jax.cli.main."""
from biflow_jax.cli.main import run

if __name__ == "__main__":
    run()
