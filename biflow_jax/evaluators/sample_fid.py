"""FID of generated samples: settings, the two samplers as pure functions of (seed, index), the evaluator.

Shared by the `fid` evaluator during training and by `--mode=eval` (FID-50K as the papers
report it: Inception pool_3 FID, sFID, IS and precision/recall against an ADM reference
batch, Dhariwal & Nichol 2021, arXiv:2105.05233). Sample i starts from the noise
fold_in(key(seed), i) and carries the class-balanced label i mod K, so a sample set does not
depend on batch size, chunking, device or process count; the exact inverse (TARFlow,
arXiv:2412.06329) and BiFlow's 1-NFE G (arXiv:2512.10953) start from the same noise.

Settings live in a stage's `evals.fid` section (stage 1: the exact inverse) or
`biflow.evals.fid` (stage 2: BiFlow); missing keys take configs/common.py's `fid()` defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from biflow_jax import config_files, sharding
from biflow_jax.errors import ConfigError
from biflow_jax.evaluators import fid
from biflow_jax.evaluators.inception_features import InceptionExtractor, load_variables
from biflow_jax.samplers import exact_inverse, one_nfe

META_KEY = "biflow_meta"  # our extra key in reference files: which Inception features they hold


def section_key(stage: str) -> str:
    return "biflow.evals.fid" if stage == "biflow" else "evals.fid"


def fid_settings(config: Any, stage: str) -> dict[str, Any]:
    """The stage's fid section (evals.fid or biflow.evals.fid) over configs/common.py's `fid()`."""
    evals = (config.biflow.get("evals", {}) if stage == "biflow" else config.get("evals", {})) if config else {}
    section = evals.get("fid", None) or {}
    defaults = config_files.defaults("fid")
    unknown = sorted(set(section) - set(defaults))
    if unknown:
        raise ConfigError(f"{section_key(stage)}.{unknown[0]} is not a FID setting; choose from {sorted(defaults)}")
    settings = {k: section.get(k, v) for k, v in defaults.items()}
    settings["section"] = section_key(stage)
    return settings


def make_extractor(settings: dict[str, Any], mesh: Mesh) -> InceptionExtractor:
    variables, weights = load_variables(settings["inception"], bool(settings["random_inception"]))
    return InceptionExtractor(variables, weights, mesh, int(settings["batch_size"]), settings["convention"],
                              int(settings["inception_size"]))


def check_reference_path(settings: dict[str, Any]) -> str:
    """The reference file's path, or a one-line error naming the file the config expects."""
    path = settings["reference"]
    if not path:
        wanted = settings["reference_name"]
        hint = (f"ADM's reference batch {wanted} (openai/guided-diffusion evaluations)" if wanted else
                "a reference batch: python -m biflow_jax.cli.ref_stats --config=... --out=FILE.npz")
        raise ConfigError(f"{settings['section']}.reference is empty: FID needs {hint}; set --ref=FILE.npz or "
                          f"--config.{settings['section']}.reference=FILE.npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference batch {path} not found ({settings['section']}.reference)")
    return path


def check_settings(settings: dict[str, Any]) -> None:
    """Fail before anything is written: a reference file and Inception weights (or the random test net)."""
    check_reference_path(settings)
    if settings["convention"] not in ("adm", "pytorch_fid"):
        raise ConfigError(f"{settings['section']}.convention={settings['convention']!r}: choose 'adm' or 'pytorch_fid'")
    if not settings["random_inception"]:
        path = settings["inception"]
        if not path:
            load_variables(path, False)  # raises the error naming the weights file
        if not os.path.isfile(path):
            raise FileNotFoundError(f"FID Inception weights not found: {path} ({settings['section']}.inception)")


def extractor_meta(extractor: InceptionExtractor) -> dict[str, Any]:
    return {"inception": "random" if extractor.random else "fid", "convention": extractor.convention,
            "inception_size": extractor.size}


def read_meta(path: str) -> dict[str, Any] | None:
    with np.load(path, allow_pickle=False) as data:
        return json.loads(str(data[META_KEY])) if META_KEY in data.files else None


