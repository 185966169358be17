"""The `sample` mode: images from either model of a run, saved where nothing else is written.

`--sampler=exact|jacobi|naive` inverts the stage-1 flow exactly (KV-cached, Jacobi or
naive token-by-token decoding; TARFlow, arXiv:2412.06329); `--sampler=biflow` runs
BiFlow's learned reverse model G once per image (1 NFE; BiFlow, arXiv:2512.10953).
A two-stage job dir, a stage-1 dir or a stage-2 dir are all accepted (`runs.stage_dir`
picks the part). Each call writes a new folder named after its settings, e.g.
`WORKDIR/samples/biflow_w1_seed0_n100/` holding `samples.png` (captioned: which sampler,
guidance, seed, how many of the images are shown, a row per class), `samples.npz`
(uint8 NHWC `images`, int `labels`, the same noise for every sampler at one seed) and
`settings.json`; the grid also goes to the run's TensorBoard as `samples/<folder>`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from biflow_jax import config_files, image_grids, latent_space, runs, workdir_lock
from biflow_jax.errors import ConfigError
from biflow_jax.samplers import exact_inverse, one_nfe

# Exact-inverse samplers and the solver each one uses; "biflow" is G's one pass.
EXACT_SOLVERS = {"exact": "cached", "jacobi": "jacobi", "naive": "naive"}
SAMPLERS = (*EXACT_SOLVERS, "biflow")
MAX_GRID_COLUMNS = 16  # images per class row in the PNG (all of them are in the npz)
MAX_GRID_IMAGES = 256  # an unconditional grid shows at most this many

def over_local_devices() -> NamedSharding:
    """The sample batch's placement: split over this process's devices (one mesh axis, 'batch')."""
    return NamedSharding(Mesh(np.array(jax.local_devices()), ("batch",)), PartitionSpec("batch"))


def placed(x: Any) -> Any:
    """`x` split over this process's devices along its first axis when it divides evenly (as the sample
    mode places its batches, so the same sampler call reuses one compiled program), else as it is."""
    if x is None or len(x) % jax.local_device_count():
        return x
    return jax.device_put(x, over_local_devices())


def sample_settings(config: Any) -> dict:
    """config.sample over configs/common.py's `sample` section (the section may be missing or partial)."""
    return config_files.section(config, "sample")


def guidance_from_settings(settings: dict) -> exact_inverse.Guidance:
    return exact_inverse.Guidance(
        scale=float(settings["guidance"]), what=settings["guide_what"], annealed=bool(settings["annealed"]),
        attn_temp=float(settings["attn_temp"]), rule=settings["rule"],
    )


def denoise_sigma(config: Any, settings: dict) -> float:
    """The training noise level when the flow learned Gaussian-noised images, else 0 (no step)."""
    train = config_files.section(config, "flow_train", "train")
    if settings["denoise"] and train["noise"] == "gaussian":
        return float(train["noise_std"])
    return 0.0


def sampler_caption(sampler: str, w: float) -> str:
    """What a grid column shows: 'exact inverse, g=0', 'exact inverse (Jacobi), g=1', 'BiFlow 1-NFE, w=1'."""
    if sampler == "biflow":
        return f"BiFlow 1-NFE, w={w:g}"
    how = {"exact": "", "jacobi": " (Jacobi)", "naive": " (naive)"}[sampler]
    return f"exact inverse{how}, g={w:g}"


MAX_LABELS_IN_NAME = 64  # longer label lists are named by count and hash (a file name has at most 255 bytes)


def folder_name(sampler: str, w: float, seed: int, num_images: int, labels: Sequence[int] | None) -> str:
    name = f"{sampler}_w{w:g}_seed{seed}_n{num_images}"
    if labels is not None:
        text = "-".join(str(int(v)) for v in labels)
        if len(text) > MAX_LABELS_IN_NAME:
            text = f"{len(labels)}x{hashlib.sha256(text.encode()).hexdigest()[:12]}"
        name += "_labels" + text
    return name


def check_settings(settings: dict, num_images: int | None = None, w: float | None = None) -> None:
    """Every sampling setting that can be checked before sampling: counts positive, scales finite (a NaN
    guidance would write a folder of garbage). Flags are named as flags, config values as config keys."""
    count, key = (settings["num_images"], "sample.num_images") if num_images is None else (num_images, "--num_images")
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        raise ConfigError(f"{key}={count} must be a positive number of images")
    if not isinstance(settings["batch_size"], int) or settings["batch_size"] <= 0:
        raise ConfigError(f"sample.batch_size={settings['batch_size']} must be positive")
    if w is not None and not math.isfinite(w):
        raise ConfigError(f"--w={w} must be a finite number")
    for name in ("guidance", "attn_temp", "noise_scale", "jacobi_tol"):
        if not math.isfinite(float(settings[name])):
            raise ConfigError(f"sample.{name}={settings[name]} must be a finite number")


def default_labels(num_images: int, num_classes: int) -> np.ndarray:
    """Class-balanced labels 0, 1, ..., K-1, 0, 1, ... (uniform over classes, a full grid)."""
    return np.arange(num_images) % num_classes


