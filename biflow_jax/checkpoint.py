"""Workdir checkpoints: Orbax items for params, EMA params, optimizer state and metadata.

This module knows Orbax and config.json, not models or optimizers: what a tree holds
is the business of the objective that trained it (biflow_jax.runs reads workdirs).

Layout of a workdir: config.json (the run's config) and checkpoints/<step>/ with the
items `params`, `ema_params`, `opt_state` and `meta` (step, data position). Orbax writes
each step to a temporary directory and renames it when complete, so a run killed while
saving leaves the previous checkpoint intact. Each finished step also holds checksums.json
(sha256 of its files), checked before a restore: a step whose bytes changed reads as damaged.
"""

from __future__ import annotations

import hashlib
import json
import logging as std_logging
import os
import re
import sys
import threading
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from biflow_jax.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
ITEMS = ("params", "ema_params", "opt_state", "meta")
CHECKSUM_FILE = "checksums.json"  # in each step directory: sha256 of every file of its items
GLOB_CHARACTERS = "[]*?"  # Orbax finds a step's files by glob: a workdir path with these reads as damaged


def check_path(workdir: str) -> None:
    """ConfigError for a workdir whose absolute path holds glob characters, before anything is written:
    Orbax would write every checkpoint there and then fail to find them on restore."""
    path = os.path.abspath(workdir)
    found = sorted({c for c in path if c in GLOB_CHARACTERS})
    if found:
        raise ConfigError(f"workdir {path!r} contains {' '.join(found)}: checkpoints there could not be read back "
                          f"(Orbax treats {GLOB_CHARACTERS} in paths as patterns); use a path without them")


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


def manager(workdir: str, keep: int | None = 2, async_save: bool = True) -> ocp.CheckpointManager:
    """keep=None: Orbax deletes nothing (the training loop prunes once a newer step is verified)."""
    check_path(workdir)
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


def save_and_wait(mngr: ocp.CheckpointManager, step: int, params: Any, ema_params: Any, opt_state: Any,
                  data_position: int, last_good: int | None) -> None:
    """`save`, finished before returning: a failed save (e.g. a full disk) stops the run at that step with
    CheckpointError naming the cause and `last_good`, the newest intact step (Orbax writes asynchronously
    and would report it only at the next save)."""
    quiet_background_errors()
    try:
        save(mngr, step, params, ema_params, opt_state, data_position)
        mngr.wait_until_finished()
        write_checksums(mngr, step)
    except Exception as err:  # noqa: BLE001  Orbax re-raises the writer thread's error, whatever it was
        good = "no earlier checkpoint" if last_good is None else f"the last good checkpoint is step {last_good}"
        raise CheckpointError(f"saving checkpoint step {step} in {mngr.directory} failed ({reason(err)}); "
                              f"stopping ({good})") from None


def step_files(mngr: ocp.CheckpointManager, step: int, items: tuple[str, ...] = ITEMS) -> dict[str, str]:
    """{path relative to the step directory: absolute path} of every file of `items` in a saved step."""
    root = os.path.join(str(mngr.directory), str(step))
    files = {}
    for item in items:
        for folder, _, names in os.walk(os.path.join(root, item)):
            for name in names:
                path = os.path.join(folder, name)
                files[os.path.relpath(path, root)] = path
    return files


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(mngr: ocp.CheckpointManager, step: int) -> None:
    """STEP/checksums.json for a finished save: Orbax and TensorStore check no data bytes on restore, so a
    flipped bit would load as a changed weight. Process 0 writes it, once every process's files are in."""
    if jax.process_index() != 0:
        return
    sums = {rel: digest(path) for rel, path in sorted(step_files(mngr, step).items())}
    target = os.path.join(str(mngr.directory), str(step), CHECKSUM_FILE)
    with open(target + ".tmp", "w") as f:
        json.dump(sums, f, indent=0)
    os.replace(target + ".tmp", target)


def verify_checksums(mngr: ocp.CheckpointManager, step: int, items: tuple[str, ...] = ITEMS) -> None:
    """CheckpointError naming the first file of `items` whose bytes differ from (or lack) what the save
    recorded; a step saved before checksums existed (no file) passes."""
    target = os.path.join(str(mngr.directory), str(step), CHECKSUM_FILE)
    if not os.path.exists(target):
        return
    try:
        with open(target) as f:
            sums = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{target} cannot be read ({reason(err)})") from None
    if not isinstance(sums, dict):
        raise CheckpointError(f"{target} is not a checksum table")
    files = step_files(mngr, step, items)
    expected = {rel for rel in sums if rel.split(os.sep)[0] in items}
    for rel in sorted(expected - set(files)):
        raise CheckpointError(f"{os.path.join(os.path.dirname(target), rel)} is missing")
    for rel in sorted(expected):
        if digest(files[rel]) != sums[rel]:
            raise CheckpointError(f"{files[rel]} differs from the checksum recorded when it was saved")


