"""Model variants as strings: config sections name a model, this module builds it.

Configs are data (big_vision style): they never import model code. `model.name` picks
the forward flow's class and `biflow.model.variant` a size preset of BiFlow's reverse
model G; any field a config sets explicitly overrides the preset. G's class table is
always the flow's: G inverts that flow and nothing else (BiFlow, arXiv:2512.10953).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from biflow_jax import architecture
from biflow_jax.errors import ConfigError
from biflow_jax.models import tarflow
from biflow_jax.models.reverse import PRESETS, ReverseViT
from biflow_jax.models.tarflow import TARFlow

FLOWS = ("tarflow",)
REVERSE_VARIANTS = tuple(PRESETS)


def dtype(name: str, key: str) -> Any:
    """The jnp dtype a config names (`architecture.DTYPES`); ConfigError naming `key` otherwise."""
    try:
        return getattr(jnp, architecture.check_dtype(name, key))
    except ValueError as err:
        raise ConfigError(str(err)) from err


def build_flow(cfg: Any) -> TARFlow:
    """The forward flow described by a `model` config section."""
    name = cfg.get("name", "tarflow")
    if name not in FLOWS:
        raise ConfigError(f"model.name={name!r} is not a known flow; choose from {FLOWS}")
    try:
        return tarflow.build_flow(cfg)
    except ValueError as err:  # an unusable option value: a config error, named by its key
        raise ConfigError(str(err)) from err


def reverse_fields(cfg: Any) -> dict[str, Any]:
    """G's resolved size: the variant's preset, then every field the config sets (not None)."""
    variant = cfg.get("variant", "B/2")
    if variant not in PRESETS:
        raise ConfigError(f"biflow.model.variant={variant!r} is not a known size; choose from {REVERSE_VARIANTS}")
    fields = dict(PRESETS[variant])
    for key in fields:
        if cfg.get(key, None) is not None:
            fields[key] = cfg[key]
    return fields


def build_reverse(cfg: Any, flow: TARFlow) -> ReverseViT:
    """G for a `biflow.model` config section and the flow it inverts (tokens, blocks, classes)."""
    fields = reverse_fields(cfg)
    layers = cfg.get("layers_per_stage", None)
    return ReverseViT(
        num_tokens=flow.num_tokens, token_dim=flow.token_dim, num_forward_blocks=flow.num_blocks,
        depth=fields["depth"], width=fields["width"], heads=fields["heads"], mlp_ratio=fields["mlp_ratio"],
        layers_per_stage=tuple(layers) if layers else None,
        num_classes=flow.num_classes,
        guidance_conditioning=cfg.get("guidance_conditioning", True),
        stage_bottleneck=cfg.get("stage_bottleneck", False),
        dtype=dtype(cfg.get("dtype", "float32"), "biflow.model.dtype"),
    )


def flow_example_inputs(model_cfg: Any) -> tuple[Any, Any]:
    """A one-image batch (and label, for a conditional flow) to initialise or trace the flow."""
    x = jnp.zeros((1, model_cfg.img_size, model_cfg.img_size, model_cfg.in_channels), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if model_cfg.num_classes else None
    return x, y


def reverse_example_inputs(flow: TARFlow) -> tuple[Any, Any, Any]:
    """(z, labels, w) of one sample, to initialise or trace G."""
    z = jnp.zeros((1, flow.num_tokens, flow.token_dim))
    y = jnp.zeros((1,), jnp.int32) if flow.num_classes else None
    return z, y, jnp.zeros((1,))
