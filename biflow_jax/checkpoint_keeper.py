"""Which checkpoints a training run keeps: a saved step is good only once the loss it gives is seen finite.

The params saved at step s first meet data at step s+1, so until that loss is seen finite s is
*unverified*, and the newest verified step is kept whatever `train.keep_checkpoints` says: a NaN
at s+1 deletes s and the run stops naming the last good step. A restored step (saved by an
earlier run) is checked the same way at the first step after resuming, but never deleted here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from biflow_jax import checkpoint
from biflow_jax.errors import TrainingError

ADVICE = "Lower the learning rate or set grad_clip."


def last_good_text(verified: int | None) -> str:
    if verified is None:
        return "no checkpoint was saved"
    if verified < 0:
        return "the newest checkpoint is the last good one"
    return f"the last good checkpoint is step {verified}"


def any_nonfinite(state: Any) -> bool:
    """Whether a train state counted a non-finite loss since the start (pmap: one count per device)."""
    return bool(int(np.max(jax.device_get(state.nonfinite))))


def check_finite(state: Any, step: int, verified: int | None = -1) -> None:
    if any_nonfinite(state):
        raise TrainingError(f"the loss became NaN/inf before step {step}; stopping without saving "
                            f"({last_good_text(verified)}). {ADVICE}")


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


class CheckpointKeeper:
    """Saves, verifies and prunes one run's checkpoints in an Orbax manager (`checkpoint.manager`, keep=None).

    `restored`: the step the run resumed from (None for a fresh run); it counts as verified until
    the first step's loss says otherwise.
    """

    def __init__(self, mngr: Any, keep: int, restored: int | None):
        self.mngr, self.keep = mngr, keep
        self.verified: int | None = restored
        self.unverified: int | None = None
        self._check_restored = restored is not None

    def after_step(self, state: Any, step: int) -> None:
        """Step `step` ran: its loss is the first computed with the params saved (or restored) at step-1.

        Finite: the unverified step becomes the newest verified one and older steps are pruned. Not
        finite: that step is deleted (if this run saved it) and the run stops naming the good one.
        """
        if self.unverified is None and not self._check_restored:
            return
        self._check_restored = False
        if not any_nonfinite(state):
            if self.unverified is not None:
                checkpoint.prune(self.mngr, self.keep)
                self.verified, self.unverified = self.unverified, None
            return
        if self.unverified is None:  # the restored step: saved by an earlier run, not deleted here
            raise TrainingError(f"checkpoint step {step - 1} gives a non-finite loss at step {step} (the run "
                                "that saved it diverged); delete that step to resume from an older one")
        self.mngr.delete(self.unverified)
        raise TrainingError(f"the loss became NaN/inf at step {step}: the params saved at step {self.unverified} "
                            f"diverged, so that checkpoint is deleted ({last_good_text(self.verified)}). {ADVICE}")

    def save(self, step: int, state: Any, global_arrays: Callable[[Any], Any]) -> None:
        """Save `state` (as `global_arrays(state)`, whatever the backend) as step `step`, unverified;
        a non-finite loss or non-finite params stop the run instead."""
        check_finite(state, step, self.verified)
        saved = global_arrays(state)
        if not all_finite((saved.params, saved.ema_params)):
            raise TrainingError(f"the params became NaN/inf at step {step}; stopping without saving "
                                f"({last_good_text(self.verified)}). {ADVICE}")
        checkpoint.save_and_wait(self.mngr, step, saved.params, saved.ema_params, saved.opt_state,
                                 data_position=step, last_good=self.verified)
        self.unverified = step
        checkpoint.prune(self.mngr, self.keep, unverified=step)

    @property
    def waiting(self) -> bool:
        """True while the newest save's loss has not been seen (the final save, at the end of the loop)."""
        return self.unverified is not None
