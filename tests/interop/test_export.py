"""Export to PyTorch and import from ml-tarflow: both frameworks must compute the same flow.

Every weight is randomised (proj_out included, which is zero at init) so that a wrong
transpose, head split, token order, flip or clip shows up in the numbers. "Close" means
max |got - want| <= 1e-5 * max |want| (float32 on both sides, highest matmul precision).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import helpers.params  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import biflow_jax.torch as torch_port  # noqa: E402
from biflow_jax import config_files, runs  # noqa: E402
from biflow_jax.interop import export_files as export  # noqa: E402
from biflow_jax.interop.tarflow_layout import (  # noqa: E402
    flow_params_to_state_dict,
    state_dict_layout,
    state_dict_to_flow_params,
)
from biflow_jax.models.registry import build_flow  # noqa: E402
from biflow_jax.models.tarflow import TARFlow, unpatchify  # noqa: E402
from biflow_jax.modes import import_torch  # noqa: E402

torch.set_default_dtype(torch.float32)

REL_TOL = 1e-5
# name -> (num_classes, clip, layers_per_block, proj_out scale): the clipped case has a larger
# proj_out so that tanh saturates (checked below); larger scales make the inverse overflow.
CASES = {"conditional": (10, 0.0, 2, 0.1), "unconditional_clipped": (0, 0.3, 1, 0.5)}


def assert_close(got, want, rel: float = REL_TOL) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert err <= rel * scale, f"max abs error {err:.3g} exceeds {rel} * {scale:.3g}"


def make_config(num_classes: int, clip: float, layers: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "model": {"img_size": 8, "in_channels": 1, "patch_size": 2, "channels": 64, "num_blocks": 2,
                  "layers_per_block": layers, "num_classes": num_classes, "head_dim": 32, "expansion": 4,
                  "clip": clip, "dtype": "float32"},
        "train": {"noise": "gaussian", "noise_std": 0.05},
    })


def random_params(model: TARFlow, seed: int, out_scale: float):
    """Params of the model's exact tree, every leaf random at a scale for its role, proj_out's times
    `out_scale`; shapes from `eval_shape`: an eager `model.init` costs seconds."""
    labels = jnp.zeros((1,), jnp.int32) if model.num_classes else None
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), labels)
    return helpers.params.random_params(shapes, seed, {"proj_out": out_scale})


@pytest.fixture(scope="module", params=list(CASES))
def flow(request, tmp_path_factory):
    """(config, JAX model, params, exported PyTorch model, export dir) for one case."""
    num_classes, clip, layers, out_scale = CASES[request.param]
    config = make_config(num_classes, clip, layers)
    model = build_flow(config.model)
    params = random_params(model, seed=1, out_scale=out_scale)
    out_dir = str(tmp_path_factory.mktemp("export"))
    export.export_flow(config, params, out_dir)
    loaded = torch_port.load(out_dir)
    return config, model, params, loaded["forward"], out_dir


def example_batch(num_classes: int):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
    y = np.array([3, -1, 9, 0]) if num_classes else None  # -1: a dropped label
    return x, y


def as_torch(x_nhwc: np.ndarray, y):
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    return x, (torch.from_numpy(y) if y is not None else None)


def test_forward_matches_jax(flow):
    config, model, params, torch_model, _ = flow
    x, y = example_batch(config.model.num_classes)
    with jax.default_matmul_precision("highest"):
        out = jax.jit(model.apply)(params, jnp.asarray(x), None if y is None else jnp.asarray(y))
        loss = 0.5 * jnp.mean(out.z**2) - jnp.mean(out.logdets.sum(axis=1))
    with torch.no_grad():
        z, outputs, logdets = torch_model(*as_torch(x, y))
        torch_loss = torch_model.get_loss(z, logdets)
    assert_close(z.numpy(), out.z)
    assert len(outputs) == config.model.num_blocks
    for got, want in zip(outputs, out.trajectory[1:]):
        assert_close(got.numpy(), want)
    assert_close(logdets.numpy(), out.logdets.sum(axis=1))
    assert abs(float(torch_loss) - float(loss)) <= REL_TOL * abs(float(loss))
    assert float(jnp.abs(out.logdets).max()) > 0.05  # the randomised flow is far from identity
    if config.model.clip:  # the clip is active: without it the PyTorch flow would differ
        for block in torch_model.blocks:
            block.clip = 0.0
        try:
            with torch.no_grad():
                unclipped = torch_model(*as_torch(x, y))[0]
        finally:
            for block in torch_model.blocks:
                block.clip = config.model.clip
        assert float((unclipped - z).abs().max()) > 1e-2


def jax_inverse(model: TARFlow, params, z, y, guidance=0.0, guide_what="ab", attn_temp=1.0, annealed=False):
    """Our JAX exact inverse: the project's cached sampler, or (until it exists) a naive one."""
    try:
        from biflow_jax.samplers.exact_inverse import Guidance, inverse_cached
    except ImportError:
        return naive_inverse(model, params, z, y, guidance, guide_what, attn_temp, annealed)
    setting = Guidance(scale=guidance, what=guide_what, annealed=annealed, attn_temp=attn_temp)
    return inverse_cached(model, params, z, y, setting)


