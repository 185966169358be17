"""One place that talks to the person at the console (process 0 only), and to the log."""

from __future__ import annotations

import time

import jax
from absl import logging


def say(message: str) -> None:
    """A timestamped line on stdout from process 0; every process logs it at INFO."""
    if jax.process_index() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
    logging.info(message)


def is_main_process() -> bool:
    return jax.process_index() == 0
