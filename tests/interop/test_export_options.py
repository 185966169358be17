"""Export of a flow with the improved-flow options (RoPE, RMSNorm, QK-norm, SwiGLU, per-block layers).

ml-tarflow has none of these options, so the default flow must keep its exact layout while an
option flow gets its own keys, a note, and still computes the same z in PyTorch as in Flax
(STARFlow arXiv:2506.06276 for the deep-shallow block schedule). Every weight is random
(proj_out included) so a wrong rotation pairing, flip of the RoPE positions, norm kind or
gate/up split shows up in the numbers.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import helpers.params  # noqa: E402
from safetensors import safe_open  # noqa: E402

import biflow_jax.torch as torch_port  # noqa: E402
from biflow_jax.interop import export_files  # noqa: E402
from biflow_jax.interop.tarflow_layout import (  # noqa: E402
    flow_params_to_state_dict,
    ml_tarflow_compatible,
    state_dict_layout,
    state_dict_to_flow_params,
)
from biflow_jax.models.tarflow import build_flow  # noqa: E402
from biflow_jax.modes import export as export_mode  # noqa: E402
from biflow_jax.modes import import_torch  # noqa: E402
from biflow_jax.torch import tarflow as torch_tarflow  # noqa: E402

# Each option alone, then all of them together (the deep block last in forward order, as STARFlow).
OPTIONS = {
    "rope": {"rope": True},
    "rmsnorm": {"norm": "rmsnorm"},
    "qk_norm": {"qk_norm": True},
    "swiglu": {"mlp": "swiglu"},
    "block_layers": {"block_layers": (1, 2)},
    "starflow": {"mlp": "geglu_starflow", "clip": 0.1, "clip_shift": True},  # STARFlow's gated MLP and clip
    "all": {"rope": True, "norm": "rmsnorm", "qk_norm": True, "mlp": "swiglu", "block_layers": (1, 2)},
}
LACKS = {"rope": ["rope"], "rmsnorm": ["rmsnorm"], "qk_norm": ["qk_norm"], "swiglu": ["swiglu"],
         "block_layers": ["block_layers=[1, 2]"], "starflow": ["geglu_starflow", "clip_shift"],
         "all": ["rope", "rmsnorm", "qk_norm", "swiglu", "block_layers=[1, 2]"]}


def model_config(**options) -> dict:
    """A tiny flow: 8x8x1 images, patch 2 (a 4x4 grid), 2 heads of 16, 2 blocks, 10 classes."""
    return {"img_size": 8, "in_channels": 1, "patch_size": 2, "channels": 32, "num_blocks": 2,
            "layers_per_block": 1, "num_classes": 10, "head_dim": 16, "expansion": 4, "clip": 0.0,
            "dtype": "float32", **options}


def config(**options) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"model": model_config(**options),
                                      "train": {"noise": "gaussian", "noise_std": 0.05}})


# The torch side alone: layout, positions, and the PyTorch model's own inverse.

def test_default_layout_is_exactly_ml_tarflows():
    """Option keys at their defaults, or absent (an older config), give today's key set."""
    block = ["proj_in.weight", "proj_in.bias", "pos_embed", "class_embed"]
    layer = [f"{module}.{kind}" for module in ("attention.norm", "attention.qkv", "attention.proj", "mlp.norm",
                                               "mlp.main.0", "mlp.main.2") for kind in ("weight", "bias")]
    want = {f"blocks.{i}.{name}" for i in range(2) for name in block + ["proj_out.weight", "proj_out.bias",
                                                                       "attn_mask"]}
    want |= {f"blocks.{i}.attn_blocks.0.{name}" for i in range(2) for name in layer}
    want.add("var")
    older = model_config()
    explicit = model_config(rope=False, norm="layernorm", qk_norm=False, mlp="gelu", block_layers=(1, 1))
    for cfg in (older, explicit):
        assert set(state_dict_layout(cfg)) == want
        assert ml_tarflow_compatible(cfg)
        assert set(torch_tarflow.Model.from_config(cfg).state_dict()) == want