def check_feature_space(settings: dict[str, Any], extractor: InceptionExtractor) -> str:
    """The reference's path, after checking it holds statistics of the extractor's features.

    A reference made in another feature space (random vs FID weights, another input size or
    resize convention) is refused: the distance between the two would mean nothing. A file
    without our `biflow_meta` key is taken for one of ADM's (its VIRTUAL_* batches): the FID
    network at 299 px in the 'adm' convention. Only the convention may differ, and only with
    `allow_convention_mismatch=True` (models/inception.py: the two give different features).
    """
    path = check_reference_path(settings)
    meta = read_meta(path)
    allow = bool(settings["allow_convention_mismatch"])
    if meta is None:  # an ADM file: the FID network at 299 px, ADM's own convention
        if extractor.random or extractor.size != 299:
            raise ConfigError(f"{path} holds FID Inception statistics at 299 px; scoring with {extractor.describe()} "
                              "cannot be compared with it (make a matching reference with ref_stats)")
        if extractor.convention != "adm" and not allow:
            raise ConfigError(f"{path} is an ADM reference batch (convention 'adm') but {settings['section']}."
                              f"convention={extractor.convention!r}: the features differ, so the FID would be biased; "
                              f"set {settings['section']}.convention=adm, or {settings['section']}."
                              "allow_convention_mismatch=True to score it anyway")
        return path
    ours = extractor_meta(extractor)
    differ = [f"{k} {meta.get(k)!r} vs {v!r}" for k, v in ours.items()
              if meta.get(k) != v and not (allow and k == "convention")]
    if differ:
        raise ConfigError(f"reference {path} was computed with other Inception features than this run's ("
                          + ", ".join(differ) + "); recompute it with ref_stats")
    return path


def load_reference(settings: dict[str, Any], extractor: InceptionExtractor) -> tuple[fid.ReferenceBatch, bool]:
    """The reference batch, with the pool features of its images for precision/recall.

    Returns (reference, whether precision/recall can be computed).
    """
    path = check_feature_space(settings, extractor)
    want_pr = bool(settings["precision_recall"])
    reference = fid.read_reference_batch(path, load_images=want_pr)
    if want_pr and reference.images is not None:
        reference.pool = extractor.of_array(reference.images, desc="Inception (reference)")["pool"]
    return reference, reference.pool is not None


def score(features: dict[str, np.ndarray], reference: fid.ReferenceBatch, with_pr: bool,
          settings: dict[str, Any]) -> dict[str, float]:
    return fid.score(features, reference, split_size=int(settings["is_split_size"]), with_precision_recall=with_pr)


# ---------------------------------------------------------------------------
# Samplers.

@dataclasses.dataclass(frozen=True)
class Sampler:
    """`generate(params, index, labels)` -> uint8 NHWC images for global arrays of sample indices and labels."""

    name: str  # 'exact' | 'biflow'
    description: str
    num_classes: int
    generate: Callable[[Any, jax.Array, jax.Array | None], jax.Array]

    def labels(self, index: np.ndarray) -> np.ndarray:
        """Class-balanced: sample i gets class i mod K (-1 for an unconditional model)."""
        return (index % self.num_classes).astype(np.int32) if self.num_classes else np.full(len(index), -1, np.int32)


def _to_uint8(images: jax.Array) -> jax.Array:
    """As `exact_inverse.images_to_uint8`, on the device: round((x + 1) * 127.5), clipped."""
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def _noise(seed: int, index: jax.Array, shape: tuple[int, int]) -> jax.Array:
    keys = sharding.example_keys(jax.random.key(seed), index)
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def _images(decoder: Any, params: Any, generate_raw: Callable[[Any], jax.Array]) -> jax.Array:
    """uint8 images from a raw generator: a latent run (decoder set) takes params = (model params, VAE
    params) and decodes its latents through the VAE (biflow_jax.latent_space); pixel runs round."""
    if decoder is None:
        return _to_uint8(generate_raw(params))
    return decoder.decode_uint8(params[1], generate_raw(params[0]))


def exact_sampler(flow: Any, flow_config: Any, config: Any, settings: dict[str, Any], decoder: Any = None) -> Sampler:
    """The flow's exact inverse with config.sample's solver, guidance and denoising (guidance
    from the fid section when set there)."""
    sample = config_files.section(config, "sample")
    scale = settings["guidance"] if settings["guidance"] is not None else sample["guidance"]
    guidance = exact_inverse.Guidance(scale=float(scale), what=sample["guide_what"], annealed=bool(sample["annealed"]),
                                      attn_temp=float(sample["attn_temp"]), rule=sample["rule"])
    exact_inverse.check_guidance(flow, guidance)
    solver = sample["solver"]
    train = config_files.section(flow_config, "flow_train", "train")
    sigma = float(train["noise_std"]) if sample["denoise"] and train["noise"] == "gaussian" else 0.0
    noise_scale, seed = float(sample["noise_scale"]), int(settings["seed"])
    tol, iters = float(sample["jacobi_tol"]), int(sample["jacobi_max_iters"])

    @jax.jit
    def generate(params, index, labels):
        z = noise_scale * _noise(seed, index, (flow.num_tokens, flow.token_dim))
        y = labels if flow.num_classes else None
        return _images(decoder, params, lambda p: exact_inverse.generate(flow, p, z, y, guidance, solver, sigma,
                                                                         tol, iters))

    description = (f"exact inverse ({solver} solver, guidance {guidance.scale:g} {guidance.rule}, noise scale "
                   f"{noise_scale:g}, denoise sigma {sigma:g})")
    return Sampler("exact", description, flow.num_classes, generate)


