"""The benches behind `python -m biflow_jax.bench <name>`: one module per bench, `timing` shared.

Each bench module has `add_arguments(parser)` and `run(args) -> dict`; nothing else in the
package imports from here.
"""
