"""Stage 2's perceptual terms: paired crops, frozen networks, the weights and the adaptive formula.

Tiny random networks only (ConvNeXt-V2 'tiny-test', a 1-layer DINOv2, VGG16 at 32 px), so
the file stays well under a minute.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biflow_jax import runs
from biflow_jax.errors import ConfigError
from biflow_jax.interop.convnext_weights import transformers_shapes
from biflow_jax.models import registry
from biflow_jax.models.convnext import ConvNeXtV2, convnext_config
from biflow_jax.models.dino import DinoConfig, Dinov2
from biflow_jax.models.vgg import LPIPS
from biflow_jax.modes import train
from biflow_jax.objectives import biflow, perceptual
from configs import digits, imagenet64

torch = pytest.importorskip("torch")


def affine_pair(n=6, h=40, w=36, seed=0):
    """Real images and 'generated' ones = 2 * real + 1: equal crops keep the relation exactly."""
    real = np.random.default_rng(seed).uniform(-1, 1, (n, h, w, 3)).astype(np.float32)
    return jnp.asarray(2 * real + 1), jnp.asarray(real)


def test_crops_share_one_box_per_pair_and_match_torchvision_crop_then_resize():
    generated, real = affine_pair()
    keys = jax.random.split(jax.random.key(0), generated.shape[0])
    fake, ref = jax.jit(perceptual.paired_random_resized_crops, static_argnums=3)(keys, generated, real, 24)
    assert fake.shape == ref.shape == (6, 24, 24, 3)
    # Same box for both images of a pair: the affine relation survives; a different box would break it.
    np.testing.assert_allclose(np.asarray(fake), 2 * np.asarray(ref) + 1, atol=2e-5)
    # Different pairs get different boxes.
    boxes = np.asarray(perceptual.sample_crop_boxes(keys, 40, 36))
    assert len({tuple(b) for b in boxes}) == len(boxes)
    # Each crop is torch's crop-then-F.interpolate(bicubic, antialias=True) of its box.
    for i, (top, left, h, w) in enumerate(boxes.astype(int)):
        x = torch.from_numpy(np.array(real[i:i + 1, top:top + h, left:left + w]).transpose(0, 3, 1, 2))
        want = torch.nn.functional.interpolate(x, size=(24, 24), mode="bicubic", antialias=True, align_corners=False)
        np.testing.assert_allclose(np.asarray(ref[i]), want[0].numpy().transpose(1, 2, 0), atol=2e-5)


def test_crop_boxes_follow_scale_and_ratio_and_stay_inside():
    """Inside the image, and distributed as torchvision's RandomResizedCrop.get_params draws them."""
    from torch_reference import torchvision

    boxes = np.asarray(perceptual.sample_crop_boxes(jax.random.split(jax.random.key(1), 4000), 64, 48))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 48).all()
    assert (w / h).min() > 0.7 and (w / h).max() < 1.4  # 3/4 .. 4/3 up to rounding
    get_params = torchvision().transforms.RandomResizedCrop.get_params
    torch.manual_seed(0)
    ref = np.array([get_params(torch.zeros(1, 64, 48), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)], np.float32)
    for ours, theirs in [(h * w, ref[:, 2] * ref[:, 3]), (w / h, ref[:, 3] / ref[:, 2]), (top, ref[:, 0])]:
        assert abs(ours.mean() - theirs.mean()) < 4 * theirs.std() * (2 / 4000) ** 0.5  # 4 s.e. of the difference
    assert (h * w / (64 * 48)).min() > 0.06


def test_lpips_distance_equals_the_lpips_module():
    """The split (real image outside the gradient) computation is LPIPS().apply's distance."""
    a, b = affine_pair(3, 32, 32)
    a = jnp.tanh(a)
    params = LPIPS().init(jax.random.key(0), a, b)["params"]
    params = {**params, **{f"lin{k}": {"kernel": jax.random.uniform(jax.random.key(k), params[f"lin{k}"]["kernel"]
                                                                    .shape)} for k in range(5)}}
    want = LPIPS().apply({"params": params}, a, b)
    got = jax.jit(perceptual.lpips_distance())(params, a, b)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)


