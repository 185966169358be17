"""Hostile weight files for every loader: NaN weights with the right names, damaged safetensors, config.json
files of the wrong shape, and a code-running pickle; each is refused in one line naming the file (and the
tensor), before anything is written."""

import functools
import json
import os
import pickle

import jax
import numpy as np
import pytest
import torch
from helpers.configs import quick_config
from safetensors.numpy import save_file

from biflow_jax.interop import convnext_weights, dino_weights, inception_weights, lpips_weights, vae_weights
from biflow_jax.interop.state_dicts import nest, read_torch_file
from biflow_jax.interop.tarflow_layout import flow_params_to_state_dict
from biflow_jax.models import registry
from biflow_jax.models.vae import vae_config
from biflow_jax.modes import import_torch

NAN = np.array([[0.5, np.nan], [1.0, 2.0]], np.float32)


def save_pth(path, state):
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, path)
    return str(path)


def flow_state_dict(config):
    """The ml-tarflow state_dict of the config's flow (zeros; shapes from the Flax model, nothing run)."""
    model = registry.build_flow(config.model)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *registry.flow_example_inputs(config.model))
    return flow_params_to_state_dict(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes),
                                     config.model)


@functools.lru_cache(maxsize=1)
def tiny_vae_shapes():
    return {k: s.shape for k, s in vae_weights.abstract_params(vae_config("tiny")).items()}


def vae_dir(path):
    """A tiny diffusers AutoencoderKL directory of zero weights."""
    zeros = {k: np.zeros(shape, np.float32) for k, shape in tiny_vae_shapes().items()}
    vae_weights.save_vae(str(path), vae_config("tiny"), nest(zeros))
    return str(path)


def weights_dir(tmp_path, kind):
    """A save_pretrained-style directory of `kind` (dino | convnext | vae) with a parseable config.json;
    returns (directory, its weights file, loader)."""
    path = tmp_path / kind
    if kind == "vae":
        return vae_dir(path), path / "diffusion_pytorch_model.safetensors", vae_weights.load_vae
    path.mkdir()
    raw = {"dino": {"model_type": "dinov2"}, "convnext": {"model_type": "convnextv2", "depths": [1],
                                                           "hidden_sizes": [8]}}[kind]
    (path / "config.json").write_text(json.dumps(raw))
    save_file({"embeddings.cls_token": np.zeros((1, 1, 8), np.float32)}, str(path / "model.safetensors"))
    loader = dino_weights.load_dino if kind == "dino" else convnext_weights.load_convnext
    return str(path), path / "model.safetensors", loader


