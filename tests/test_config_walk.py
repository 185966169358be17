"""Every config file and variant in configs/, end to end, on data shaped and labelled as its real dataset.

Listed from configs/ at collection (each module's VARIANTS), so a new config or variant is walked
without editing this file. Each walk loads the config the way users do, shrinks only widths, depths,
batches, step and sample counts (and the perceptual crop and Inception input size), points it at
walk_setup's data and random weights, then runs the real entry points: stage 1 (R-REPA where align
is on) and stage 2 with its perceptual terms through `train.train_and_evaluate` (which ends with the
exact-vs-BiFlow comparison), the sample mode with both samplers, `--mode=eval` (random Inception
against a ref_stats reference of the same data), export and describe. Variants identical once shrunk
share one walk (`walks`). Each walk is a scheduling group of its own (tests/conftest.py), so `-n 2`
spreads them over both workers.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib
import json
import os
import time

import jax
import numpy as np
import pytest
import walk_setup
from helpers.paths import REPO

from biflow_jax import config_files
from biflow_jax.evaluators import inception_features

# The walk takes 40-180 s per config on a 2-core CPU (13-20 minutes of one core for all of them on a
# Sapphire Rapids Xeon), more than the CI budget has beside the rest of the suite, so it runs when asked:
# BIFLOW_CONFIG_WALK=1 python -m pytest -q -n 2 tests/test_config_walk.py
when_asked = pytest.mark.skipif(os.environ.get("BIFLOW_CONFIG_WALK") != "1",
                                reason="the config walk runs with BIFLOW_CONFIG_WALK=1 (over the CI budget)")

RANDOM_VARIABLES = inception_features.random_variables

STEPS = 2
WIDTH, HEAD_DIM, BLOCKS, LAYERS = 16, 8, 2, 1
BATCH = 4  # training and eval batches, samples, FID samples and chunks


@functools.cache
def cached_random_inception(seed: int = inception_features.RANDOM_SEED):
    return RANDOM_VARIABLES(seed)


def config_variants() -> list[tuple[str, str]]:
    """(file, variant) for every config module in configs/ and every entry of its VARIANTS."""
    out = []
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
        name = os.path.basename(path)[:-3]
        if name.startswith("_") or name == "common":
            continue
        module = importlib.import_module(f"configs.{name}")
        variants = getattr(module, "VARIANTS", None)
        out += [(name, v) for v in variants] if variants else [(name, "<no VARIANTS tuple>")]
    return out


def shrink(config) -> None:
    """Small networks and counts; image size, patch, token grid, classes, data and options untouched."""
    m = config.model
    keep_layers = tuple(min(n, 2) for n in m.block_layers[-BLOCKS:]) if m.block_layers else ()
    m.update(channels=WIDTH, head_dim=HEAD_DIM, num_blocks=min(m.num_blocks, BLOCKS), layers_per_block=LAYERS,
             block_layers=keep_layers)
    loops = [config.train, config.biflow.train]
    for loop in loops:
        loop.update(batch_size=BATCH, eval_batch_size=BATCH, steps=STEPS, log_every=1, eval_every=STEPS,
                    checkpoint_every=STEPS, keep_checkpoints=1)
    for optim in (config.optim, config.biflow.optim):
        optim.warmup_steps = 1
    config.data.shuffle_buffer = 16
    for evals in (config.evals, config.biflow.evals):
        for name, section in evals.items():
            if name == "fid":
                section.update(train_samples=BATCH, num_samples=BATCH, batch_size=BATCH, chunk_size=BATCH,
                               inception_size=75, is_split_size=BATCH)
            elif section.get("every", 0) > 0:
                section.every = STEPS
    if config.align.enabled:  # the last blocks (forward order) and their last layer, as the configs pick them
        top = max(b for b, _ in config.align.locations)
        config.align.update(projector_hidden=16, locations=[
            (max(1, m.num_blocks - (top - b)), LAYERS) for b, _ in config.align.locations])
    config.biflow.model.update(depth=m.num_blocks + 1, width=WIDTH, heads=2, layers_per_stage=[])
    config.biflow.perceptual.crop_size = 32
    config.sample.update(num_images=BATCH, batch_size=BATCH)
    config.latent.update(decode_batch=BATCH, encode_batch=BATCH, shard_size=BATCH)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Random weights in their real formats and the TFDS infos, made once for every walk."""
    root = tmp_path_factory.mktemp("walk_assets")
    tfds_names = set()
    for name, variant in config_variants():
        if variant.startswith("<"):
            continue
        c = importlib.import_module(f"configs.{name}").get_config(variant)
        for data in (c.data, c.latent.source):
            if data.name not in ("digits", "folder", "latents"):
                tfds_names.add(data.name)
    return dict(
        tfds=walk_setup.write_tfds_infos(str(root / "tfds"), sorted(tfds_names)),
        vgg16=walk_setup.write_vgg16(str(root / "vgg16.pth")),
        convnext=walk_setup.write_convnext_dir(str(root / "convnext")),
        dino=walk_setup.write_dino_dir(str(root / "dino")),
        root=str(root))


