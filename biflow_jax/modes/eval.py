"""`--mode=eval`: FID-50K the way the papers report it, resumable, or the scores of any sample file.

Generates `num_samples` images (evals.fid.num_samples, 50,000 by default) with the exact
inverse of a stage-1 flow (TARFlow, arXiv:2412.06329) or BiFlow's 1-NFE G (arXiv:2512.10953),
class-balanced, sharded over every device and process, into
WORKDIR/eval/<name>/chunks/chunk_FIRST_STOP.npz (each written atomically: a killed run continues
at the first missing chunk, and since sample i is a pure function of (seed, i) the result is
the same as an uninterrupted run's). The chunks become WORKDIR/eval/<name>/samples.npz in
ADM's sample format (`arr_0` uint8 NHWC, `arr_1` labels), which is then scored like any
other sample file (`--samples=FILE.npz`): FID, sFID, Inception Score and precision/recall
against an ADM reference batch (Dhariwal & Nichol 2021, arXiv:2105.05233). Figures go to the
console, to TensorBoard (WORKDIR) and to WORKDIR/eval/<name>/metrics.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
from clu import metric_writers
from jax.experimental import multihost_utils
from tqdm import tqdm

from biflow_jax import latent_space, runs, sharding
from biflow_jax.console import is_main_process, say
from biflow_jax.errors import ConfigError
from biflow_jax.evaluators import sample_fid
from biflow_jax.evaluators.inception_features import show_progress
from biflow_jax.modes.sample import writing_into

SAMPLERS = ("exact", "biflow")
EVAL_DIR = "eval"


def _has_stage(workdir: str, stage: str) -> bool:
    try:
        runs.stage_dir(workdir, stage)
        return True
    except FileNotFoundError:
        return False


def choose_sampler(workdir: str, sampler: str | None) -> str:
    """The flag's sampler; by default BiFlow when the workdir has a stage-2 run, else the exact inverse."""
    if sampler is None:
        return "biflow" if _has_stage(workdir, "biflow") else "exact"
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler={sampler!r}: choose from {list(SAMPLERS)}")
    if sampler == "biflow" and not _has_stage(workdir, "biflow"):
        raise FileNotFoundError(f"--sampler=biflow needs a stage-2 (BiFlow) run in {workdir!r}; it has none "
                                "(use --sampler=exact for a stage-1 flow)")
    return sampler


def apply_flags(settings: dict[str, Any], ref: str | None, inception: str | None, random_inception: bool,
                num_samples: int | None, seed: int | None) -> dict[str, Any]:
    settings = dict(settings)
    if ref:
        settings["reference"] = ref
    if inception:
        settings["inception"] = inception
    if random_inception:
        settings["random_inception"] = True
    if num_samples is not None:
        if num_samples < 2:
            raise ConfigError(f"--num_images={num_samples}: FID needs at least 2 samples")
        settings["num_samples"] = num_samples
    if seed is not None:
        settings["seed"] = seed
    return settings


