"""A workdir as a typed run: which stage it trained, its config, its models and EMA params.

Three kinds of directory are accepted everywhere a mode takes --workdir:
- a stage-1 run (the forward flow; objective 'flow' or 'rrepa'),
- a stage-2 run (BiFlow's G; it names the stage-1 run it inverts in stage.json),
- a two-stage job directory holding `forward/` and `reverse/` (the README's main job).
Workdirs written before stage.json existed (the first release) are read too: their
config.json is upgraded in memory to today's sections, never rewritten on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections

from biflow_jax import checkpoint, objectives, workdir_lock
from biflow_jax.architecture import FLOW_OPTION_DEFAULTS
from biflow_jax.console import is_main_process
from biflow_jax.models import registry
from biflow_jax.models.reverse import ReverseViT
from biflow_jax.models.tarflow import TARFlow
from biflow_jax.objectives import biflow as biflow_objective

STAGE_FILE = "stage.json"
FORWARD_DIR, REVERSE_DIR = "forward", "reverse"


@dataclasses.dataclass(frozen=True)
class FlowRun:
    """A finished (or checkpointed) stage-1 run: the forward flow and its EMA (or raw) params."""

    workdir: str
    config: ml_collections.ConfigDict
    model: TARFlow
    params: Any
    step: int


@dataclasses.dataclass(frozen=True)
class ReverseRun:
    """A stage-2 run: G, its params, and the stage-1 run it inverts."""

    workdir: str
    config: ml_collections.ConfigDict
    model: ReverseViT
    params: Any
    step: int
    flow: FlowRun


def is_run(workdir: str) -> bool:
    return os.path.isfile(os.path.join(workdir, checkpoint.CONFIG_FILE))


def read_stage(workdir: str) -> dict[str, Any]:
    """WORKDIR/stage.json, or what a first-release workdir's config says about it."""
    path = os.path.join(workdir, STAGE_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    raw = checkpoint.read_config(workdir)
    if "reverse_train" in raw and raw.get("stage") == "biflow":
        return {"stage": "biflow", "objective": "biflow", "flow_workdir": raw.get("forward_workdir", "")}
    align = raw.get("align", None)
    return {"stage": "flow", "objective": "rrepa" if align is not None and align.get("enabled") else "flow"}


def write_stage_file(workdir: str, stage: str, objective: str, flow_workdir: str | None = None) -> None:
    """WORKDIR/stage.json: the stage and objective trained here, and (stage 2) the flow's workdir,
    relative to this one when it lies in the same job directory so a moved job dir keeps working."""
    if not is_main_process():
        return
    record: dict[str, Any] = {"stage": stage, "objective": objective}
    if flow_workdir is not None:
        here, there = os.path.abspath(workdir), os.path.abspath(flow_workdir)
        shared = os.path.commonpath([os.path.dirname(here), there]) == os.path.dirname(here)
        record["flow_workdir"] = os.path.relpath(there, here) if shared else there
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, STAGE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(workdir, STAGE_FILE))


