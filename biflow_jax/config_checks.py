"""Config validation: fail at start, with a message that names the key, not mid-run."""

from __future__ import annotations

import jax
import ml_collections

from biflow_jax.likelihood import NOISE_TYPES


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(config: ml_collections.ConfigDict) -> None:
    m, d, t, o = config.model, config.data, config.train, config.optim
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
    require(m.dtype in ("float32", "bfloat16"), f"model.dtype={m.dtype!r} must be 'float32' or 'bfloat16'")
    require(t.noise in NOISE_TYPES, f"train.noise={t.noise!r} must be one of {NOISE_TYPES}")
    require(t.batch_size % jax.device_count() == 0,
            f"train.batch_size={t.batch_size} is not divisible by the {jax.device_count()} devices")
    require(t.eval_batch_size % jax.device_count() == 0,
            f"train.eval_batch_size={t.eval_batch_size} is not divisible by the {jax.device_count()} devices")
    require(t.steps > 0, f"train.steps={t.steps} must be positive")
    for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        require(t[key] > 0, f"train.{key}={t[key]} must be positive")
    require(0.0 <= t.ema_decay < 1.0, f"train.ema_decay={t.ema_decay} must be in [0, 1)")
    require(0.0 <= t.label_drop < 1.0, f"train.label_drop={t.label_drop} must be in [0, 1)")
    require(o.lr > 0, f"optim.lr={o.lr} must be positive")
    require(0 <= o.warmup_steps < max(t.steps, 1) or t.steps == 1,
            f"optim.warmup_steps={o.warmup_steps} must be smaller than train.steps={t.steps}")
    require(config.parallel.backend in ("jit", "pmap"),
            f"parallel.backend={config.parallel.backend!r} must be 'jit' or 'pmap'")
    require(not (config.parallel.get("fsdp", False) and config.parallel.backend == "pmap"),
            "parallel.fsdp=True needs parallel.backend='jit' (pmap keeps a full replica per device)")
