"""Config validation: fail at start, before anything is written, with a message naming the key."""

from __future__ import annotations

import math
from typing import Any

import jax

from biflow_jax import architecture
from biflow_jax.errors import ConfigError, require
from biflow_jax.likelihood import NOISE_TYPES

LOOP_KEYS = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints")


def validate_loop(train: Any, optim: Any, prefix: str) -> None:
    """The keys every training stage's own `train` / `optim` sections need (prefix: 'train' or 'biflow.train')."""
    optim_prefix = prefix.replace("train", "optim")
    require(train.batch_size % jax.device_count() == 0,
            f"{prefix}.batch_size={train.batch_size} is not divisible by the {jax.device_count()} devices")
    require(train.eval_batch_size % jax.device_count() == 0,
            f"{prefix}.eval_batch_size={train.eval_batch_size} is not divisible by the {jax.device_count()} devices")
    require(train.steps > 0, f"{prefix}.steps={train.steps} must be positive")
    for key in LOOP_KEYS:
        require(train[key] > 0, f"{prefix}.{key}={train[key]} must be positive")
    require(0.0 <= train.ema_decay < 1.0, f"{prefix}.ema_decay={train.ema_decay} must be in [0, 1)")
    require(train.batch_size > 0, f"{prefix}.batch_size={train.batch_size} must be positive")
    require(optim.lr > 0, f"{optim_prefix}.lr={optim.lr} must be positive")
    require(math.isfinite(optim.lr), f"{optim_prefix}.lr={optim.lr} must be a finite number")
    require(optim.warmup_steps >= 0, f"{optim_prefix}.warmup_steps={optim.warmup_steps} must be zero or positive")
    require(optim.warmup_steps < max(train.steps, 1) or train.steps == 1,
            f"{optim_prefix}.warmup_steps={optim.warmup_steps} must be smaller than {prefix}.steps={train.steps}")


def check_dtype(name: str, key: str) -> None:
    """A compute dtype of `architecture.DTYPES`; float64 (the parity dtype) only where JAX computes
    in it (jax_enable_x64), else it would silently run in float32."""
    try:
        architecture.check_dtype(name, key)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    require(name != "float64" or jax.config.jax_enable_x64,
            f"{key}='float64' needs jax_enable_x64 (JAX_ENABLE_X64=1); without it JAX computes in float32")


def validate_parallel(config: Any) -> None:
    """The device layout, checked once for all stages (`modes.train.validate`); the step builder only routes."""
    require(config.parallel.backend in ("jit", "pmap"),
            f"parallel.backend={config.parallel.backend!r} must be 'jit' or 'pmap'")
    require(not (config.parallel.get("fsdp", False) and config.parallel.backend == "pmap"),
            "parallel.fsdp=True needs parallel.backend='jit' (pmap keeps a full replica per device)")


def validate_flow_stage(config: Any) -> None:
    """Stage 1: the flow's shape against the data, and stage 1's loop."""
    m, d, t = config.model, config.data, config.train
    require(m.patch_size > 0 and m.img_size % m.patch_size == 0,
            f"model.img_size={m.img_size} is not divisible by model.patch_size={m.patch_size}")
    require(d.image_size == m.img_size,
            f"data.image_size={d.image_size} differs from model.img_size={m.img_size}")
    require(d.channels == m.in_channels,
            f"data.channels={d.channels} differs from model.in_channels={m.in_channels}")
    require(m.channels % m.head_dim == 0,
            f"model.channels={m.channels} is not a multiple of model.head_dim={m.head_dim}")
    require(m.num_classes in (0, d.num_classes),
            f"model.num_classes={m.num_classes} must be 0 (unconditional) or data.num_classes={d.num_classes}")
    check_dtype(m.dtype, "model.dtype")
    require(t.noise in NOISE_TYPES, f"train.noise={t.noise!r} must be one of {NOISE_TYPES}")
    require(0.0 <= t.label_drop < 1.0, f"train.label_drop={t.label_drop} must be in [0, 1)")
    validate_loop(t, config.optim, "train")
