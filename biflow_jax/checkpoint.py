"""Workdir checkpoints: Orbax items for params, EMA params, optimizer state and metadata.

This module knows Orbax and config.json, not models or optimizers: what a tree holds
is the business of the objective that trained it (biflow_jax.runs reads workdirs).

Layout of a workdir: config.json (the run's config) and checkpoints/<step>/ with the
items `params`, `ema_params`, `opt_state` and `meta` (step, data position). Orbax writes
each step to a temporary directory and renames it when complete, so a run killed while
saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
ITEMS = ("params", "ema_params", "opt_state", "meta")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(config.to_json(indent=2))
        os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"no such workdir: {workdir!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"workdir {workdir!r} has no {CONFIG_FILE}: it is not a biflow_jax run")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def section_differences(saved: Any, current: Any, prefix: str) -> list[str]:
    """'key: saved -> current' for every differing leaf of two config sections."""
    saved, current = dict(saved), dict(current)
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, (dict, ml_collections.ConfigDict)) and isinstance(b, (dict, ml_collections.ConfigDict)):
            diffs += section_differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, (list, tuple)) and list(a) == list(b)):
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def manager(workdir: str, keep: int = 2, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 item_names=ITEMS, options=options)


def save(mngr: ocp.CheckpointManager, step: int, params: Any, ema_params: Any, opt_state: Any,
         data_position: int) -> None:
    meta = {"step": int(step), "data_position": int(data_position)}
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), ema_params=ocp.args.StandardSave(ema_params),
        opt_state=ocp.args.StandardSave(opt_state), meta=ocp.args.JsonSave(meta)))


def restore(mngr: ocp.CheckpointManager, step: int, params: Any, ema_params: Any, opt_state: Any):
    """Restore into the structure, shapes and shardings of the given (abstract) trees."""
    abstract = lambda tree: jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
    out = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract(params)),
        ema_params=ocp.args.StandardRestore(abstract(ema_params)),
        opt_state=ocp.args.StandardRestore(abstract(opt_state)),
        meta=ocp.args.JsonRestore()))
    return out.params, out.ema_params, out.opt_state, out.meta


def restore_item(mngr: ocp.CheckpointManager, step: int, item: str) -> Any:
    """One saved tree, without a target: in its saved shardings where this run has those devices,
    else replicated over this run's devices (a run saved on another device count or processes)."""
    everywhere = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices(), ("data",)), jax.sharding.PartitionSpec())
    args = ocp.args.Composite(**{item: ocp.args.StandardRestore(fallback_sharding=everywhere)})
    return mngr.restore(step, args=args)[item]


def check_tree(expected: Any, got: Any, what: str) -> None:
    """Raise ValueError naming the first missing, extra or wrongly shaped leaf."""
    flat_e = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    flat_g = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(got)}
    for key in flat_e:
        if key not in flat_g:
            raise ValueError(f"{what}: missing parameter {key}")
        if tuple(flat_e[key].shape) != tuple(flat_g[key].shape):
            raise ValueError(f"{what}: parameter {key} has shape {tuple(flat_g[key].shape)}, "
                             f"the config expects {tuple(flat_e[key].shape)}")
    for key in flat_g:
        if key not in flat_e:
            raise ValueError(f"{what}: unexpected parameter {key}")
