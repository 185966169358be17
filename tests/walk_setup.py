"""What the config walk (tests/test_config_walk.py) runs on: data shaped and labelled as each config's real
dataset, and random networks saved in the formats the configs' weight paths read.

TFDS datasets are `tfds.testing.mock_data` over a `dataset_info.json` written from the builder's own
feature spec (so a dataset without a label feature yields none) with the real split names and tiny
counts; folder datasets are generated image folders; latent datasets are encoded from their source.
"""

from __future__ import annotations

import contextlib
import json
import os

import jax
import numpy as np
from PIL import Image

# The real splits of each TFDS dataset a config names (the builders cannot list them unprepared).
TFDS_SPLITS = {"imagenet2012": ("train", "validation", "test"),
               "downsampled_imagenet/64x64": ("train", "validation")}
EXAMPLES = 8  # per split, for every mocked dataset


def write_tfds_infos(root: str, names: list[str]) -> str:
    """ROOT/<name>/<version>/dataset_info.json (+ features.json) for each TFDS name."""
    import tensorflow_datasets as tfds

    for name in names:
        if name not in TFDS_SPLITS:
            raise KeyError(f"the config walk does not know the splits of TFDS dataset {name!r}: add them to "
                           "tests/walk_setup.py TFDS_SPLITS")
        builder = tfds.builder(name, data_dir=root)
        builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(name=s, shard_lengths=[EXAMPLES],
                                                                          num_bytes=0) for s in TFDS_SPLITS[name]]))
        directory = os.path.join(root, name, str(builder.version))
        os.makedirs(directory, exist_ok=True)
        builder.info.write_to_directory(directory)
    return root


# Image sides: the downsampled set's images are all 64x64 (its feature spec leaves the shape open);
# ImageNet's JPEGs vary in size and aspect (about 500x375 typically), here drawn from 180..320 px.
FIXED_SIDE = {"downsampled_imagenet/64x64": 64}


def _examples(builder, seed: int):
    """Random examples with exactly the builder's features: an image, and a label or file name if it has one."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    features = builder.info.features
    rng = np.random.default_rng(seed)
    signature = {}
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Image):
            signature[key] = tf.TensorSpec((None, None, feature.shape[-1]), tf.uint8)
        elif isinstance(feature, tfds.features.ClassLabel):
            signature[key] = tf.TensorSpec((), tf.int64)
        elif isinstance(feature, tfds.features.Text):
            signature[key] = tf.TensorSpec((), tf.string)
        else:
            raise TypeError(f"the config walk cannot fake feature {key!r} ({type(feature).__name__}) of {builder.name}")

    def generate():
        for i in range(EXAMPLES):
            example = {}
            for key, feature in features.items():
                if isinstance(feature, tfds.features.Image):
                    h, w = (FIXED_SIDE.get(builder.info.full_name.rsplit("/", 1)[0]),) * 2
                    if h is None:
                        h, w = rng.integers(180, 320, 2)
                    example[key] = rng.integers(0, 256, (h, w, feature.shape[-1]), dtype=np.uint8)
                elif isinstance(feature, tfds.features.ClassLabel):
                    example[key] = np.int64(rng.integers(0, feature.num_classes))
                else:
                    example[key] = f"n{i:08d}.JPEG".encode()
            yield example

    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    return ds.apply(tf.data.experimental.assert_cardinality(EXAMPLES))


@contextlib.contextmanager
def mocked_tfds(root: str):
    """TFDS reads random examples of each dataset's own features (real image sizes) from the infos under `root`."""
    import tensorflow_datasets as tfds

    def as_dataset(builder, split, decoders=None, read_config=None, shuffle_files=False):
        return _examples(builder, seed=sum(map(ord, str(split))))

    with tfds.testing.mock_data(num_examples=EXAMPLES, data_dir=root, policy=tfds.testing.MockPolicy.USE_FILES,
                                as_dataset_fn=as_dataset):
        yield


def make_folder(root: str, classes: int, side: int, splits=("train", "test"), per_class: int = 2) -> str:
    """FOLDER/<split>/<class>/*.jpg: `classes` classes of random side x side JPEGs (AFHQ's layout)."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            directory = os.path.join(root, split, f"class{c}")
            os.makedirs(directory, exist_ok=True)
            for i in range(per_class):
                image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                Image.fromarray(image).save(os.path.join(directory, f"{i}.jpg"), quality=90)
    return root


def write_vgg16(path: str) -> str:
    """A random torchvision vgg16 state_dict (its `features.*` tensors; the classifier is never read)."""
    import torch

    from biflow_jax.interop.lpips_weights import vgg16_feature_shapes

    gen = torch.Generator().manual_seed(0)
    torch.save({k: 0.05 * torch.randn(s, generator=gen) for k, s in vgg16_feature_shapes().items()}, path)
    return path


def write_convnext_dir(path: str, seed: int = 0) -> str:
    """A random ConvNeXt-V2 ('tiny-test' sizes) as a transformers save_pretrained directory."""
    from safetensors.numpy import save_file

    from biflow_jax.interop.convnext_weights import transformers_shapes
    from biflow_jax.models.convnext import convnext_config

    cfg = convnext_config("tiny-test")
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    save_file({k: (0.1 * rng.normal(size=s)).astype(np.float32) for k, s in transformers_shapes(cfg).items()},
              os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(model_type="convnextv2", depths=list(cfg.depths), hidden_sizes=list(cfg.hidden_sizes),
                       image_size=32), f)
    return str(path)


def write_dino_dir(path: str) -> str:
    """A random one-layer DINOv2 (width 32, patch 14) saved with transformers' save_pretrained."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1,
                                                               num_attention_heads=2, intermediate_size=64,
                                                               patch_size=14, image_size=224))
    model.save_pretrained(path)
    return path


def write_vae(path: str, levels: int) -> str:
    """A random narrow VAE with `levels` levels (2**(levels-1) downsampling), as a diffusers directory.

    Every tensor perturbed, biases included: with Flax's zero biases, G's zero-initialised output
    (exactly zero latents at step 0) reaches every decoder GroupNorm as a constant input, whose
    Jacobian is 1/sqrt(eps) = 1000; 22 of them in a row overflow float32 and the first stage-2
    gradient is NaN. A trained VAE (sd-vae-ft-ema) has non-zero biases and never sees that.
    """
    from helpers.params import perturbed

    from biflow_jax.interop.vae_weights import save_vae
    from biflow_jax.models.vae import AutoencoderKL, vae_config

    cfg = vae_config("tiny", block_out_channels=(8,) * levels, sample_size=16)
    params = perturbed(AutoencoderKL(cfg).init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))["params"])
    save_vae(path, cfg, params)
    return path