def stage_dir(workdir: str, stage: str) -> str:
    """The directory of `stage` ('flow' or 'biflow') that WORKDIR denotes: itself or a part of a job dir."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"no such workdir: {workdir!r}")
    part = os.path.join(workdir, FORWARD_DIR if stage == "flow" else REVERSE_DIR)
    if os.path.isdir(part) and is_run(part):
        return part
    if is_run(workdir):
        here = read_stage(workdir)["stage"]
        if here == stage:
            return workdir
        if stage == "flow" and here == "biflow":  # a stage-2 dir leads to its flow
            return flow_workdir_of(workdir)
        raise FileNotFoundError(f"workdir {workdir!r} is a stage-1 (forward flow) run, not a stage-2 (BiFlow) run; "
                                "train stage 2 with --config.stage=biflow --config.biflow.flow_init=" + workdir)
    raise FileNotFoundError(f"workdir {workdir!r} holds no run: no {checkpoint.CONFIG_FILE}, and no "
                            f"{FORWARD_DIR}/ or {REVERSE_DIR}/ run inside")


def flow_workdir_of(reverse_workdir: str) -> str:
    """The stage-1 workdir a stage-2 run inverts (stored relative to it when in the same job dir)."""
    ref = read_stage(reverse_workdir).get("flow_workdir") or ""
    if not ref:
        sibling = os.path.join(os.path.dirname(os.path.abspath(reverse_workdir)), FORWARD_DIR)
        if is_run(sibling):
            return sibling
        raise FileNotFoundError(f"stage-2 workdir {reverse_workdir!r} does not name its stage-1 flow")
    path = ref if os.path.isabs(ref) else os.path.normpath(os.path.join(reverse_workdir, ref))
    sibling = os.path.join(os.path.dirname(os.path.abspath(reverse_workdir)), FORWARD_DIR)
    in_a_job = os.path.basename(os.path.abspath(reverse_workdir)) == REVERSE_DIR
    if os.path.isabs(ref) and in_a_job and os.path.basename(ref) == FORWARD_DIR and is_run(sibling):
        return sibling  # a copied or moved job dir whose stage 2 names the old job's forward/ absolutely
    if not os.path.isdir(path):
        raise FileNotFoundError(f"stage-2 workdir {reverse_workdir!r} inverts the flow in {path!r}, "
                                "which does not exist (moved or deleted?)")
    return path


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """A run's config.json in today's sections (first-release configs are upgraded in memory)."""
    return upgrade_config(checkpoint.read_config(workdir))


def upgrade_config(saved: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """First-release layout (top-level `reverse`, `reverse_train`, `forward_workdir`) -> `biflow` section;
    flow-model keys added since the run was saved get their defaults (the model it was trained as)."""
    if "model" in saved and any(key not in saved.model for key in FLOW_OPTION_DEFAULTS):
        raw = saved.to_dict()
        raw["model"] = {**FLOW_OPTION_DEFAULTS, **raw["model"]}
        saved = ml_collections.ConfigDict(raw)
    if "reverse_train" not in saved:
        return saved
    raw = saved.to_dict()
    reverse, rt = raw.pop("reverse"), raw.pop("reverse_train")
    forward_workdir = raw.pop("forward_workdir", "")
    stage = raw.get("stage", "both")
    model = {k: reverse[k] for k in ("depth", "width", "heads", "mlp_ratio", "guidance_conditioning",
                                     "stage_bottleneck", "dtype") if k in reverse}
    model["variant"] = reverse.get("size", "tiny")
    model["layers_per_stage"] = list(reverse.get("layers_per_stage") or [])
    train = dict(raw["train"])
    steps = int(rt["steps"])
    train.update(steps=steps, eval_every=min(train["eval_every"], steps))
    optim = dict(raw["optim"])
    optim.update(lr=rt["lr"], warmup_steps=min(optim["warmup_steps"], steps // 10))
    raw["biflow"] = dict(
        flow_init=forward_workdir, model=model, objective=rt["objective"], adaptive=rt["adaptive"],
        adaptive_p=rt["adaptive_p"], adaptive_c=rt["adaptive_c"], cfg_training=rt["cfg_training"],
        w_min=rt["w_min"], w_max=rt["w_max"], guidance=rt["guidance"], label_drop=raw["train"]["label_drop"],
        train={k: v for k, v in train.items() if k not in ("noise", "noise_std", "label_drop")}, optim=optim,
        evals={})
    raw["stage"] = "biflow" if stage == "biflow" else stage
    return ml_collections.ConfigDict(raw)


def load_flow(workdir: str, ema: bool = True) -> FlowRun:
    """The forward flow of a stage-1 run (or of the stage-1 part of a job or stage-2 dir)."""
    workdir = stage_dir(workdir, "flow")
    config = read_config(workdir)
    model = registry.build_flow(config.model)
    step, restored = restore_latest(workdir, ema)
    objective = read_stage(workdir)["objective"]
    flow = objectives.flow_params_of(objective, restored)
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), *registry.flow_example_inputs(config.model)))
    checkpoint.check_tree(expected, flow, f"checkpoint {workdir!r} step {step}")
    return FlowRun(workdir, config, model, flow, step)


def load_reverse(workdir: str, ema: bool = True) -> ReverseRun:
    """BiFlow's G of a stage-2 run (or of the stage-2 part of a job dir), with its flow."""
    workdir = stage_dir(workdir, "biflow")
    config = read_config(workdir)
    flow = load_flow(flow_workdir_of(workdir))
    reverse = biflow_objective.build_reverse(config, flow.model)
    step, params = restore_latest(workdir, ema)
    expected = jax.eval_shape(lambda: biflow_objective.init_reverse(reverse, flow.model, jax.random.key(0)))
    checkpoint.check_tree(expected, params, f"checkpoint {workdir!r} step {step}")
    return ReverseRun(workdir, config, reverse, params, step, flow)


def restore_latest(workdir: str, ema: bool) -> tuple[int, Any]:
    """The newest readable step's (EMA) params: a damaged newer step is named in a warning and skipped, and
    a workdir whose every step is damaged raises CheckpointError ('damaged', never 'missing')."""
    mngr = checkpoint.manager(workdir, async_save=False)
    item = "ema_params" if ema else "params"
    try:
        return checkpoint.restore_newest_readable(mngr, lambda step: checkpoint.restore_item(mngr, step, item),
                                                  f"workdir {workdir!r}")
    finally:
        mngr.close()


def save_flow(workdir: str, config: ml_collections.ConfigDict, params: Any) -> None:
    """A fresh stage-1 run at step 0 holding `params` (e.g. imported from PyTorch).

    The optimizer state is the config's freshly initialised one, so training can go on.
    """
    from biflow_jax import optim

    if os.path.exists(os.path.join(workdir, "checkpoints")):
        raise FileExistsError(f"workdir {workdir!r} already has checkpoints; use an empty workdir")
    opt_state = optim.make_optimizer(config.optim, config.train.steps).init(params)
    with workdir_lock.hold(workdir):
        checkpoint.write_config(workdir, config)
        write_stage_file(workdir, "flow", "flow")
        mngr = checkpoint.manager(workdir, async_save=False)
        checkpoint.save(mngr, 0, params, params, opt_state, 0)
        mngr.wait_until_finished()
        checkpoint.write_checksums(mngr, 0)
        mngr.close()
