"""`--mode=classify`: a stage-1 flow as a classifier (R-REPA, arXiv:2511.22345, sec. 5).

Training-free top-1 (one backward pass through the class embedding) on dequantised and
clean test images, and a ridge linear probe on pooled hidden states.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from biflow_jax import latent_space, runs
from biflow_jax.console import say
from biflow_jax.evaluators import classify


def run(workdir: str, data: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    """data: where the dataset lives on this machine (overrides the run's data section if same name)."""
    flow = runs.load_flow(workdir)
    config = flow.config
    latent_space.require_pixel_space(config, "classify")
    if data is not None and data.name == config.data.name:
        config = ml_collections.ConfigDict(config.to_dict())
        config.data = data
    results = classify.evaluate(config, flow.model, flow.params)
    if flow.model.num_classes:
        say("training-free top-1 (test, one backward pass): "
            f"{results['training_free_top1_dequantized']:.4f} dequantised inputs, "
            f"{results['training_free_top1_clean']:.4f} clean inputs")
    else:
        say("training-free classification skipped: the flow is unconditional")
    probe = results["probe"]
    table = ", ".join(f"{b},{l}: {acc:.3f}" for (b, l), acc in sorted(probe.test_top1_by_location.items()))
    say(f"linear probe top-1 (test): {probe.test_top1:.4f} at block {probe.location[0]} layer "
        f"{probe.location[1]} (chosen on held-out train, ridge {probe.strength:g}); by (block,layer): {table}")
    return results
