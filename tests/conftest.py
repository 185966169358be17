"""Shared test set-up: quiet TensorFlow, and exact float32 matmuls on CPU."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