def naive_inverse(model: TARFlow, params, z, y, guidance, guide_what, attn_temp, annealed):
    """The textbook inverse: recompute the full block transform for every token (no cache)."""
    transform = jax.jit(
        lambda p, i, xp, labels, temp: model.apply(p, i, xp, labels, temp, method=TARFlow.block_transform),
        static_argnums=1)
    n, t, _ = z.shape
    dropped = jnp.full((n,), -1, jnp.int32)
    x = z
    for i in reversed(range(model.num_blocks)):
        xp = x[:, ::-1] if i % 2 else x
        for s in range(t - 1):
            a, b, _ = transform(params, i, xp, y, 1.0)
            if guidance:
                a_u, b_u, _ = transform(params, i, xp, dropped, attn_temp)
                g = (s + 1) / (t - 1) * guidance if annealed else guidance
                a = a + g * (a - a_u) if "a" in guide_what else a
                b = b + g * (b - b_u) if "b" in guide_what else b
            xp = xp.at[:, s + 1].set(xp[:, s + 1] * jnp.exp(a[:, s + 1]) + b[:, s + 1])
        x = xp[:, ::-1] if i % 2 else xp
    return x


def test_reverse_matches_jax_inverse(flow):
    """Same noise, same labels and guidance: the PyTorch KV-cached reverse equals our JAX inverse."""
    config, model, params, torch_model, _ = flow
    x, y = example_batch(config.model.num_classes)
    z = np.random.default_rng(1).normal(size=(4, 16, 4)).astype(np.float32)
    settings = [dict(guidance=0.0, guide_what="ab", attn_temp=1.0, annealed=False)]
    if config.model.num_classes:
        settings.append(dict(guidance=1.5, guide_what="ab", attn_temp=1.3, annealed=True))
    y_torch = as_torch(x, y)[1]
    for setting in settings:
        with jax.default_matmul_precision("highest"):
            tokens = jax_inverse(model, params, jnp.asarray(z), None if y is None else jnp.asarray(y), **setting)
        got = torch_model.reverse(torch.from_numpy(z), y_torch, guidance=setting["guidance"],
                                  guide_what=setting["guide_what"], attn_temp=setting["attn_temp"],
                                  annealed_guidance=setting["annealed"])
        assert_close(got.numpy().transpose(0, 2, 3, 1), unpatchify(tokens, 2, 8, 8, 1))

    # The torch inverse undoes the torch forward.
    with torch.no_grad():
        x_t, y_t = as_torch(x, y)
        recovered = torch_model.reverse(torch_model(x_t, y_t)[0], y_t)
    np.testing.assert_allclose(recovered.numpy(), x_t.numpy(), atol=1e-4)


def test_names_match_ml_tarflow_layout_and_round_trip_exactly(flow):
    config, _, params, _, _ = flow
    state_dict = flow_params_to_state_dict(params, config.model)
    reference = torch_port.Model.from_config(export.forward_config(config)).state_dict()
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert state_dict["blocks.0.attn_blocks.0.attention.qkv.weight"].shape == (192, 64)  # (out, in)
    assert ("blocks.1.class_embed" in state_dict) == bool(config.model.num_classes)
    np.testing.assert_array_equal(state_dict["blocks.1.attn_mask"], np.tril(np.ones((16, 16))))
    np.testing.assert_array_equal(state_dict["var"], np.ones((16, 4)))

    back = state_dict_to_flow_params(state_dict, config.model)
    want, got = jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_flatten_with_path(back)[0]
    assert [p for p, _ in want] == [p for p, _ in got]
    for (path, w), (_, g) in zip(want, got):
        assert g.dtype == np.float32
        np.testing.assert_array_equal(g, np.asarray(w), err_msg=jax.tree_util.keystr(path))  # exact

    # bfloat16 params export as (exactly widened) float32.
    bf16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
    widened = flow_params_to_state_dict(bf16, config.model)["blocks.0.proj_in.weight"]
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(widened, np.asarray(bf16["params"]["blocks_0"]["proj_in"]["kernel"],
                                                      np.float32).T)


def test_export_writes_weights_and_config(flow):
    config, _, _, _, out_dir = flow
    assert sorted(os.listdir(out_dir)) == ["forward.safetensors", "forward_config.json"]
    weights = load_file(os.path.join(out_dir, "forward.safetensors"))
    assert set(weights) == set(state_dict_layout(config.model))
    assert all(w.dtype == np.float32 for w in weights.values())
    with open(os.path.join(out_dir, "forward_config.json")) as f:
        saved = json.load(f)
    m = config.model
    assert saved == {"in_channels": 1, "img_size": 8, "patch_size": 2, "channels": 64, "num_blocks": 2,
                     "layers_per_block": m.layers_per_block, "nvp": True, "num_classes": m.num_classes,
                     "head_dim": 32, "expansion": 4, "clip": m.clip, "noise_type": "gaussian",
                     "noise_std": 0.05, "trained_dtype": "float32"}


