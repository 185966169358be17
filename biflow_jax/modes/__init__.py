"""What the command-line tools do, one module each: main's modes (train, sample, eval, ...), export and
import_torch; biflow_jax.cli parses the flags and calls them."""