def pixel_mse(params, generated, real):
    """A toy distance with a param, so weight/formula tests need no network."""
    return params["scale"] * jnp.mean(jnp.square(generated - real), axis=(1, 2, 3))


def test_term_weights_and_adaptive_weight_follow_the_formula():
    generated, real = affine_pair(4, 16, 16)
    generated = 0.3 * generated
    keys = jax.random.split(jax.random.key(2), 4)
    params = {"a": {"scale": jnp.float32(1.0)}, "b": {"scale": jnp.float32(3.0)}}
    terms = (perceptual.Term("a", 0.4, pixel_mse), perceptual.Term("b", 0.1, pixel_mse))
    fake, ref = perceptual.paired_random_resized_crops(keys, generated, real, 16)
    d = np.asarray(pixel_mse({"scale": 1.0}, fake, ref), np.float64)  # term b's distance is 3 d

    plain = perceptual.PerceptualLoss(terms, crop_size=16)
    total, metrics = plain(params, generated, real, keys)
    assert float(total) == pytest.approx(0.4 * d.mean() + 0.1 * 3 * d.mean(), rel=1e-5)
    assert float(metrics["perceptual_a"]) == pytest.approx(d.mean(), rel=1e-5)
    assert float(metrics["perceptual_b"]) == pytest.approx(3 * d.mean(), rel=1e-5)
    doubled = perceptual.PerceptualLoss((perceptual.Term("a", 0.8, pixel_mse), terms[1]), crop_size=16)
    assert float(doubled(params, generated, real, keys)[0] - total) == pytest.approx(0.4 * d.mean(), rel=1e-5)

    p, c = 0.5, 0.05
    adaptive = perceptual.PerceptualLoss(terms, crop_size=16, weighting=lambda x: biflow.adaptive_weight(x, p, c))
    total, _ = adaptive(params, generated, real, keys)
    # Value: d * (d + c)^-p, per sample, averaged, weighted.
    want = 0.4 * np.mean(d * (d + c) ** -p) + 0.1 * np.mean(3 * d * (3 * d + c) ** -p)
    assert float(total) == pytest.approx(want, rel=1e-5)
    # Gradient: (d + c)^-p * grad d (the weight is a constant): rescaling by the frozen factor.
    grad = jax.grad(lambda g: adaptive(params, g, real, keys)[0])(generated)
    plain_a = perceptual.PerceptualLoss(terms[:1], crop_size=16)  # 0.4 * mean(d): sample i gets 0.4/N grad d_i
    grad_plain = jax.grad(lambda g: plain_a(params, g, real, keys)[0])(generated)
    factors = (d + c) ** -p + 0.1 / 0.4 * 3 * (3 * d + c) ** -p
    np.testing.assert_allclose(np.asarray(grad), factors[:, None, None, None] * np.asarray(grad_plain),
                               rtol=2e-4, atol=1e-8)


def tiny_networks(crop: int = 32):
    """Random tiny ConvNeXt-V2 and DINOv2 terms with their params."""
    convnext = ConvNeXtV2(convnext_config("tiny-test"))
    x = jnp.zeros((1, crop, crop, 3))
    convnext_params = convnext.init(jax.random.key(3), x)["params"]
    dino = Dinov2(DinoConfig(hidden_size=32, num_layers=1, num_heads=2, patch_size=14, image_size=28))
    dino_params = dino.init(jax.random.key(4), x)["params"]
    terms = (perceptual.Term("convnext", 0.1, perceptual.convnext_distance(convnext)),
             perceptual.Term("dino", 0.2, perceptual.dino_distance(dino)))
    return terms, {"convnext": convnext_params, "dino": dino_params}