@pytest.fixture
def save_calls(monkeypatch):
    """Record calls to runs.save_flow instead of writing."""
    calls = []
    monkeypatch.setattr(runs, "save_flow", lambda *args: calls.append(args))
    return calls


def _conditional():
    config = make_config(10, 0.0, 1)
    return config, random_params(build_flow(config.model), seed=4, out_scale=0.3)


@pytest.mark.parametrize("damage,key", [
    ("missing", "blocks.1.attn_blocks.0.mlp.main.2.bias"),
    ("extra", "blocks.2.proj_in.weight"),
    ("shape", "blocks.0.attn_blocks.0.attention.qkv.weight"),
    ("mask", "blocks.1.attn_mask"),
])
def test_import_rejects_bad_state_dict_and_writes_nothing(damage, key, save_calls, tmp_path):
    config, params = _conditional()
    state_dict = flow_params_to_state_dict(params, config.model)
    if damage == "missing":
        del state_dict[key]
    elif damage == "extra":
        state_dict[key] = np.zeros((64, 4), np.float32)
    elif damage == "shape":
        state_dict[key] = state_dict[key].T
    else:
        state_dict[key] = np.ones((16, 16), np.float32)
    workdir = str(tmp_path / "imported")
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as info:
        import_torch.import_state_dict(state_dict, config, workdir)
    if damage == "shape":
        assert "(192, 64)" in str(info.value) and "(64, 192)" in str(info.value)
    assert save_calls == []
    assert not os.path.exists(workdir)


def test_import_rejects_config_mismatch_and_nonempty_workdir(save_calls, tmp_path):
    config, params = _conditional()
    state_dict = flow_params_to_state_dict(params, config.model)
    unconditional = make_config(0, 0.0, 1)
    with pytest.raises(ValueError, match=r"blocks\.0\.class_embed"):
        import_torch.import_state_dict(state_dict, unconditional, str(tmp_path / "a"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "something").write_text("x")
    with pytest.raises(FileExistsError):
        import_torch.import_state_dict(state_dict, config, str(tmp_path / "busy"))
    assert save_calls == []


def test_import_of_wrapped_ddp_pth_saves_the_exact_params(save_calls, tmp_path):
    config, params = _conditional()
    state_dict = flow_params_to_state_dict(params, config.model)
    path = str(tmp_path / "ckpt.pth")
    torch.save({"model": {f"module.{k}": torch.from_numpy(v) for k, v in state_dict.items()}, "step": 7}, path)
    workdir = str(tmp_path / "imported")
    import_torch.import_state_dict(import_torch.load_torch_checkpoint(path), config, workdir)
    assert len(save_calls) == 1
    saved_workdir, saved_config, saved_params = save_calls[0]
    assert saved_workdir == workdir and saved_config is config
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)),
                           saved_params, params)


def test_import_then_load_flow_end_to_end(tmp_path):
    """The imported workdir loads back (runs.load_flow) to the same params."""
    digits = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs", "digits.py")
    config = config_files.load(f"{digits}:quick")
    config.model.update(num_blocks=2, layers_per_block=1, head_dim=32)
    params = random_params(build_flow(config.model), seed=5, out_scale=0.3)
    workdir = str(tmp_path / "imported")
    import_torch.import_state_dict(flow_params_to_state_dict(params, config.model), config, workdir)
    loaded = runs.load_flow(workdir, ema=True).params
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)),
                           loaded, params)


def test_load_picks_up_every_exported_part(flow, tmp_path, monkeypatch):
    """The hook for the reverse model: any part with {part}.safetensors + config is rebuilt."""
    config, _, _, torch_model, out_dir = flow
    for name in os.listdir(out_dir):
        data = open(os.path.join(out_dir, name), "rb").read()
        (tmp_path / name).write_bytes(data)
        (tmp_path / name.replace("forward", "reverse")).write_bytes(data)
    with pytest.raises(NotImplementedError, match="reverse"):
        monkeypatch.setitem(torch_port.PARTS, "reverse", "biflow_jax.torch.no_such_port:Model")
        torch_port.load(str(tmp_path))
    monkeypatch.setitem(torch_port.PARTS, "reverse", "biflow_jax.torch.tarflow:Model")  # a stand-in port
    loaded = torch_port.load(str(tmp_path))
    assert set(loaded) == {"forward", "forward_config", "reverse", "reverse_config"}
    assert not loaded["reverse"].training
    x = torch.zeros(1, 1, 8, 8)
    y = torch.zeros(1, dtype=torch.long) if config.model.num_classes else None
    with torch.no_grad():
        assert torch.equal(loaded["reverse"](x, y)[0], torch_model(x, y)[0])
