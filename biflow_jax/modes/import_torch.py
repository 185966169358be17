"""An apple/ml-tarflow (or our exported) PyTorch checkpoint as a stage-1 workdir (TARFlow, arXiv:2412.06329).

Everything is validated first (keys, shapes, the causal mask, the JAX model's own param
tree, an empty workdir); only then is `biflow_jax.runs.save_flow` called, so a bad
checkpoint leaves nothing behind. Training can then resume from the workdir.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from biflow_jax import runs
from biflow_jax.interop.state_dicts import (
    check_finite,
    to_numpy,
    torch_load_reason,
    torch_load_tensors,
    unwrap_state_dict,
)
from biflow_jax.interop.tarflow_layout import ml_tarflow_lacks, state_dict_to_flow_params
from biflow_jax.models import registry

ZIP_MAGIC, PICKLE_PROTO = b"PK\x03\x04", b"\x80"  # torch.save's zip format; the legacy pickle format


def load_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
    """torch.load a .pth file (tensors only, on CPU) and return its state_dict as numpy."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"{path} is empty (0 bytes): not a PyTorch checkpoint")
    if head != ZIP_MAGIC and head[:1] != PICKLE_PROTO:
        raise ValueError(f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)")
    try:
        checkpoint = torch_load_tensors(path)
    except Exception as err:  # noqa: BLE001  torch raises several kinds for damaged or non-tensor files
        raise ValueError(f"could not load {path} as a tensors-only checkpoint: {torch_load_reason(err)}") from None
    state = {name: to_numpy(value) for name, value in unwrap_state_dict(checkpoint).items()}
    check_finite(state, path)
    return state


def _check_against_model(params: Mapping[str, Any], model_cfg: Any) -> None:
    """Compare with the param tree our Flax TARFlow would create for this config."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    model = registry.build_flow(model_cfg)
    images = jnp.zeros((1, model.img_size, model.img_size, model.in_channels), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if model.num_classes else None
    expected = flatten_dict(jax.eval_shape(model.init, jax.random.PRNGKey(0), images, labels), sep="/")
    got = flatten_dict(params, sep="/")
    if expected.keys() != got.keys():
        missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        raise ValueError(f"converted params do not fit the Flax model: missing {missing}, unexpected {extra}")
    for name, spec in expected.items():
        if tuple(spec.shape) != tuple(got[name].shape):
            raise ValueError(f"{name}: the Flax model expects shape {tuple(spec.shape)}, got {got[name].shape}")


def import_state_dict(state_dict: Mapping[str, Any], config: Any, workdir: str) -> dict[str, Any]:
    """Validate `state_dict` against `config.model`, then save it as a fresh stage-1 workdir.

    Accepts wrapped / DDP-prefixed dicts of torch tensors or numpy arrays. Returns the
    params that were saved. Raises ValueError (bad checkpoint) or FileExistsError (workdir
    not empty) before anything is written.
    """
    state = {name: to_numpy(value) for name, value in unwrap_state_dict(state_dict).items()}
    check_finite(state, "the checkpoint")
    try:
        params = state_dict_to_flow_params(state, config.model)
    except ValueError as err:
        lacks = ml_tarflow_lacks(config.model)
        if lacks and "does not match the config" in str(err):  # likely an ml-tarflow file, an option config
            raise ValueError(f"{err} (the config uses {', '.join(lacks)}, which an apple/ml-tarflow "
                             "checkpoint never has)") from None
        raise
    _check_against_model(params, config.model)
    if not np.all(state["var"] == 1.0):
        logging.warning("the checkpoint's prior variance `var` is not 1 (max |var - 1| = %.3g); our sampler "
                        "assumes a unit Gaussian prior, so samples will differ from ml-tarflow's reverse()",
                        float(np.abs(state["var"] - 1.0).max()))
    if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
        raise FileExistsError(f"workdir {workdir} already exists and is not empty; import into a fresh one")
    runs.save_flow(workdir, config, params)
    return params