def test_gradients_reach_g_through_a_frozen_decoder_and_never_the_frozen_networks():
    """With remat on (jax.checkpoint around each network); the stage-2 test runs without it."""
    terms, net_params = tiny_networks()
    loss_fn = perceptual.PerceptualLoss(terms, crop_size=32, remat=True,
                                        weighting=lambda d: biflow.adaptive_weight(d, 1.0, 0.01))
    tokens_in = jax.random.normal(jax.random.key(5), (2, 16, 8))
    real = jnp.tanh(jax.random.normal(jax.random.key(6), (2, 16, 16, 3)))
    keys = jax.random.split(jax.random.key(7), 2)

    def image_fn(tokens, frozen):  # a frozen linear "decoder": 16 tokens of 8 -> 16x16x3 image
        return jnp.tanh((tokens @ frozen["decoder"]).reshape(2, 16, 16, 3))

    def loss(g_params, frozen):
        images = image_fn(tokens_in @ g_params, frozen)
        return loss_fn(frozen["perceptual"], images, real, keys)[0]

    g_params = jax.random.normal(jax.random.key(8), (8, 8)) * 0.3
    frozen = {"decoder": jax.random.normal(jax.random.key(9), (8, 48)) * 0.3, "perceptual": net_params}
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))
    g_grad, frozen_grad = grads(g_params, frozen)
    assert np.isfinite(np.asarray(g_grad)).all() and float(jnp.abs(g_grad).max()) > 1e-6
    # The networks' params are behind stop_gradient: a gradient asked for them is exactly zero.
    assert all(float(jnp.abs(leaf).max()) == 0 for leaf in jax.tree_util.tree_leaves(frozen_grad["perceptual"]))
    # G's gradient flows through the decoder: a zero decoder passes none.
    dead = {**frozen, "decoder": jnp.zeros_like(frozen["decoder"])}
    assert float(jnp.abs(grads(g_params, dead)[0]).max()) == 0


def write_convnext_dir(path, seed=0):
    from safetensors.numpy import save_file

    cfg = convnext_config("tiny-test")
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    save_file({k: (0.1 * rng.normal(size=s)).astype(np.float32) for k, s in transformers_shapes(cfg).items()},
              os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(model_type="convnextv2", depths=list(cfg.depths), hidden_sizes=list(cfg.hidden_sizes),
                       image_size=32), f)
    return str(path)


def test_stage2_adds_the_term_with_the_network_frozen_not_trained(tmp_path):
    config = digits.get_config("quick")
    config.model.update(num_blocks=2, layers_per_block=1)
    config.biflow.model.update(depth=3, width=32, heads=2)
    config.biflow.perceptual.convnext.update(weight=0.1, path=write_convnext_dir(tmp_path / "convnext"))
    config.biflow.perceptual.crop_size = 32
    biflow.validate(config)
    model = registry.build_flow(config.model)
    flow_params = jax.jit(model.init)(jax.random.key(1), *registry.flow_example_inputs(config.model))
    flow_run = runs.FlowRun("in-memory", config, model, flow_params, 0)
    objective = biflow.make(config, flow_run)
    assert set(objective.frozen) == {"flow", "perceptual"} and set(objective.frozen["perceptual"]) == {"convnext"}
    params = objective.init(jax.random.key(0))
    trainable = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    assert not any("stages_" in k or "grn" in k for k in trainable)  # no ConvNeXt tensor is trainable
    batch = {"image": jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1)), jnp.uint8),
             "label": jnp.arange(4, dtype=jnp.int32)}
    (total, metrics), grads = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))(
        params, batch, jax.random.key(1), jnp.arange(4), objective.frozen)
    assert float(metrics["perceptual_convnext"]) > 0
    # The term's adaptive value d/(d + c) < 1 is added to the MSE terms: total - mse parts in (0, 0.1).
    config.biflow.perceptual.convnext.weight = 0.0
    plain = biflow.make(config, flow_run)
    assert "perceptual" not in plain.frozen
    plain_total, _ = jax.jit(plain.loss)(params, batch, jax.random.key(1), jnp.arange(4), plain.frozen)
    assert 0 < float(total - plain_total) < 0.1
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