def test_nan_weights_with_the_right_names_are_refused_by_import_torch_naming_the_tensor(tmp_path):
    """Case: weights with the right keys and NaN values were accepted by import_torch (95%-zero samples)."""
    config = quick_config("flow", 2)
    config.model.update(num_blocks=2, layers_per_block=1, channels=32, head_dim=32)
    state = flow_state_dict(config)
    key = sorted(state)[len(state) // 2]
    state[key] = np.full_like(state[key], np.nan)
    workdir = str(tmp_path / "never")
    with pytest.raises(ValueError, match=f"tensor {key!r} holds {state[key].size} NaN/inf"):
        import_torch.import_state_dict(state, config, workdir)
    path = save_pth(tmp_path / "flow.pth", state)
    with pytest.raises(ValueError, match=f"{path}: tensor {key!r} holds"):
        import_torch.load_torch_checkpoint(path)
    assert not os.path.exists(workdir)


@pytest.mark.parametrize("loader", ["inception", "lpips_vgg", "lpips_lin", "dino_hub", "dino_dir", "convnext",
                                    "vae"])
def test_every_loader_refuses_nonfinite_weights_naming_the_tensor(tmp_path, loader):
    """Case: NaN weights were accepted by Inception and LPIPS (and would be by every loader)."""
    if loader == "lpips_lin":  # the real calibration names and shapes, one NaN
        state = {k: np.ones(s, np.float32) for k, s in lpips_weights.lin_shapes().items()}
        key = sorted(state)[2]
        state[key].reshape(-1)[0] = np.inf
        path = save_pth(tmp_path / "lin.pth", state)
        vgg = save_pth(tmp_path / "vgg.pth", {"features.0.bias": np.zeros(64, np.float32)})
        with pytest.raises(ValueError, match=f"{path}: tensor {key!r} holds 1 NaN/inf"):
            lpips_weights.lin_params(read_torch_file(path))
        with pytest.raises(ValueError, match="does not match the architecture"):  # vgg keys checked first
            lpips_weights.load_lpips(vgg, path)
        return
    if loader in ("dino_dir", "convnext", "vae"):
        directory, weights, load = weights_dir(tmp_path, loader.replace("_dir", ""))
        state = {"some.weight": NAN} if loader != "vae" else None
        if loader == "vae":
            from safetensors.numpy import load_file

            state = dict(load_file(str(weights)))
            key = sorted(state)[0]
            state[key] = state[key] + np.float32(np.nan)
        else:
            key = "some.weight"
        save_file(state, str(weights))
        with pytest.raises(ValueError, match=f"tensor {key!r} holds"):
            load(directory)
        return
    key, load = {"inception": ("Conv2d_1a_3x3.conv.weight", inception_weights.load_inception),
                 "lpips_vgg": ("features.0.weight", lambda p: lpips_weights.load_lpips(p, p)),
                 "dino_hub": ("cls_token", dino_weights.load_dino)}[loader]
    path = save_pth(tmp_path / "weights.pth", {key: NAN})
    with pytest.raises(ValueError, match=f"{path}: tensor {key!r} holds 1 NaN/inf value"):
        load(path)


def damaged_safetensors(path, kind):
    valid = open(path, "rb").read()
    content = {"empty": b"", "garbage": os.urandom(300), "truncated": valid[: len(valid) // 2],
               "oversized_header": (1 << 60).to_bytes(8, "little") + b"{}"}[kind]
    with open(path, "wb") as f:
        f.write(content)


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated", "oversized_header"])
@pytest.mark.parametrize("model", ["dino", "convnext", "vae"])
def test_damaged_safetensors_are_one_line_naming_the_file(tmp_path, model, kind):
    """Case: garbage, empty, truncated or oversized-header .safetensors gave a SafetensorError traceback."""
    directory, weights, load = weights_dir(tmp_path, model)
    damaged_safetensors(weights, kind)
    with pytest.raises(ValueError, match=f"{weights} is not a readable safetensors file") as err:
        load(directory)
    assert "\n" not in str(err.value)


def test_config_json_of_the_wrong_shape_is_one_line_naming_the_file(tmp_path):
    """Case: a VAE config.json that is a list gave AttributeError; a ConvNeXt one without depths
    'error: 'depths''."""
    directory, _, _ = weights_dir(tmp_path, "vae")
    config = os.path.join(directory, "config.json")
    with open(config, "w") as f:
        json.dump([1, 2, 3], f)
    with pytest.raises(ValueError, match=f"{config} holds a JSON list, not an object"):
        vae_weights.load_vae(directory)
    directory, _, _ = weights_dir(tmp_path, "convnext")
    config = os.path.join(directory, "config.json")
    with open(config, "w") as f:
        json.dump({"model_type": "convnextv2", "hidden_sizes": [8]}, f)
    with pytest.raises(ValueError, match=f"{config} lacks the field 'depths'"):
        convnext_weights.load_convnext(directory)
    with open(config, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=f"{config} is not JSON"):
        convnext_weights.load_convnext(directory)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.mark.parametrize("protocol", ["zip", "pickle2"])
def test_a_code_running_pickle_is_refused_with_torchs_reason_not_its_advice(tmp_path, protocol):
    """Case: torch's refusal was cut at 200 characters, hiding 'unsupported GLOBAL posix.system' and ending
    on its advice to retry with weights_only=False."""
    path = str(tmp_path / "evil.pth")
    if protocol == "zip":
        torch.save({"weight": RunsCode()}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"weight": RunsCode()}, f, protocol=2)
    for load in (import_torch.load_torch_checkpoint, read_torch_file):
        with pytest.raises(ValueError) as err:
            load(path)
        message = str(err.value)
        assert path in message and "unsupported GLOBAL posix.system" in message, message
        assert "weights_only" not in message and "\n" not in message, message