def read_samples(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """An ADM-style sample file: `arr_0` uint8 NHWC (1 or 3 channels) and optionally `arr_1` labels."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sample file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise ValueError(f"{path} has no arr_0 (ADM sample format: arr_0 uint8 NHWC images); it has "
                                 f"{', '.join(data.files)}")
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data.files else None
    except (OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable npz file ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 must be uint8 NHWC images with 1 or 3 channels, got {images.dtype} "
                         f"{images.shape}")
    return images, labels


def _atomic_savez(path: str, **arrays: np.ndarray) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:  # a file object keeps np.savez from renaming it
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _chunk_ok(path: str, count: int, shape: tuple[int, ...]) -> bool:
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["arr_0"].shape == (count,) + shape and data["arr_1"].shape == (count,)
    except Exception:  # noqa: BLE001 - any unreadable chunk is generated again
        return False


def generate_samples(out_dir: str, sampler: sample_fid.Sampler, params: Any, settings: dict[str, Any],
                     image_shape: tuple[int, ...], mesh: Any) -> str:
    """WORKDIR/eval/<name>/samples.npz, from the chunks already there plus the missing ones."""
    final = os.path.join(out_dir, "samples.npz")
    n, chunk, batch_size = int(settings["num_samples"]), int(settings["chunk_size"]), int(settings["batch_size"])
    if batch_size % jax.device_count():
        raise ConfigError(f"{settings['section']}.batch_size={batch_size} is not a multiple of the device count "
                          f"{jax.device_count()}")
    chunk_dir = os.path.join(out_dir, "chunks")
    num_chunks = math.ceil(n / chunk)
    bounds = [(c * chunk, min((c + 1) * chunk, n)) for c in range(num_chunks)]
    # The bounds are in the name, so a changed chunk_size never mistakes one range for another.
    paths = [os.path.join(chunk_dir, f"chunk_{a:08d}_{b:08d}.npz") for a, b in bounds]
    done = np.zeros(num_chunks + 1, np.int32)
    if is_main_process():
        os.makedirs(chunk_dir, exist_ok=True)
        for stale in (f for f in os.listdir(chunk_dir) if ".tmp." in f):  # a killed run's unfinished write
            os.remove(os.path.join(chunk_dir, stale))
        done[-1] = _chunk_ok(final, n, image_shape)
        for c, (a, b) in enumerate(bounds):
            done[c] = _chunk_ok(paths[c], b - a, image_shape)
    done = np.asarray(multihost_utils.broadcast_one_to_all(done))  # every process follows process 0's view
    if done[-1]:
        say(f"samples already complete: {final}")
        return final
    have = sum(b - a for (a, b), d in zip(bounds, done[:-1]) if d)
    todo = [c for c in range(num_chunks) if not done[c]]
    say(f"sampling {n:,} images with {sampler.description} in {num_chunks} chunks of {chunk:,}; "
        f"{have:,} already in {chunk_dir}")
    start, made = time.perf_counter(), 0
    with tqdm(total=n, initial=have, desc=f"sampling ({sampler.name})", unit="img", smoothing=0.1,
              disable=not show_progress()) as bar:
        for c in todo:
            a, b = bounds[c]
            images = []
            for count, batch in sample_fid.sample_batches(a, b, batch_size, sampler, mesh):
                out = sampler.generate(params, batch["index"], batch["label"])
                images.append(np.asarray(multihost_utils.process_allgather(out, tiled=True))[:count])
                bar.update(count)
                made += count
            if is_main_process():
                _atomic_savez(paths[c], arr_0=np.concatenate(images),
                              arr_1=sampler.labels(np.arange(a, b)))
            rate = made / (time.perf_counter() - start)
            if not show_progress():
                have += b - a
                say(f"chunk {c + 1}/{num_chunks} written: {have:,}/{n:,} images, {rate:.1f} images/s, "
                    f"ETA {(n - have) / rate / 60:.1f} min")
    if is_main_process():
        parts = []
        for path in paths:
            with np.load(path, allow_pickle=False) as data:
                parts.append((data["arr_0"], data["arr_1"]))
        _atomic_savez(final, arr_0=np.concatenate([p[0] for p in parts]), arr_1=np.concatenate([p[1] for p in parts]))
    multihost_utils.sync_global_devices("eval samples written")
    return final


def _sample_source(workdir: str, kind: str, config: Any, settings_flags: dict[str, Any]
                   ) -> tuple[sample_fid.Sampler, Any, dict[str, Any], tuple[int, ...], int]:
    """(sampler, params, settings, image shape, checkpoint step) of the run in `workdir`."""
    stage = "biflow" if kind == "biflow" else "flow"
    config = config if config is not None else runs.read_config(runs.stage_dir(workdir, stage))
    settings = apply_flags(sample_fid.fid_settings(config, stage), **settings_flags)
    sample_fid.check_settings(settings)  # a missing reference or weights file stops before the run is loaded
    if kind == "biflow":
        run = runs.load_reverse(workdir)
        decoder = latent_space.load_decoder(config)  # latent runs: samples decoded through the frozen VAE
        sampler = sample_fid.biflow_sampler(run.model, run.flow.model, config, settings, decoder)
        flow = run.flow.model
    else:
        run = runs.load_flow(workdir)
        decoder = latent_space.load_decoder(config)
        sampler = sample_fid.exact_sampler(run.model, run.config, config, settings, decoder)
        flow = run.model
    if decoder is not None:  # (model params, VAE params); images at the VAE's resolution
        size = flow.img_size * decoder.model.cfg.downsample_factor
        return sampler, (run.params, decoder.params), settings, (size, size, decoder.model.cfg.out_channels), run.step
    return sampler, run.params, settings, (flow.img_size, flow.img_size, flow.in_channels), run.step


def replicated(tree: Any, mesh: Any) -> Any:
    """Restored params (on this process's devices) -> global arrays replicated over the mesh.

    Through the host: a process cannot device_put its local arrays onto other processes' devices,
    but every process holds the same values and may place them on its own part of a global array.
    """
    sharding_ = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(np.asarray(x), sharding_) if getattr(x, "is_fully_addressable", True) else x, tree)


def run_eval(workdir: str, config: Any = None, sampler: str | None = None, ref: str | None = None,
             samples: str | None = None, num_samples: int | None = None, inception: str | None = None,
             random_inception: bool = False, seed: int | None = None) -> dict[str, Any]:
    """Generate (or take `samples`) and score; returns the record written to metrics.json.

    Holds the workdir's one-writer lock (WORKDIR/eval and its TensorBoard events are written
    there): beside a live training run it stops with WorkdirBusyError before writing anything."""
    with writing_into(workdir, "biflow" if sampler == "biflow" else "flow"):
        return _run_eval(workdir, config, sampler, ref, samples, num_samples, inception, random_inception, seed)


def _run_eval(workdir: str, config: Any, sampler: str | None, ref: str | None, samples: str | None,
              num_samples: int | None, inception: str | None, random_inception: bool,
              seed: int | None) -> dict[str, Any]:
    flags = dict(ref=ref, inception=inception, random_inception=random_inception, num_samples=num_samples, seed=seed)
    mesh = sharding.make_mesh()
    if samples:
        stage = "biflow" if sampler == "biflow" else "flow"
        settings = apply_flags(sample_fid.fid_settings(config, stage), **flags)
        sample_fid.check_settings(settings)
        extractor = sample_fid.make_extractor(settings, mesh)
        images, labels = read_samples(samples)
        name = "samples_" + os.path.splitext(os.path.basename(samples))[0]
        record: dict[str, Any] = {"samples": os.path.abspath(samples), "sampler": "external file"}
        step = 0
    else:
        kind = choose_sampler(workdir, sampler)
        source, params, settings, image_shape, step = _sample_source(workdir, kind, config, flags)
        extractor = sample_fid.make_extractor(settings, mesh)  # bad weights fail before any sampling
        sample_fid.check_feature_space(settings, extractor)
        tag = hashlib.sha1(json.dumps([source.description, settings["seed"]]).encode()).hexdigest()[:8]
        name = f"{kind}_step{step}_n{settings['num_samples']}_seed{settings['seed']}_{tag}"
        out_dir = os.path.join(workdir, EVAL_DIR, name)
        params = replicated(params, mesh)
        start = time.perf_counter()
        path = generate_samples(out_dir, source, params, settings, image_shape, mesh)
        record = {"samples": os.path.abspath(path), "sampler": source.description, "step": step,
                  "sampling_seconds_this_run": round(time.perf_counter() - start, 3)}
        images, labels = read_samples(path)
    out_dir = os.path.join(workdir, EVAL_DIR, name)
    if extractor.random:
        say(f"NOTE: {extractor.weights}")
    reference, with_pr = sample_fid.load_reference(settings, extractor)
    features = extractor.of_array(images, desc="Inception (samples)")
    figures = sample_fid.score(features, reference, with_pr, settings)
    if not with_pr:  # the reference holds no images (arr_0) to compute precision/recall from
        figures = {k: v for k, v in figures.items() if k not in ("precision", "recall")}
    record.update(name=name, num_samples=int(len(images)), labels=None if labels is None else int(len(labels)),
                  reference=os.path.abspath(settings["reference"]), inception=extractor.describe(),
                  random_inception=extractor.random, figures=figures)
    report(workdir, out_dir, record, step)
    return record


def report(workdir: str, out_dir: str, record: dict[str, Any], step: int) -> None:
    figures = record["figures"]
    plain = "RANDOM-INCEPTION " if record["random_inception"] else ""
    n = record["num_samples"]
    say(f"{plain}FID-{n} of {record['sampler']} against {record['reference']}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
    if not is_main_process():
        return
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "metrics.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, default=float)
    os.replace(tmp, path)
    writer = metric_writers.create_default_writer(workdir, asynchronous=False)
    prefix = ("random_inception_" if record["random_inception"] else "") + f"fid{n}/{record['name'].split('_')[0]}"
    writer.write_scalars(step, {f"{prefix}/{k}": v for k, v in figures.items() if not math.isnan(v)})
    writer.flush()
    writer.close()
    say(f"figures written to {path} and TensorBoard in {workdir}")