def restore(mngr: ocp.CheckpointManager, step: int, params: Any, ema_params: Any, opt_state: Any):
    """Restore into the structure, shapes and shardings of the given (abstract) trees, after checking
    the step's bytes against its checksums."""
    verify_checksums(mngr, step)
    abstract = lambda tree: jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
    out = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract(params)),
        ema_params=ocp.args.StandardRestore(abstract(ema_params)),
        opt_state=ocp.args.StandardRestore(abstract(opt_state)),
        meta=ocp.args.JsonRestore()))
    return out.params, out.ema_params, out.opt_state, out.meta


def reason(err: BaseException) -> str:
    """The most specific message of an exception chain, on one line (Orbax wraps TensorStore's, which
    names the file; the outer ones print whole TensorStore specs)."""
    messages, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.strerror:
            messages.append(f"{err.strerror}" + (f": {err.filename}" if err.filename else ""))
        elif str(err).strip():
            messages.append(str(err).strip())
        err = err.__cause__ or err.__context__
    text = " ".join(messages[-1].split()) if messages else "unknown error"
    text = re.sub(r" ?\[tensorstore_spec='.*?'\]", "", text)
    os_error = re.search(r":\s*([^:\[\]]+?) \[os_error_code='?\d+'?\]", text)  # TensorStore's OS errors
    if os_error:
        text = f"{os_error.group(1)}: {text[:text.index(os_error.group(0))]}"
    return text if len(text) <= 400 else text[:400] + "..."


MISFIT_MESSAGES = ("do not match", "mismatch", "does not match")  # Orbax's words for a tree/shape misfit


def restore_newest_readable(mngr: ocp.CheckpointManager, read: Callable[[int], Any], where: str,
                            on_damaged: str = "fallback", then: str = "") -> tuple[int, Any]:
    """(step, read(step)) for the newest step that reads, newest first. A step that fails is named in one
    warning line with its cause and the next older step is tried; on_damaged='stop' raises CheckpointError
    instead. FileNotFoundError when there is no checkpoint at all."""
    quiet_background_errors()
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{where} has no checkpoint yet")
    damaged = []
    for i, step in enumerate(steps):
        try:
            return step, read(step)
        except Exception as err:  # noqa: BLE001  a damaged step raises whatever Orbax/TensorStore/json raise
            why = reason(err)
            if "sync_global_devices" in why:  # processes out of step (a barrier), not a damaged step
                raise
            if any(m in why.lower() for m in MISFIT_MESSAGES):  # intact, but not this config's trees
                raise CheckpointError(f"checkpoint step {step} of {where} does not fit this run's config "
                                      f"({why})") from None
            damaged.append(step)
            if on_damaged == "stop":
                raise CheckpointError(f"checkpoint step {step} of {where} is damaged ({why}); delete "
                                      f"{os.path.join(mngr.directory, str(step))} or set on_damaged_checkpoint="
                                      "'fallback' to use an older step") from None
            if i + 1 < len(steps):
                logging.warning("checkpoint step %d of %s is damaged (%s); falling back to step %d%s", step, where,
                                why, steps[i + 1], then)
    raise CheckpointError(f"every checkpoint of {where} is damaged (steps {damaged}); newest: step {steps[0]}")


_quieted = False


def quiet_background_errors() -> None:
    """Orbax's writer and reader threads print every failure of a save or restore as tracebacks (its
    error log, and 'Event loop is closed' from callbacks that outlive the failed operation) before the
    caller sees it; this module reports those failures itself, in one line, so drop exactly those."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    unraisable, thread_hook, except_hook = sys.unraisablehook, threading.excepthook, sys.excepthook

    def orphaned(exc: BaseException | None, obj: Any = None) -> bool:  # also called at interpreter exit
        code = getattr(obj, "cr_code", None)  # an Orbax coroutine garbage-collected after the failure
        text = f"{exc} {getattr(code, 'co_filename', '')}"
        return "Event loop is closed" in text or "orbax" in text or "reading array index" in text

    sys.unraisablehook = lambda u: None if orphaned(u.exc_value, u.object) else unraisable(u)
    threading.excepthook = lambda a: None if orphaned(a.exc_value) else thread_hook(a)
    sys.excepthook = lambda t, v, tb: None if orphaned(v) else except_hook(t, v, tb)
    std_logging.getLogger("asyncio").addFilter(  # 'Task exception was never retrieved' of Orbax's other writes
        lambda r: not ("never retrieved" in r.getMessage() and ("orbax" in r.getMessage()
                                                                or "OCDBT" in r.getMessage())))
    logging.get_absl_logger().addFilter(  # Orbax's error log of a failed background save or read
        lambda r: not (f"{os.sep}orbax{os.sep}" in r.pathname and r.levelno >= logging.converter.STANDARD_ERROR))


def prune(mngr: ocp.CheckpointManager, keep: int | None, unverified: int | None = None) -> None:
    """Keep the newest `keep` steps besides `unverified` (None or 0: keep all): a step saved but not yet
    shown to give a finite loss never counts, so it cannot push out the newest good one."""
    steps = sorted(s for s in mngr.all_steps() if s != unverified)
    for step in steps[:-keep] if keep else []:
        mngr.delete(step)


def restore_item(mngr: ocp.CheckpointManager, step: int, item: str) -> Any:
    """One saved tree, without a target: in its saved shardings where this run has those devices,
    else replicated over this run's devices (a run saved on another device count or processes)."""
    verify_checksums(mngr, step, (item,))
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