def biflow_guidance(config: Any, reverse: Any, w: float | None) -> float:
    """The trained-in guidance scale G takes: `w`, else biflow.guidance when G learned it, else 0."""
    trained = bool(config.biflow.get("cfg_training", False)) and bool(getattr(reverse, "guidance_conditioning", True))
    if w is None:
        return float(config.biflow.guidance) if trained else 0.0
    if w != 0 and not trained:
        raise ConfigError(f"--w={w:g}: this G was trained without guidance (biflow.cfg_training=False); use --w=0")
    return float(w)


def inside(path: str, tree: str) -> bool:
    """Whether `path` is `tree` or lies under it (symbolic links resolved)."""
    path, tree = os.path.realpath(path), os.path.realpath(tree)
    return os.path.commonpath([path, tree]) == tree


def own_tree(workdir: str) -> str:
    """The folder a run may write into: its workdir, or the whole job directory for the reverse/ part of a
    two-stage job (its flow is the sibling forward/)."""
    parent = os.path.dirname(os.path.abspath(workdir))
    if os.path.basename(os.path.abspath(workdir)) == runs.REVERSE_DIR and \
            os.path.isdir(os.path.join(parent, runs.FORWARD_DIR)):
        return parent
    return workdir


@contextlib.contextmanager
def writing_into(workdir: str, stage: str, out_dir: str | None = None) -> Iterator[list[str]]:
    """Own `workdir` (its samples/) and the `stage` run it denotes (its TensorBoard, caches) for the block;
    yields the directories owned, the only ones the block may write into.

    The read modes write into the run like training does, so they take the same one-writer lock: while
    a training run owns either directory they stop with WorkdirBusyError before writing anything. A run
    outside `workdir`'s tree (a stage-2 run's flow elsewhere) is only read, and an `out_dir` outside it
    leaves the workdir unwritten (it may be read-only).
    """
    dirs = [] if out_dir is not None and not inside(out_dir, workdir) else [workdir]
    with contextlib.suppress(FileNotFoundError):  # no such run: the mode's own load says so, in its words
        part = runs.stage_dir(workdir, stage)
        if dirs and inside(part, own_tree(workdir)):
            dirs.append(part)
    with contextlib.ExitStack() as locks:
        for path in dirs:
            locks.enter_context(workdir_lock.hold(path))  # re-entrant: the same directory twice is one lock
        yield dirs


