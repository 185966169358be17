"""Export of BiFlow's reverse model G to PyTorch: both frameworks must compute the same G.

Every weight is random (the zero-initialised adaLN modulations and stage heads included),
so a wrong transpose, chunk order, head split, rotary half, stage split or CFG mix shows
up in the numbers. "Close" means max |got - want| <= 1e-5 * max |want| (float32 on both
sides, highest matmul precision).

G's guidance code is cos/sin of w * 1000 * freq: both sides build the frequency table in
float64 and round it once, or an ulp in the table would show as ~1e-4 in the code.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import helpers.params  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import biflow_jax.models.reverse as jax_reverse  # noqa: E402
import biflow_jax.torch as torch_port  # noqa: E402
from biflow_jax import checkpoint, runs  # noqa: E402
from biflow_jax.interop import export_files  # noqa: E402
from biflow_jax.interop.reverse_layout import (  # noqa: E402
    reverse_layout,
    reverse_params_to_state_dict,
    state_dict_to_reverse_params,
)
from biflow_jax.models import registry  # noqa: E402
from biflow_jax.samplers import one_nfe as editing  # noqa: E402
from biflow_jax.torch.reverse import ReverseModel, guidance_frequencies  # noqa: E402
from configs import digits  # noqa: E402

torch.set_default_dtype(torch.float32)

REL_TOL = 1e-5
N = 4
# name -> reverse-section overrides. "conditional": labels + guidance input, even split of
# depth 4 over 3 stages (2, 1, 1). "bottleneck": unconditional, no guidance input, explicit
# uneven split, hidden stream routed through every stage output.
CASES = {
    "conditional": dict(num_classes=10, depth=4, layers_per_stage=None, guidance_conditioning=True,
                        stage_bottleneck=False),
    "bottleneck": dict(num_classes=0, depth=4, layers_per_stage=[1, 1, 2], guidance_conditioning=False,
                       stage_bottleneck=True),
}
LABELS = np.array([3, -1, 9, 10])  # 10 = K: also the null row
W = np.array([0.0, 0.7, 1.5, 3.0], np.float32)
CFG = np.array([0.0, 1.0, 2.0, 0.5], np.float32)


def assert_close(got, want, rel: float = REL_TOL) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert err <= rel * scale, f"max abs error {err:.3g} exceeds {rel} * {scale:.3g}"


def make_config(case: str) -> ml_collections.ConfigDict:
    """A stage-2 config: the digits job with a 2-block forward flow and a tiny G."""
    config = digits.get_config("quick")
    config.stage = "biflow"
    config.model.update(channels=64, num_blocks=2, layers_per_block=1, head_dim=32)
    case = dict(CASES[case])
    config.model.num_classes = config.data.num_classes = case.pop("num_classes")  # G's classes are the flow's
    case["layers_per_stage"] = case["layers_per_stage"] or []
    config.biflow.model.update(width=64, heads=2, **case)
    return config


REPO = pathlib.Path(__file__).resolve().parents[2]


def export_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m biflow_jax.export ARGS`, as the README writes it."""
    return subprocess.run([sys.executable, "-m", "biflow_jax.export", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def build(config: ml_collections.ConfigDict) -> jax_reverse.ReverseViT:
    return registry.build_reverse(config.biflow.model, registry.build_flow(config.model))


class export:  # noqa: N801  (the export API the tests use, on configs)
    REVERSE_CONFIG, REVERSE_WEIGHTS = export_files.REVERSE_CONFIG, export_files.REVERSE_WEIGHTS
    export_flow = staticmethod(export_files.export_flow)

    @staticmethod
    def reverse_export_config(config):
        return export_files.reverse_export_config(build(config), config.model, config.biflow.model.dtype)

    @staticmethod
    def export_reverse(config, params, out_dir):
        return export_files.export_reverse(export.reverse_export_config(config), params, out_dir)


def random_params(model: jax_reverse.ReverseViT, seed: int):
    """Params of the model's exact tree, every leaf random at a scale that suits its role (adaLN's gates,
    shifts and scales of order 0.5, not 0); shapes from `eval_shape`: an eager `model.init` costs seconds."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, model.num_tokens, model.token_dim)),
                            jnp.zeros((1,), jnp.int32), jnp.zeros((1,)))
    return helpers.params.random_params(shapes, seed, {"adaln": 0.5})


def random_flow_params(config: ml_collections.ConfigDict):
    """Forward-flow params of the right tree (values do not matter where this is used)."""
    flow = registry.build_flow(config.model)
    shapes = jax.eval_shape(flow.init, jax.random.PRNGKey(0), *registry.flow_example_inputs(config.model))
    return helpers.params.random_params(shapes, seed=8)


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    """(config, JAX G, params, torch G loaded from the export, export dir) for one case."""
    config = make_config(request.param)
    model = build(config)
    params = random_params(model, seed=1)
    out_dir = str(tmp_path_factory.mktemp("export"))
    export.export_reverse(config, params, out_dir)
    with open(os.path.join(out_dir, export.REVERSE_CONFIG)) as f:
        torch_model = ReverseModel.from_config(json.load(f))
    state = {k: torch.from_numpy(v) for k, v in load_file(os.path.join(out_dir, export.REVERSE_WEIGHTS)).items()}
    torch_model.load_state_dict(state, strict=True)
    return config, model, params, torch_model.eval(), out_dir


def inputs(model):
    z = np.random.default_rng(2).standard_normal((N, model.num_tokens, model.token_dim)).astype(np.float32)
    return z, (LABELS if model.num_classes else None)


def jax_reference(model, params, z, y, cfg_scale):
    """Stage outputs and 1-NFE images (NHWC) of JAX G.

    The images come from `editing.one_nfe_sample` for the conditional model; for the
    other case (to save two compilations) from the stage outputs, as that function does.
    """
    to_images = editing.token_images(2, 8, 1)
    args = (jnp.asarray(z), None if y is None else jnp.asarray(y), jnp.asarray(W))
    s = None if cfg_scale is None else jnp.asarray(cfg_scale)
    stages = jax.jit(lambda p, z, y, w, s: model.apply(p, z, y, w, cfg_scale=s).stage_outputs)(params, *args, s)
    if model.num_classes:
        images = editing.one_nfe_sample(model, params, *args, to_images=to_images, cfg_scale=s)
    else:
        images = to_images(stages[-1])
    return stages, images


@pytest.mark.parametrize("guided", [False, True], ids=["no_cfg", "cfg"])
def test_stage_outputs_and_images_match_jax(exported, guided):
    config, model, params, torch_model, _ = exported
    z, y = inputs(model)
    cfg_scale = CFG if guided else None
    want_stages, want_images = jax_reference(model, params, z, y, cfg_scale)
    y_t = None if y is None else torch.from_numpy(y)
    s_t = None if cfg_scale is None else torch.from_numpy(cfg_scale)
    with torch.no_grad():
        stages = torch_model(torch.from_numpy(z), y_t, torch.from_numpy(W), s_t)
    assert len(stages) == config.model.num_blocks + 1
    for got, want in zip(stages, want_stages):
        assert got.dtype == torch.float32
        assert_close(got.numpy(), want)
    images = torch_model.decode(torch.from_numpy(z), y_t, torch.from_numpy(W), s_t)
    assert images.shape == (N, 1, 8, 8)
    assert_close(images.numpy().transpose(0, 2, 3, 1), want_images)
    # `sample` is `decode` of its own N(0, I) draw.
    drawn = torch.randn(N, 16, 4, generator=torch.Generator().manual_seed(5))
    sampled = torch_model.sample(N, y_t, torch.from_numpy(W), s_t, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sampled, torch_model.decode(drawn, y_t, torch.from_numpy(W), s_t), rtol=0, atol=0)
    if guided and model.num_classes:  # the guided rows (s != 0) differ from plain G: CFG has an effect
        with torch.no_grad():
            plain = torch_model(torch.from_numpy(z), y_t, torch.from_numpy(W))[-1]
        assert float((plain[1:] - stages[-1][1:]).abs().max()) > 1e-2
        torch.testing.assert_close(plain[0], stages[-1][0], rtol=0, atol=1e-5)  # s = 0 row unchanged


def test_guidance_codes_agree(exported):
    """The guidance code (cos/sin of w * 1000 * freq) is the same table on both sides."""
    _, model, _, _, _ = exported
    if not model.guidance_conditioning:
        pytest.skip("no guidance input")
    w_big = np.linspace(0.0, 4.0, 9, dtype=np.float32)
    diff = np.abs(np.asarray(jax_reverse.guidance_frequencies(jnp.asarray(w_big), 256))
                  - guidance_frequencies(torch.from_numpy(w_big), 256).numpy())
    assert diff.max() <= 4 * np.spacing(np.float32(4000.0))


def test_names_round_trip_exactly_and_match_the_torch_module(exported):
    _, model, params, torch_model, out_dir = exported
    with open(os.path.join(out_dir, export.REVERSE_CONFIG)) as f:
        cfg = json.load(f)
    state_dict = reverse_params_to_state_dict(params, cfg)
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == \
           {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    assert state_dict["blocks.0.attention.qkv.weight"].shape == (192, 64)  # (out, in)
    assert ("guidance_mlp_in.weight" in state_dict) == model.guidance_conditioning
    assert ("reembed.1.weight" in state_dict) == model.stage_bottleneck
    assert "heads.2.adaln.weight" in state_dict and "heads.1.norm.weight" in state_dict

    back = state_dict_to_reverse_params(state_dict, cfg)
    want, got = jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_flatten_with_path(back)[0]
    assert [p for p, _ in want] == [p for p, _ in got]
    for (path, w), (_, g) in zip(want, got):
        assert g.dtype == np.float32
        np.testing.assert_array_equal(g, np.asarray(w), err_msg=jax.tree_util.keystr(path))  # exact

    # bfloat16 params export as (exactly widened) float32.
    bf16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
    widened = reverse_params_to_state_dict(bf16, cfg)["blocks.1.mlp.gate_up.weight"]
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(
        widened, np.asarray(bf16["params"]["blocks_1"]["mlp"]["gate_up"]["kernel"], np.float32).T)


def test_export_writes_weights_and_every_constructor_argument(exported):
    config, model, _, _, out_dir = exported
    assert sorted(os.listdir(out_dir)) == ["reverse.safetensors", "reverse_config.json"]
    with open(os.path.join(out_dir, export.REVERSE_CONFIG)) as f:
        saved = json.load(f)
    weights = load_file(os.path.join(out_dir, export.REVERSE_WEIGHTS))
    assert set(weights) == set(reverse_layout(saved))
    assert all(w.dtype == np.float32 for w in weights.values())
    r = config.biflow.model
    assert saved == {
        "num_tokens": 16, "token_dim": 4, "num_forward_blocks": 2, "depth": 4, "width": 64, "heads": 2,
        "mlp_ratio": 4.0, "layers_per_stage": list(r.layers_per_stage) or None, "num_classes": config.model.num_classes,
        "guidance_conditioning": r.guidance_conditioning, "guidance_embed_dim": 256,
        "stage_bottleneck": r.stage_bottleneck, "stage_sizes": list(model.stage_sizes),
        "patch_size": 2, "img_size": 8, "in_channels": 1, "trained_dtype": "float32"}
    # Every ReverseViT field is recorded (so a new constructor argument cannot be forgotten).
    fields = {f for f in jax_reverse.ReverseViT.__dataclass_fields__ if f not in ("parent", "name", "dtype")}
    assert fields <= set(saved)


def _conditional():
    config = make_config("conditional")
    return config, random_params(build(config), seed=4), export.reverse_export_config(config)


@pytest.mark.parametrize("damage,key", [
    ("missing", "blocks.3.mlp.down.bias"),
    ("extra", "heads.3.proj.weight"),
    ("shape", "blocks.0.attention.qkv.weight"),
])
def test_bad_state_dict_raises_naming_the_key(damage, key):
    config, params, cfg = _conditional()
    state_dict = reverse_params_to_state_dict(params, cfg)
    if damage == "missing":
        del state_dict[key]
    elif damage == "extra":
        state_dict[key] = np.zeros((4, 64), np.float32)
    else:
        state_dict[key] = state_dict[key].T
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as info:
        state_dict_to_reverse_params(state_dict, cfg)
    if damage == "shape":
        assert "(192, 64)" in str(info.value) and "(64, 192)" in str(info.value)
    with pytest.raises(RuntimeError, match=key.replace(".", r"\.")):  # and torch's strict load agrees
        ReverseModel.from_config(cfg).load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})


def test_export_rejects_params_that_do_not_fit_the_config(tmp_path):
    config, params, _ = _conditional()
    tree = jax.tree_util.tree_map(np.asarray, params)
    del tree["params"]["heads_1"]["norm"]
    with pytest.raises(ValueError, match="heads_1/norm/scale"):
        export.export_reverse(config, tree, str(tmp_path / "a"))
    config.biflow.model.depth = 5  # one layer more than the params have
    with pytest.raises(ValueError, match="blocks_4"):
        export.export_reverse(config, params, str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="stage_sizes"):
        ReverseModel.from_config({**export.reverse_export_config(make_config("conditional")), "stage_sizes": [1, 1, 2]})


def test_load_returns_forward_and_reverse(exported, tmp_path):
    config, _, params, torch_model, _ = exported
    export.export_flow(config, random_flow_params(config), str(tmp_path))
    export.export_reverse(config, params, str(tmp_path))
    loaded = torch_port.load(str(tmp_path))
    assert set(loaded) == {"forward", "forward_config", "reverse", "reverse_config"}
    assert isinstance(loaded["reverse"], ReverseModel) and not loaded["reverse"].training
    z = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2]) if config.model.num_classes else None
    with torch.no_grad():
        assert torch.equal(loaded["reverse"](z, y, 1.0)[-1], torch_model(z, y, 1.0)[-1])


@pytest.fixture(scope="module")
def stage2_job(tmp_path_factory):
    """A two-stage job directory JOB/forward (stage 1) + JOB/reverse (stage 2, raw != EMA params)."""
    job = tmp_path_factory.mktemp("job")
    config = make_config("conditional")
    flow_params = random_flow_params(config)
    raw, ema = random_params(build(config), seed=6), random_params(build(config), seed=7)
    # Written like the training loop does (no optimizer: the loaders read only params items).
    for workdir, run_config, step, params, ema_params in (
            (job / "forward", dict(config.to_dict(), stage="flow"), 0, flow_params, flow_params),
            (job / "reverse", config.to_dict(), 3, raw, ema)):
        checkpoint.write_config(str(workdir), ml_collections.ConfigDict(run_config))
        stage = "flow" if workdir.name == "forward" else "biflow"
        runs.write_stage_file(str(workdir), stage, stage, None if stage == "flow" else str(job / "forward"))
        mngr = checkpoint.manager(str(workdir), async_save=False)
        checkpoint.save(mngr, step, params, ema_params, {"count": np.zeros((), np.int32)}, 0)
        mngr.wait_until_finished()
        mngr.close()
    return job, config, flow_params, raw, ema


def test_cli_exports_flow_and_reverse_of_a_stage2_run(stage2_job, tmp_path):
    job, config, flow_params, raw, ema = stage2_job
    cfg = export.reverse_export_config(config)
    for workdir, flag, want in ((job, "--ema", ema), (job / "reverse", "--noema", raw)):
        out = tmp_path / flag
        done = export_cli(f"--workdir={workdir}", f"--out={out}", flag)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "reverse.safetensors" in done.stdout
        assert sorted(os.listdir(out)) == ["forward.safetensors", "forward_config.json",
                                           "reverse.safetensors", "reverse_config.json"]
        written = load_file(str(out / "reverse.safetensors"))
        for name, value in reverse_params_to_state_dict(want, cfg).items():
            np.testing.assert_array_equal(written[name], value, err_msg=name)
        forward = load_file(str(out / "forward.safetensors"))  # the flow is stage 1's, bit for bit
        np.testing.assert_array_equal(forward["blocks.1.proj_in.weight"],
                                      np.asarray(flow_params["params"]["blocks_1"]["proj_in"]["kernel"]).T)


def test_cli_stage2_without_its_forward_run_fails_cleanly(stage2_job, tmp_path):
    _, config, _, _, _ = stage2_job
    checkpoint.write_config(str(tmp_path / "reverse"), config)
    runs.write_stage_file(str(tmp_path / "reverse"), "biflow", "biflow", str(tmp_path / "gone"))
    done = export_cli(f"--workdir={tmp_path / 'reverse'}", f"--out={tmp_path / 'out'}")
    assert done.returncode == 2
    assert "gone" in done.stderr
    assert not (tmp_path / "out").exists()