def biflow_sampler(reverse: Any, flow: Any, config: Any, settings: dict[str, Any], decoder: Any = None) -> Sampler:
    """BiFlow's G in one pass at the trained-in guidance w (biflow.guidance when CFG-trained, unless
    the fid section sets it), plus optional inference-time CFG."""
    trained_w = float(config.biflow.guidance) if config.biflow.get("cfg_training", False) else 0.0
    w = float(settings["guidance"]) if settings["guidance"] is not None else trained_w
    cfg_scale = float(settings["cfg_scale"] or 0.0)
    to_images = one_nfe.token_images(flow.patch_size, flow.img_size, flow.in_channels)
    seed = int(settings["seed"])

    @jax.jit
    def generate(params, index, labels):
        z = _noise(seed, index, (flow.num_tokens, flow.token_dim))
        y = labels if flow.num_classes else None
        return _images(decoder, params, lambda p: one_nfe.one_nfe_sample(reverse, p, z, y, w, to_images=to_images,
                                                                         cfg_scale=cfg_scale or None))

    nfe = 2 if cfg_scale else 1
    description = f"BiFlow {nfe}-NFE (w {w:g}" + (f", inference CFG {cfg_scale:g})" if cfg_scale else ")")
    return Sampler("biflow", description, flow.num_classes, generate)


def sample_batches(first: int, stop: int, batch_size: int, sampler: Sampler, mesh: Mesh
                   ) -> Iterator[tuple[int, dict[str, jax.Array]]]:
    """(count, global {index, label, mask}) for samples first..stop-1 in global batches, padded at the end."""
    local = batch_size // jax.process_count()
    offset = jax.process_index() * local
    batch_sharding = NamedSharding(mesh, P(sharding.AXIS))
    for start in range(first, stop, batch_size):
        index = np.arange(start, start + batch_size, dtype=np.int32)
        labels = np.maximum(sampler.labels(index), 0)  # padded and unconditional rows: any valid label
        part = slice(offset, offset + local)
        batch = {"index": index[part], "label": labels[part], "mask": index[part] < stop}
        yield min(batch_size, stop - start), sharding.to_global(batch, batch_sharding)


# ---------------------------------------------------------------------------
# The evaluator.

class SampleFID:
    """Evaluator: FID, sFID, IS and precision/recall of `train_samples` samples against the reference.

    Stage 1 samples with the exact inverse of the flow inside the trainable params
    (`flow_params`), stage 2 with BiFlow's G. With random Inception weights every figure's
    name starts with `random_inception_`, so no log line can pass for a real FID.
    """

    name = "fid"

    def __init__(self, settings: dict[str, Any], sampler: Sampler, mesh: Mesh,
                 params_of: Callable[[Any], Any] = lambda p: p):
        self.settings, self.sampler, self.mesh, self.params_of = settings, sampler, mesh, params_of
        self.every = int(settings["every"])
        check_settings(settings)
        self.extractor = make_extractor(settings, mesh)  # a missing weights file fails before training starts
        check_feature_space(settings, self.extractor)
        self.reference: tuple[fid.ReferenceBatch, bool] | None = None

    def __call__(self, params: Any) -> dict[str, float]:
        if self.reference is None:
            self.reference = load_reference(self.settings, self.extractor)
        params = self.params_of(params)
        n, parts = int(self.settings["train_samples"]), []
        for _, batch in sample_batches(0, n, int(self.settings["batch_size"]), self.sampler, self.mesh):
            images = self.sampler.generate(params, batch["index"], batch["label"])
            parts.append(self.extractor.of_global(images, batch["mask"]))
        features = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        reference, with_pr = self.reference
        figures = score(features, reference, with_pr, self.settings)
        if not with_pr:
            figures = {k: v for k, v in figures.items() if k not in ("precision", "recall")}
        prefix = "random_inception_" if self.extractor.random else ""
        return {f"{prefix}{k}_{n}" if k == "fid" else f"{prefix}{k}": v for k, v in figures.items()}