@pytest.mark.parametrize("name", list(OPTIONS))
def test_layout_matches_the_torch_model(name):
    cfg = model_config(**OPTIONS[name])
    layout = {key: spec.shape for key, spec in state_dict_layout(cfg).items()}
    torch_model = torch_tarflow.Model.from_config(cfg)
    assert layout == {key: tuple(value.shape) for key, value in torch_model.state_dict().items()}
    assert not ml_tarflow_compatible(cfg)
    assert ("blocks.0.pos_embed" in layout) == (not cfg.get("rope", False))
    if cfg.get("qk_norm"):
        assert layout["blocks.1.attn_blocks.0.attention.k_norm.weight"] == (16,)  # one (head_dim,) norm
    if cfg.get("mlp") == "swiglu":  # 2 * 4 * 32 / 3 = 85.3, rounded up to a multiple of 8
        assert layout["blocks.0.attn_blocks.0.mlp.gate_up.weight"] == (2 * 88, 32)
        assert layout["blocks.0.attn_blocks.0.mlp.down.weight"] == (32, 88)
    if cfg.get("mlp") == "geglu_starflow":  # ml-starflow's names and hidden C * expansion
        assert layout["blocks.0.attn_blocks.0.mlp.gate_proj.weight"] == (128, 32)
        assert layout["blocks.0.attn_blocks.0.mlp.up_proj.weight"] == (128, 32)
        assert layout["blocks.0.attn_blocks.0.mlp.down_proj.weight"] == (32, 128)
    if cfg.get("norm") == "rmsnorm":
        assert not any(key.endswith("norm.bias") for key in layout)
    layers = [len({k.split(".")[3] for k in layout if k.startswith(f"blocks.{i}.attn_blocks.")}) for i in range(2)]
    assert layers == list(cfg.get("block_layers") or (1, 1))


