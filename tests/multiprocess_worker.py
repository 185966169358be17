"""Subprocess side of tests/test_parallel.py: runs that need several processes or simulated devices.

XLA_FLAGS=--xla_force_host_platform_device_count=N must be set before jax is imported, so
each run is its own process; process 0 prints the result as one JSON line after RESULT.

  train PORT PROCESS_ID ROOT   one of 2 processes (2 devices each), connected by gloo: one run
                               in ROOT/run through modes.train.train_and_evaluate, trained in turns
                               by every mode (SEGMENTS), each resuming the previous one's checkpoint
  reference ROOT               1 process, 4 devices: the same 4 steps from the same global
                               batches; every checkpoint of ROOT/run restored, replicated and
                               fsdp-sharded, and compared with the step it holds
  backends                     1 process, 8 devices: 4 steps per mode from the same batches,
                               and the per-device bytes of replicated vs fsdp-sharded state
  folder PORT PROCESS_ID ROOT  one of 2 processes (1 device each), connected by gloo: the image
                               folder ROOT/images trained and evaluated in ROOT/run through
                               modes.train.train_and_evaluate (tests/data/test_folder_data.py);
                               every process prints its own result, with the files of its shards
"""

import json
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for configs/

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # as in tests/conftest.py


from helpers.configs import tiny_config  # noqa: E402

from biflow_jax import checkpoint, optim, sharding, trainer  # noqa: E402
from biflow_jax.data import image_folder, input_pipeline  # noqa: E402
from biflow_jax.modes import train  # noqa: E402
from biflow_jax.objectives import flow  # noqa: E402

RESULT = "RESULT "  # prefix of the stdout line that carries the JSON result (gloo and the loop print too)
MODES = {"jit": ("jit", False), "pmap": ("pmap", False), "fsdp": ("jit", True)}
SEGMENTS = (("jit", 2), ("pmap", 3), ("fsdp", 4))  # (mode, the step it trains to), in turn, in one workdir
STEPS = SEGMENTS[-1][1]
PROCESSES = 2


def segment_config(mode: str, steps: int = STEPS, batch_size: int = 16):
    """digits:quick with a 2-block, 1-layer, 32-wide flow (fast to compile), saving every step.

    The learning rate is constant after a 1-step warmup, so a run's length does not change the
    steps it takes: a run to step 2 resumed to step 4 equals a run to step 4. It is small (3e-4)
    because Adam turns float noise in exactly-zero gradients (the attention's key bias) into
    steps of up to lr/10, the only differences between runs that differ in summation order.
    """
    config = tiny_config("flow")
    config.train.update(batch_size=batch_size, eval_batch_size=64, steps=steps, log_every=1, eval_every=steps,
                        checkpoint_every=1, keep_checkpoints=STEPS)
    config.evals.bpd.every = steps
    config.optim.update(lr=3e-4, warmup_steps=1, end_lr=3e-4)
    config.parallel.backend, config.parallel.fsdp = MODES[mode]
    return config


def process_shard_batches(config, num_processes: int, steps: int) -> list[dict]:
    """The global batches of a run with `num_processes` processes, built in one process.

    Each process of such a run reads its own shard of the split (tfds.split_for_jax_process)
    and the global batch is the concatenation of the local ones in process order.
    """
    per_process = []
    for p in range(num_processes):
        with mock.patch.object(jax, "process_index", lambda *a, p=p: p), \
                mock.patch.object(jax, "process_count", lambda *a: num_processes):
            it = input_pipeline.train_batches(config.data, config.train.batch_size, config.train.seed)
        per_process.append([next(it) for _ in range(steps)])
    return [{k: np.concatenate([b[s][k] for b in per_process]) for k in per_process[0][s]} for s in range(steps)]


def train_steps(config, mesh, batches, state):
    """One step per batch through make_train_step; (losses, the state after each step on the host)."""
    objective = flow.make(config)
    step = trainer.make_train_step(objective.loss, make_optimizer(config), config.train, config.parallel, mesh)
    state = step.to_backend(state)
    losses, states = [], []
    for batch in batches:
        state, metrics = step(state, step.put_batch(batch))
        losses.append(float(metrics["loss"]))
        states.append(jax.device_get(step.from_backend(state)))
    return losses, states


def initial_state(config, mesh):
    objective = flow.make(config)
    return trainer.init_state(objective, make_optimizer(config), config.train.seed, config.parallel, mesh)


def restored_state(workdir, config, mesh, step=None):
    """A checkpoint of the workdir (the latest by default) restored into the shardings `config`
    asks for on `mesh`, through trainer.abstract_state (what the training loop does)."""
    objective = flow.make(config)
    target = trainer.abstract_state(objective, make_optimizer(config), config.train.seed, config.parallel, mesh)
    mngr = checkpoint.manager(workdir, async_save=False)
    params, ema, opt_state, meta = checkpoint.restore(mngr, step or mngr.latest_step(), target.params,
                                                      target.ema_params, target.opt_state)
    mngr.close()
    return trainer.TrainState(np.int32(meta["step"]), params, opt_state, ema, np.int32(0))


def make_optimizer(config):
    return optim.make_optimizer(config.optim, config.train.steps)


def trainable(state) -> dict:
    return {"params": state.params, "ema_params": state.ema_params, "opt_state": state.opt_state}


def max_diff(a, b) -> float:
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in pairs)