def run_sample(workdir: str, sampler: str | None = None, num_images: int | None = None,
               labels: Sequence[int] | None = None, out_dir: str | None = None, ema: bool = True, seed: int = 0,
               config: Any = None, w: float | None = None) -> dict:
    """Generate `num_images` images with `sampler` from the run in `workdir`; returns paths and figures
    (`seconds` and `images_per_s` include compilation).

    sampler: 'exact' | 'jacobi' | 'naive' (the flow's exact inverse) or 'biflow' (G, 1 NFE);
    None takes config.sample.solver's exact inverse. w: the exact inverse's CFG scale
    (default config.sample.guidance) or G's trained-in guidance (default biflow.guidance).
    labels: one per image (cycled if shorter); None gives class-balanced labels for a
    conditional model. out_dir: None writes a new folder WORKDIR/samples/<settings>.
    """
    if sampler is None:
        sampler = next((k for k, v in EXACT_SOLVERS.items() if v == sample_settings(config)["solver"]), "exact")
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler={sampler!r} must be one of {', '.join(SAMPLERS)}")
    if w is not None and not math.isfinite(w):
        raise ConfigError(f"--w={w} must be a finite number")
    if num_images is not None and num_images <= 0:
        raise ConfigError(f"--num_images={num_images} must be a positive number of images")
    if out_dir is not None:
        workdir_lock.check_writable(out_dir, "--out_dir")
    with writing_into(workdir, "biflow" if sampler == "biflow" else "flow", out_dir) as owned:
        try:
            if sampler == "biflow":
                reverse_run = runs.load_reverse(workdir, ema)
                run, model = reverse_run, reverse_run.flow.model
            else:
                reverse_run = None
                run = runs.load_flow(workdir, ema)
                model = run.model
        except FileNotFoundError as err:
            kind = "stage-2 (BiFlow)" if sampler == "biflow" else "stage-1 flow"
            raise FileNotFoundError(f"cannot sample with --sampler={sampler}: no {kind} checkpoint in workdir "
                                    f"{workdir!r} ({err})") from err
        # Sampling settings come from the given config; the training noise from the run's own config.
        config = config if config is not None else run.config
        settings = sample_settings(config)
        check_settings(settings, num_images, w)
        num_images = int(settings["num_images"] if num_images is None else num_images)

        if labels is not None:
            all_labels = np.resize(np.asarray(labels, np.int32), num_images)
        elif model.num_classes:
            all_labels = default_labels(num_images, model.num_classes).astype(np.int32)
        else:
            all_labels = None
        if all_labels is not None:
            exact_inverse.check_labels(model, all_labels)

        if sampler == "biflow":
            w = biflow_guidance(run.config, reverse_run.model, w)
            sigma, solver = 0.0, None
            to_images = one_nfe.token_images(model.patch_size, model.img_size, model.in_channels)

            def generate(z, y):
                return one_nfe.one_nfe_sample(reverse_run.model, reverse_run.params, z, y, w, to_images=to_images)
        else:
            if w is not None:
                settings["guidance"] = float(w)
            guidance = guidance_from_settings(settings)
            exact_inverse.check_guidance(model, guidance)
            w, solver = guidance.scale, EXACT_SOLVERS[sampler]
            sigma = denoise_sigma(run.config, settings)

            def generate(z, y):
                return exact_inverse.generate(model, run.params, z, y, guidance, solver, sigma,
                                              settings["jacobi_tol"], settings["jacobi_max_iters"])

        name = folder_name(sampler, w, seed, num_images, labels)  # where it goes, checked before sampling
        out_dir = out_dir or os.path.join(workdir, "samples", name)
        workdir_lock.check_writable(out_dir, "the samples folder")
        decoder = latent_space.load_decoder(config)
        devices = jax.local_devices()
        batch_sharding = over_local_devices()
        per_step = min(int(settings["batch_size"]), num_images)
        per_step = -(-per_step // len(devices)) * len(devices)  # a multiple of the device count

        rng = jax.random.PRNGKey(seed)
        token_shape = (model.num_tokens, model.token_dim)
        chunks = []
        start = time.perf_counter()
        for first in range(0, num_images, per_step):
            count = min(per_step, num_images - first)
            z = settings["noise_scale"] * jax.random.normal(jax.random.fold_in(rng, first), (per_step,) + token_shape)
            z = jax.device_put(z, batch_sharding)
            y = None
            if all_labels is not None:
                step_labels = np.zeros(per_step, np.int32)  # padding rows are generated, then dropped
                step_labels[:count] = all_labels[first:first + count]
                y = jax.device_put(jnp.asarray(step_labels), batch_sharding)
            out = generate(z, y)  # a latent run's samples are latents: decoded through the frozen VAE
            chunks.append((decoder.to_uint8(out) if decoder else exact_inverse.images_to_uint8(out))[:count])
        seconds = time.perf_counter() - start
        images = np.concatenate(chunks)

        os.makedirs(out_dir, exist_ok=True)
        png_path, npz_path = os.path.join(out_dir, "samples.png"), os.path.join(out_dir, "samples.npz")
        saved_labels = all_labels if all_labels is not None else np.full(num_images, -1, np.int32)
        np.savez(npz_path, images=images, labels=saved_labels)
        grid = sample_grid(images, all_labels, f"{sampler_caption(sampler, w)}, seed {seed}", run.step)
        image_grids.save_png(grid, png_path)
        settings_record = {"sampler": sampler, "solver": solver, "w": w, "seed": seed, "num_images": num_images,
                           "labels": None if labels is None else [int(v) for v in labels], "checkpoint_step": run.step,
                           "workdir": os.path.abspath(run.workdir), "denoise_sigma": sigma, "ema": ema}
        with open(os.path.join(out_dir, "settings.json"), "w") as f:
            json.dump(settings_record, f, indent=1)
        if any(inside(run.workdir, d) for d in owned):  # never into a run this call only reads
            image_grids.to_tensorboard(run.workdir, run.step, images={f"samples/{name}": grid})

        return {
            "samples_png": png_path,
            "samples_npz": npz_path,
            "out_dir": out_dir,
            "num_images": num_images,
            "sampler": sampler,
            "solver": solver,
            "w": w,
            "guidance": w,
            "denoise_sigma": sigma,
            "seconds": seconds,
            "images_per_s": num_images / seconds,
        }


def result_line(out: dict) -> str:
    """The console line for a `run_sample` result: what sampled, how many, how fast, where."""
    return (f"{sampler_caption(out['sampler'], out['w'])}: {out['num_images']} images, "
            f"{out['images_per_s']:.1f} images/s incl. compile: {out['samples_png']}")


def sample_grid(images: np.ndarray, labels: np.ndarray | None, what: str, step: int) -> np.ndarray:
    """A row per class (up to MAX_GRID_COLUMNS each), or a square grid; the title says how many are shown."""
    total = len(images)
    if labels is not None:
        cells, cols, classes = image_grids.class_rows(images, labels, MAX_GRID_COLUMNS)
        shown = sum(min(int(np.sum(labels == c)), cols) for c in classes)
        title = [f"{what}, checkpoint step {step}", image_grids.shown_note(shown, total, "samples.npz") +
                 f", a row per class (up to {cols} each)"]
        return image_grids.captioned_grid(cells, cols, title=title, row_labels=[f"class {int(c)}" for c in classes])
    shown = min(total, MAX_GRID_IMAGES)
    title = [f"{what}, checkpoint step {step}", image_grids.shown_note(shown, total, "samples.npz")]
    return image_grids.captioned_grid(images[:shown], math.ceil(math.sqrt(shown)), title=title)
