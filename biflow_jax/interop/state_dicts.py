"""Reading PyTorch-world weight files into flat numpy state_dicts, and strict checks.

Every loader of pretrained weights (DINOv2, VAE, VGG/LPIPS, ConvNeXt, Inception,
ml-tarflow) goes through here, so all of them accept the same file kinds and fail the
same way: a missing file names what is needed, and a key/shape mismatch names every
offending key with both shapes. torch is imported only for .bin/.pth files.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

StateDict = Mapping[str, np.ndarray]
Parsed = TypeVar("Parsed")
TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation",
                     "In PyTorch 2.6", "Re-running `torch.load`")  # torch's advice, not its reason
WRAPPER_KEYS = ("model", "state_dict")  # training scripts often save {'model': sd, 'optimizer': ...}
PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel and torch.compile wrappers


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The bare state_dict inside a checkpoint: unwrap {'model': ...}/{'state_dict': ...}, strip
    DDP's 'module.' and torch.compile's '_orig_mod.' key prefixes."""
    state = checkpoint
    while isinstance(state, Mapping):
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if wrapper is None:
            break
        state = state[wrapper]
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a state_dict (a mapping of names to tensors), got {type(state).__name__}")
    return {strip_prefixes(name): value for name, value in state.items()}


def strip_prefixes(name: str) -> str:
    while name.startswith(PREFIXES):
        for prefix in PREFIXES:
            name = name.removeprefix(prefix)
    return name


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any float dtype, any device) or array-like -> float32 numpy."""
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def torch_load_reason(err: BaseException) -> str:
    """torch.load's reason for refusing a file, on one line: what it found (e.g. 'Trying to load unsupported
    GLOBAL posix.system whose module posix is blocked'), without its advice to retry with weights_only=False,
    which would run code from the file."""
    lines = [" ".join(line.split()) for line in str(err).splitlines()]
    lines = [line.replace("WeightsUnpickler error:", "").strip() for line in lines
             if line.strip() and not line.startswith(TORCH_BOILERPLATE)]
    lines = [line for line in lines if line]
    text = "; ".join(lines) if lines else type(err).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def check_finite(state: Mapping[str, Any], source: Path | str) -> None:
    """ValueError naming the first floating tensor holding NaN or inf: such weights load without error
    and give NaN features or images (e.g. a flow sampling black images) far from the file at fault."""
    for key, value in state.items():
        array = np.asarray(value)
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            raise ValueError(f"{source}: tensor {key!r} holds {bad} NaN/inf value(s) of {array.size}; "
                             "the weights are damaged")


def torch_to_numpy(value: Any, key: str, source: Path | str) -> np.ndarray:
    """A torch tensor as a float32 (floating) or integer numpy array."""
    import torch  # lazy: only .bin/.pth files and bf16 safetensors need it

    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    if value.is_floating_point():
        value = value.to(torch.float32)
    return value.numpy()


def torch_load_tensors(path: Path | str) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, with torch's warnings about what it read (such as
    an unusual pickle protocol) kept back while it reads: re-issued if the load succeeds, dropped if it
    fails, where the caller's one-line error says why (a warning line would come before it)."""
    import torch  # lazy

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return loaded


def read_torch_file(path: Path | str) -> dict[str, np.ndarray]:
    """A torch.save'd state_dict (.pth/.bin), loaded with weights_only=True (no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state = torch_load_tensors(path)
    except Exception as e:  # torch raises several kinds for non-checkpoint bytes
        raise ValueError(f"{path} is not a readable PyTorch state_dict ({torch_load_reason(e)})") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state_dict (mapping), got {type(state).__name__}")
    arrays = {str(k): torch_to_numpy(v, str(k), path) for k, v in state.items()}
    check_finite(arrays, path)
    return arrays


def read_safetensors(path: Path | str) -> dict[str, np.ndarray]:
    """A .safetensors file as numpy arrays (bfloat16 tensors go through torch as float32)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        arrays = dict(load_file(str(path)))
    except SafetensorError as e:  # empty, garbage, truncated, or a header that claims too much
        raise ValueError(f"{path} is not a readable safetensors file ({' '.join(str(e).split())})") from None
    except (TypeError, ValueError, KeyError):
        from safetensors.torch import load_file as load_torch  # numpy has no bfloat16

        arrays = {k: torch_to_numpy(v, k, path) for k, v in load_torch(str(path)).items()}
    check_finite(arrays, path)
    return arrays


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
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a weight_map): "
                             f"{type(e).__name__} {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: weight_map is not a mapping of tensor names to shard files")
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
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a JSON {type(raw).__name__}, not an object of config fields ({needed})")
    return raw


def parse_config(raw: Mapping[str, Any], parse: Callable[[Mapping[str, Any]], Parsed], path: Path | str) -> Parsed:
    """parse(raw), with a missing field or one of the wrong type reported as a ValueError naming the file."""
    try:
        return parse(raw)
    except KeyError as e:
        raise ValueError(f"{path} lacks the field {e}") from None
    except TypeError as e:
        raise ValueError(f"{path} has a field of the wrong type ({e})") from None


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