def test_rope_follows_the_spec_pair_by_pair():
    """Naive per-pair rotation: the first half of a head by the row, the second by the column,
    pairs (i, i + m/2) within each half of m = d/2; a flipped block keeps raster positions."""
    d, grid = 16, 4
    m, half = d // 2, d // 4
    x = torch.randn(1, 2, grid * grid, d, generator=torch.Generator().manual_seed(0))
    for flip in (False, True):
        positions = torch_tarflow.rope_positions(grid, flip)
        got = torch_tarflow.apply_rope(x, *torch_tarflow.rope_tables(positions, d))
        want = x.clone().double()
        for j in range(grid * grid):
            raster = grid * grid - 1 - j if flip else j
            for offset, pos in ((0, raster // grid), (m, raster % grid)):
                for i in range(half):
                    angle = pos * 10000.0 ** (-i / half)
                    a, b = x[..., j, offset + i].double(), x[..., j, offset + i + half].double()
                    want[..., j, offset + i] = a * math.cos(angle) - b * math.sin(angle)
                    want[..., j, offset + i + half] = b * math.cos(angle) + a * math.sin(angle)
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)


def test_import_of_an_ml_tarflow_checkpoint_into_an_option_config_fails_clearly(tmp_path):
    state = torch_tarflow.Model.from_config(model_config()).state_dict()
    with pytest.raises(ValueError, match=r"does not match the config.*uses rope, swiglu"):
        import_torch.import_state_dict(state, config(rope=True, mlp="swiglu"), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# Flax -> export -> PyTorch: the same flow on both sides.

def random_params(model, seed: int):
    """Every leaf of the model's exact tree random at a scale that suits its role (proj_out's small)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
    return helpers.params.random_params(shapes, seed, {"proj_out": 0.1})


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_flow_exports_and_matches_flax(name, tmp_path):
    cfg = config(**OPTIONS[name])
    model = build_flow(cfg.model)
    params = random_params(model, seed=3)
    out_dir = str(tmp_path / "export")
    export_files.export_flow(cfg, params, out_dir)

    with open(os.path.join(out_dir, export_files.FORWARD_CONFIG)) as f:
        saved = json.load(f)
    assert saved["ml_tarflow_compatible"] is False
    assert {k: saved[k] for k in ("rope", "norm", "qk_norm", "mlp", "block_layers")} == {
        "rope": cfg.model.get("rope", False), "norm": cfg.model.get("norm", "layernorm"),
        "qk_norm": cfg.model.get("qk_norm", False), "mlp": cfg.model.get("mlp", "gelu"),
        "block_layers": list(cfg.model.get("block_layers", ()))}
    assert saved["clip_shift"] is cfg.model.get("clip_shift", False) and saved["clip"] == cfg.model.clip
    with safe_open(os.path.join(out_dir, export_files.FORWARD_WEIGHTS), "np") as f:
        layout = f.metadata()["layout"]
    assert layout == f"biflow_jax.torch.tarflow.Model (options ml-tarflow lacks: {', '.join(LACKS[name])})"

    torch_model = torch_port.load(out_dir)["forward"]
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
    y = np.array([3, -1, 9])  # -1: a dropped label
    with jax.default_matmul_precision("highest"):
        out = jax.jit(model.apply)(params, jnp.asarray(x), jnp.asarray(y))
    x_t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        z, trajectory, logdets = torch_model(x_t, torch.from_numpy(y))
        recovered = torch_model.reverse(z, torch.from_numpy(y))  # the KV-cached inverse
    assert float(np.abs(np.asarray(out.z)).max()) > 0.5  # a real transform, not a near-identity
    if cfg.model.get("clip_shift"):  # the clip bites: without it on the shift, torch's z moves away
        torch_model.blocks[0].clip_shift = False
        with torch.no_grad():
            unclipped = torch_model(x_t, torch.from_numpy(y))[0]
        torch_model.blocks[0].clip_shift = True
        assert np.abs(unclipped.numpy() - np.asarray(out.z)).max() > 1e-3
    np.testing.assert_allclose(z.numpy(), np.asarray(out.z), atol=1e-5)
    for got, want in zip(trajectory, out.trajectory[1:]):
        np.testing.assert_allclose(got.numpy(), np.asarray(want), atol=1e-5)
    np.testing.assert_allclose(logdets.numpy(), np.asarray(out.logdets).sum(axis=1), atol=1e-5)
    np.testing.assert_allclose(recovered.numpy(), x_t.numpy(), atol=1e-4)

    back = state_dict_to_flow_params(flow_params_to_state_dict(params, cfg.model), cfg.model)
    want, got = jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_flatten_with_path(back)[0]
    assert [p for p, _ in want] == [p for p, _ in got]
    for (path, w), (_, g) in zip(want, got):
        np.testing.assert_array_equal(g, np.asarray(w), err_msg=jax.tree_util.keystr(path))  # bitwise


def test_import_of_an_option_checkpoint_into_a_scan_layers_flow(monkeypatch, tmp_path):
    """A PyTorch state_dict of the all-options flow imports into the `scan_layers` layout (each
    block's layers stacked, 1 and 2 of them), checked against the Flax model's own tree."""
    cfg = config(**OPTIONS["all"])
    cfg.model.scan_layers = True
    params = random_params(build_flow(cfg.model), seed=6)
    torch_model = torch_tarflow.Model.from_config(dict(cfg.model))
    exported = flow_params_to_state_dict(params, cfg.model)
    torch_model.load_state_dict({name: torch.from_numpy(value) for name, value in exported.items()})
    saved = []
    monkeypatch.setattr(import_torch.runs, "save_flow", lambda *args: saved.append(args))
    imported = import_torch.import_state_dict({"model": torch_model.state_dict()}, cfg, str(tmp_path / "run"))
    assert len(saved) == 1 and imported["params"]["blocks_1"]["attn_blocks"]["mlp"]["down"]["kernel"].shape[0] == 2
    for (path, want), (_, got) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                      jax.tree_util.tree_flatten_with_path(imported)[0], strict=True):
        np.testing.assert_array_equal(got, np.asarray(want), err_msg=jax.tree_util.keystr(path))


def test_export_notes_that_ml_tarflow_cannot_load_an_option_flow(tmp_path):
    """What the export command prints: the files written, then a note when ml-tarflow cannot read the flow."""
    cfg = config(rope=True, mlp="swiglu")
    params = random_params(build_flow(cfg.model), seed=4)
    lines = export_mode.written_lines([export_files.export_flow(cfg, params, str(tmp_path / "out"))])
    assert lines[0].startswith("wrote ") and lines[0].endswith(export_files.FORWARD_CONFIG)
    assert lines[-1] == ("note: this flow uses rope, swiglu: biflow_jax.torch.load reads it; "
                         "apple/ml-tarflow's transformer_flow.Model cannot")
    default = config()
    plain = random_params(build_flow(default.model), seed=5)
    written = export_files.export_flow(default, plain, str(tmp_path / "plain"))
    assert not any(line.startswith("note:") for line in export_mode.written_lines([written]))
    with safe_open(str(tmp_path / "plain" / export_files.FORWARD_WEIGHTS), "np") as f:
        assert f.metadata()["layout"] == "ml-tarflow transformer_flow.Model"