def shardings_summary(tree) -> list[str]:
    return sorted({str(x.sharding.spec) for x in jax.tree_util.tree_leaves(tree)})


def run_train_process(port: str, process_id: str, root: str) -> dict:
    from biflow_jax import distributed

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    distributed.initialize("on", coordinator_address=f"localhost:{port}", num_processes=PROCESSES,
                           process_id=int(process_id))
    assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (PROCESSES, 2, 4), jax.devices()
    return {mode: train.train_and_evaluate(segment_config(mode, steps), os.path.join(root, "run"))["flow"]
            for mode, steps in SEGMENTS}


def run_reference(root: str) -> dict:
    assert jax.device_count() == 4, jax.devices()
    mesh = sharding.make_mesh()
    config = segment_config("jit")
    batches = process_shard_batches(config, PROCESSES, STEPS)
    losses, states = train_steps(config, mesh, batches, initial_state(config, mesh))
    after = {s: trainable(states[s - 1]) for _, s in SEGMENTS}  # the reference state after step s
    np.savez(os.path.join(root, "reference.npz"),
             **{f"{s}_{i}": x for s, tree in after.items() for i, x in enumerate(jax.tree_util.tree_leaves(tree))})
    out = {"losses": losses, "restored": {}}
    for mode, s in SEGMENTS:  # the checkpoint each mode saved, multi-process, restored in both layouts here
        for layout in ("jit", "fsdp"):
            state = restored_state(os.path.join(root, "run"), segment_config(layout), mesh, step=s)
            out["restored"][f"{mode}@{s}->{layout}"] = {
                "step": int(state.step), "max_diff": max_diff(trainable(state), after[s]),
                "specs": shardings_summary(state.params)}
    out["param_scale"] = max(float(np.max(np.abs(x))) for x in jax.tree_util.tree_leaves(after[STEPS]["params"]))
    out["moved"] = max_diff(after[STEPS]["params"], after[SEGMENTS[0][1]]["params"])  # by the steps compared
    return out


def bytes_on_first_device(tree) -> int:
    """Bytes of `tree` held by the first device: replicated leaves count whole, sharded leaves one shard."""
    first = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree_util.tree_leaves(tree) for s in x.addressable_shards
               if s.device == first)


def run_backends() -> dict:
    assert jax.device_count() == 8, jax.devices()
    mesh = sharding.make_mesh()
    config = segment_config("jit", batch_size=32)
    it = input_pipeline.train_batches(config.data, config.train.batch_size, config.train.seed)
    batches = [next(it) for _ in range(STEPS)]
    initial = jax.device_get(initial_state(config, mesh))  # on the host: each mode places (and donates) its own
    out = {"losses": {}, "max_diff_vs_jit": {}, "param_bytes": {}}
    final = {}
    for mode in MODES:
        config = segment_config(mode, batch_size=32)
        state = jax.device_put(initial, trainer.state_shardings(initial, config.parallel, mesh))
        out["param_bytes"][mode] = bytes_on_first_device(state.params)
        out["param_bytes"][f"{mode}_state"] = bytes_on_first_device(trainable(state))
        if mode == "fsdp":
            whole = [x.nbytes for x in jax.tree_util.tree_leaves(state.params) if x.sharding.is_fully_replicated]
            out["param_bytes"]["fsdp_replicated_leaves"] = sum(whole)
        out["losses"][mode], states = train_steps(config, mesh, batches, state)
        final[mode] = trainable(states[-1])
        out["max_diff_vs_jit"][mode] = max_diff(final[mode], final["jit"])
    out["param_bytes"]["total"] = sum(x.nbytes for x in jax.tree_util.tree_leaves(initial.params))
    out["param_scale"] = max(float(np.max(np.abs(x))) for x in jax.tree_util.tree_leaves(final["jit"]["params"]))
    return out


FOLDER_STEPS = 2
FOLDER_CLASSES = 3


def folder_config(folder: str):
    """segment_config's flow on an image folder of FOLDER_CLASSES classes read as 8x8 RGB (grayscale files
    converted); a checkpoint every step and one kept, so the final step's verification prunes the first."""
    config = segment_config("jit", FOLDER_STEPS, batch_size=8)
    config.data.update(name="folder", folder=folder, num_classes=FOLDER_CLASSES, channels=3, image_size=8)
    config.model.update(num_classes=FOLDER_CLASSES, in_channels=3)
    config.train.update(eval_batch_size=8, keep_checkpoints=1)
    return config


def run_folder_process(port: str, process_id: str, root: str) -> dict:
    from biflow_jax import distributed

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    distributed.initialize("on", coordinator_address=f"localhost:{port}", num_processes=PROCESSES,
                           process_id=int(process_id))
    assert (jax.process_count(), jax.device_count()) == (PROCESSES, PROCESSES), jax.devices()
    config = folder_config(os.path.join(root, "images"))
    shards = {split: [path.decode() for path, _ in image_folder.source(config.data, split).as_numpy_iterator()]
              for split in (config.data.train_split, config.data.test_split)}
    results = train.train_and_evaluate(config, os.path.join(root, "run"))["flow"]
    return {"process": jax.process_index(), "results": results, "shards": shards}


def main(argv):
    mode, args = argv[1], argv[2:]
    result = {"train": run_train_process, "reference": run_reference, "backends": run_backends,
              "folder": run_folder_process}[mode](*args)
    if jax.process_index() == 0 or mode == "folder":
        print(RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv)