def vae_for(assets, levels: int) -> str:
    path = os.path.join(assets["root"], f"vae{levels}")
    return path if os.path.isdir(path) else walk_setup.write_vae(path, levels)


def point_at_assets(config, assets, root: str) -> None:
    """Weights paths of the enabled terms, and the data each config's dataset name asks for."""
    p = config.biflow.perceptual
    if p.lpips.weight:
        p.lpips.vgg16_path = assets["vgg16"]
    if p.convnext.weight:
        p.convnext.path = assets["convnext"]
    if p.dino.weight:
        p.dino.path = assets["dino"]
    if config.align.enabled:
        config.align.weights = assets["dino"]
    for data in (config.data, config.latent.source) if config.latent.enabled else (config.data,):
        if data.name == "folder":
            data.folder = walk_setup.make_folder(os.path.join(root, "images"), data.num_classes,
                                                 data.image_size * 2 if data.image_size >= 64 else 40,
                                                 (data.train_split, data.test_split))
        elif data.name not in ("digits", "latents"):
            data.data_dir = assets["tfds"]
    if config.latent.enabled:
        levels = 1 + int(np.log2(config.latent.source.image_size // config.data.image_size))
        config.latent.vae_path = vae_for(assets, levels)
        config.data.folder = os.path.join(root, "latents")


def train_metrics(workdir: str) -> dict[str, float]:
    """The last logged value of each train/* scalar in the stage's TensorBoard events, and its step."""
    import tensorflow as tf

    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag.startswith("train/"):
                    out[value.tag[len("train/"):]] = float(tf.make_ndarray(value.tensor))
                    out["step"] = event.step
    return out


def pixel_config(config):
    """The config whose data section holds the images (a latent run's source)."""
    if not config.latent.enabled:
        return config
    out = config.copy_and_resolve_references()
    out.data = config.latent.source
    return out


def load_real(name: str, variant: str):
    return config_files.load(os.path.join(REPO, "configs", f"{name}.py") + (f":{variant}" if variant else ""))


def shrunk(name: str, variant: str):
    config = load_real(name, variant).copy_and_resolve_references()
    shrink(config)
    return config


def walks() -> list:
    """One walk per distinct shrunk config, its id naming every variant it stands for.

    Variants that differ only in what `shrink` overrides and in learning rates (digits :full and :quick
    differ in steps, batch and lr; latent :b2 and :xl2 in width and depth) run the same code on the same
    shapes and data: walking the second would repeat the first, so the first walks both (each one's real
    config is still described and checked). `parallel.topology` names the TPU slice `--mode=compile`
    sizes for and changes nothing on the CPU.
    """
    groups: dict[str, list[tuple[str, str]]] = {}
    for name, variant in config_variants():
        key = f"{name}:{variant}"
        if not variant.startswith("<"):
            config = shrunk(name, variant)
            config.parallel.topology = ""
            for optim in (config.optim, config.biflow.optim):
                optim.update(lr=0.0, init_lr=0.0, end_lr=0.0)
            key = config.to_json(sort_keys=True)
        groups.setdefault(key, []).append((name, variant))
    return [pytest.param(members, id="=".join(f"{n}-{v or 'default'}" for n, v in members))
            for members in groups.values()]


def once(fn, *args):
    """compare.timed with one call (compile and run together): the walk checks that the comparison runs."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return np.asarray(out), time.perf_counter() - start


def check_description(name: str, variant: str) -> None:
    """The shrunk config's description keeps the real config's token grid, classes and dataset."""
    from biflow_jax.modes import describe

    real = load_real(name, variant)
    described = describe.run(shrunk(name, variant))  # (tests/modes/test_describe.py describes the real sizes)
    grid = real.model.img_size // real.model.patch_size
    assert [s["token_grid"] for s in described["stages"]] == [[grid, grid]] * 2, (name, variant)
    assert all(s["classes"] == real.model.num_classes for s in described["stages"]), (name, variant)
    assert described["data"]["name"] == real.data.name
    assert described["data"]["labelled"] == bool(real.model.num_classes)


@when_asked
@pytest.mark.one_per_worker_slot
@pytest.mark.parametrize("members", walks())
def test_config_walks_end_to_end(members, assets, tmp_path, monkeypatch):
    from biflow_jax.evaluators import ref_stats
    from biflow_jax.modes import compare, sample, train
    from biflow_jax.modes import eval as eval_mode
    from biflow_jax.modes.export import export_workdir

    for name, variant in members:
        assert not variant.startswith("<"), (f"configs/{name}.py has no VARIANTS tuple: the walk cannot list its "
                                             "variants")
        check_description(name, variant)
    config = shrunk(*members[0])
    monkeypatch.setattr(inception_features, "random_variables", cached_random_inception)  # drawn once
    # The exact-vs-BiFlow comparison after stage 2 on 2 classes x 2 images instead of 10 x 30 (sample
    # counts; the sample mode's batch, so the two share compiled programs), each sampler run once: its
    # timing is the benches' subject, not the walk's.
    monkeypatch.setattr(compare, "MAX_CLASSES", 2)
    monkeypatch.setattr(compare, "compare", functools.partial(compare.compare, per_class=2, grid_per_class=2))
    monkeypatch.setattr(compare, "timed", once)
    monkeypatch.setattr(compare, "latency_s", lambda fn, *args: once(fn, *args)[1])
    root = str(tmp_path)
    point_at_assets(config, assets, root)
    flow_dir, reverse_dir = os.path.join(root, "flow"), os.path.join(root, "biflow")
    uses_tfds = any(d.name not in ("digits", "folder", "latents") for d in (config.data, config.latent.source)
                    if d is config.data or config.latent.enabled)
    with walk_setup.mocked_tfds(assets["tfds"]) if uses_tfds else contextlib.nullcontext():
        if config.latent.enabled:
            from biflow_jax.data import latents

            latents.encode(config, config.data.folder)
        if config.stage == "both":  # the two-stage job: JOB/forward, then JOB/reverse
            job = os.path.join(root, "job")
            results = train.train_and_evaluate(config, job)
            flow_dir, reverse_dir = os.path.join(job, "forward"), os.path.join(job, "reverse")
        else:  # stage 1, then stage 2 against it as the configs' docstrings say
            assert config.stage == "flow", config.stage
            results = train.train_and_evaluate(config, flow_dir)
            second = config.copy_and_resolve_references()
            second.update(stage="biflow")
            second.biflow.flow_init = flow_dir
            results.update(train.train_and_evaluate(second, reverse_dir))
        assert set(results) == {"flow", "biflow"}
        flow_metrics, reverse_metrics = train_metrics(flow_dir), train_metrics(reverse_dir)
        assert flow_metrics["step"] == reverse_metrics["step"] == STEPS
        assert ("align" in flow_metrics) == bool(config.align.enabled), sorted(flow_metrics)
        terms = {f"perceptual_{t}" for t in ("lpips", "convnext", "dino") if config.biflow.perceptual[t].weight}
        assert terms == {k for k in reverse_metrics if k.startswith("perceptual_")}, sorted(reverse_metrics)
        assert all(np.isfinite(v) for v in [*flow_metrics.values(), *reverse_metrics.values()])

        side, channels = (config.latent.source.image_size, 3) if config.latent.enabled else (
            config.data.image_size, config.data.channels)
        # The sample mode: exact inverse (train_flow runs it into the stage's samples/) and BiFlow's G.
        biflow_samples = sample.run_sample(reverse_dir, sampler="biflow", out_dir=os.path.join(root, "samples"))
        for sampler, path in (("exact", os.path.join(flow_dir, "samples", "samples.npz")),
                              ("biflow", biflow_samples["samples_npz"])):
            images = np.load(path)
            assert images["images"].shape == (BATCH, side, side, channels), (sampler, images["images"].shape)
            labels = images["labels"]
            assert (0 <= labels.min() and labels.max() < config.model.num_classes if config.model.num_classes
                    else (labels == -1).all()), labels

        ref = os.path.join(root, "ref.npz")
        ref_stats.compute(pixel_config(config), ref, split=pixel_config(config).data.test_split,
                          num_images=BATCH, random_inception=True)
        record = eval_mode.run_eval(reverse_dir, None, sampler="biflow", ref=ref, random_inception=True)
        assert record["num_samples"] == BATCH and np.isfinite(record["figures"]["fid"]), record

    written = export_workdir(reverse_dir, os.path.join(root, "export"))
    assert [os.path.basename(w["weights"]) for w in written] == ["forward.safetensors", "reverse.safetensors"]
    with open(written[0]["config"]) as f:
        exported = json.load(f)
    assert exported["num_classes"] == config.model.num_classes and exported["patch_size"] == config.model.patch_size

    with np.load(os.path.join(reverse_dir, "samples", "exact_vs_biflow.npz")) as compared:
        assert len(compared["exact"]) == 2 * min(max(config.model.num_classes, 1), 2)
        assert compared["exact"].shape[1:] == (side, side, channels)


def test_a_conditional_config_on_an_unlabelled_tfds_dataset_stops_at_start(assets, tmp_path):
    """The old imagenet64 defect (num_classes=1000 on downsampled_imagenet/64x64, which has only `image`)
    stops in dataset_info, before the workdir is written, naming the dataset and the missing feature."""
    from biflow_jax.data import input_pipeline
    from biflow_jax.errors import DataError
    from biflow_jax.modes import train

    config = config_files.load(os.path.join(REPO, "configs", "imagenet64.py:uncond"))
    config.data.update(num_classes=1000, data_dir=assets["tfds"])
    config.model.num_classes = 1000
    want = (r"dataset 'downsampled_imagenet/64x64' has no label feature 'label' \(features: \['image'\]\) but "
            r"data.num_classes=1000")
    with walk_setup.mocked_tfds(assets["tfds"]):
        with pytest.raises(DataError, match=want):
            input_pipeline.dataset_info(config.data)
        config.data.num_classes = 0
        assert input_pipeline.dataset_info(config.data)["num_examples"] == {"train": walk_setup.EXAMPLES,
                                                                           "validation": walk_setup.EXAMPLES}
        labelled = config_files.load(os.path.join(REPO, "configs", "imagenet64.py:p2")).data
        labelled.data_dir = assets["tfds"]
        assert set(input_pipeline.dataset_info(labelled)["num_examples"]) == {"train", "validation", "test"}
        config.data.num_classes = 1000
        workdir = tmp_path / "run"
        with pytest.raises(DataError, match="has no label feature"):
            train.train_and_evaluate(config, str(workdir))
        assert not workdir.exists()