def test_missing_weights_stop_stage2_at_start_naming_each_file(tmp_path):
    config = digits.get_config("quick")
    config.biflow.perceptual.lpips.update(weight=0.4, vgg16_path=str(tmp_path / "vgg16-397923af.pth"))
    config.biflow.perceptual.convnext.update(weight=0.1, path="")
    workdir = tmp_path / "run"
    with pytest.raises(FileNotFoundError) as info:
        train.train_and_evaluate(config, str(workdir))
    message = str(info.value)
    assert "vgg16-397923af.pth" in message and "biflow.perceptual.convnext.path is empty" in message
    assert not workdir.exists()
    # The paper config turns both on with empty paths: its stage 2 names both files to give.
    paper = imagenet64.get_config()
    with pytest.raises(FileNotFoundError, match="lpips.vgg16_path is empty.*convnext.path is empty"):
        biflow.validate(paper)
    assert paper.model.clip == 4.0 and digits.get_config().biflow.perceptual.lpips.weight == 0


def test_convnext_input_is_imagenet_normalised_or_left_in_minus_one_one():
    """normalize='imagenet' feeds ((x + 1) / 2 - mean) / std (ImageNet statistics); 'none' feeds the
    [-1, 1] crops unchanged (pMF's choice); a third value is a config error. The network is a
    stand-in that returns its input flattened, so the distance shows exactly what it was fed."""
    identity = SimpleNamespace(apply=lambda variables, x: x.reshape(x.shape[0], -1))
    generated, real = affine_pair(2, 8, 8)
    generated = jnp.tanh(generated)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

    def want(prepare):
        g, r = (prepare(np.asarray(x, np.float64)) for x in (generated, real))
        return np.sum((g - r).reshape(2, -1) ** 2, axis=-1)

    imagenet = perceptual.convnext_distance(identity)({}, generated, real)
    none = perceptual.convnext_distance(identity, "none")({}, generated, real)
    np.testing.assert_allclose(np.asarray(imagenet), want(lambda x: ((x + 1) / 2 - mean) / std), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(none), want(lambda x: x), rtol=1e-5)
    assert np.abs(np.asarray(imagenet) - np.asarray(none)).min() > 0.1 * np.asarray(none).min()
    config = digits.get_config("quick")
    assert config.biflow.perceptual.convnext.normalize == "imagenet"
    config.biflow.perceptual.convnext.normalize = "pmf"
    with pytest.raises(ConfigError, match=r"convnext.normalize='pmf' must be one of \('imagenet', 'none'\)"):
        perceptual.validate(config.biflow.perceptual)


def test_chunked_terms_equal_the_whole_batch_in_value_and_gradient():
    """perceptual.in_chunks (lax.map of checkpointed chunks) against the plain per-sample function, float64."""
    from biflow_jax.objectives.perceptual import in_chunks

    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((8, 5, 3)))
        w = jnp.asarray(rng.standard_normal((3, 4)))
        keys = jnp.arange(8)

        def per_sample(tokens, scale, k):
            h = jnp.tanh(tokens @ w) * (1.0 + scale[:, None, None] + 0.1 * k[:, None, None])
            return {"a": jnp.sum(h ** 2, axis=(1, 2)), "b": jnp.mean(h, axis=(1, 2))}

        scale = jnp.asarray(rng.standard_normal(8))

        def loss(tokens, chunk):
            out = in_chunks(per_sample, chunk, tokens, scale, keys)
            return jnp.sum(out["a"] * jnp.arange(8)) + jnp.sum(out["b"])

        whole, chunked = per_sample(x, scale, keys), in_chunks(per_sample, 2, x, scale, keys)
        for name in ("a", "b"):
            np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(jax.grad(loss)(x, 2), jax.grad(loss)(x, 0), rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="biflow.perceptual.chunk=3 must divide the per-device batch 8"):
            in_chunks(per_sample, 3, x, scale, keys)
