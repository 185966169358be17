"""Reading PyTorch-world weight files into flat numpy state_dicts, and strict checks.

Every loader of pretrained weights (DINOv2, VAE, VGG/LPIPS, ConvNeXt, Inception,
ml-tarflow) goes through here, so all of them accept the same file kinds and fail the
same way: a missing file names what is needed, and a key/shape mismatch names every
offending key with both shapes. torch is imported only for .bin/.pth files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

StateDict = Mapping[str, np.ndarray]


def torch_to_numpy(value: Any, key: str, source: Path | str) -> np.ndarray:
    """A torch tensor as a float32 (floating) or integer numpy array."""
    import torch  # lazy: only .bin/.pth files and bf16 safetensors need it

    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    if value.is_floating_point():
        value = value.to(torch.float32)
    return value.numpy()


def read_torch_file(path: Path | str) -> dict[str, np.ndarray]:
    """A torch.save'd state_dict (.pth/.bin), loaded with weights_only=True (no pickled code)."""
    import torch  # lazy

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for non-checkpoint bytes
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable PyTorch state_dict ({reason[:200]})") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state_dict (mapping), got {type(state).__name__}")
    return {str(k): torch_to_numpy(v, str(k), path) for k, v in state.items()}


def read_safetensors(path: Path | str) -> dict[str, np.ndarray]:
    """A .safetensors file as numpy arrays (bfloat16 tensors go through torch as float32)."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return dict(load_file(str(path)))
    except (TypeError, ValueError, KeyError):
        from safetensors.torch import load_file as load_torch  # numpy has no bfloat16

        return {k: torch_to_numpy(v, k, path) for k, v in load_torch(str(path)).items()}


def read_weights_dir(directory: Path | str, stem: str, what: str) -> dict[str, np.ndarray]:
    """The weights of a save_pretrained directory: STEM.safetensors, its sharded index, or STEM.bin.

    transformers names them model.*, pytorch_model.bin; diffusers diffusion_pytorch_model.*.
    """
    directory = Path(directory)
    single = directory / f"{stem}.safetensors"
    index = directory / f"{stem}.safetensors.index.json"
    legacy = directory / ("pytorch_model.bin" if stem == "model" else f"{stem}.bin")
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.is_file():
                raise FileNotFoundError(f"{what} weights shard not found: {shard_path}")
            state.update(read_safetensors(shard_path))
        return state
    if legacy.is_file():
        return read_torch_file(legacy)
    raise FileNotFoundError(f"no {what} weights in {directory}: expected {single.name}, {index.name} "
                            f"or {legacy.name}")


def read_config_json(directory: Path | str, what: str, needed: str) -> dict[str, Any]:
    """DIR/config.json, or FileNotFoundError saying which kind of directory is needed."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{what} weights not found: {directory} is not a directory ({needed})")
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights: {directory} has no config.json ({needed})")
    return json.loads(path.read_text())


def check_keys(state: StateDict, expected: Mapping[str, Sequence[int]], what: str) -> None:
    """ValueError naming every missing, unexpected and wrongly shaped key (with both shapes)."""
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    wrong = [f"{k}: expected shape {tuple(expected[k])}, got {tuple(np.shape(state[k]))}"
             for k in sorted(expected) if k in state and tuple(np.shape(state[k])) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if wrong:
        problems.append("wrongly shaped keys: " + "; ".join(wrong))
    if problems:
        raise ValueError(f"{what} does not match the architecture: " + " | ".join(problems))


def nest(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """{'a/b/c': array} -> {'a': {'b': {'c': array}}} (a Flax params tree)."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of `nest`: a params tree as {'a/b/c': leaf}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out
