"""`--mode=describe`: what a config would train, without data, weights or compiling a step.

For every stage the config runs, the models are built abstractly (`jax.eval_shape`) and
described: class, parameter count, token grid, classes and forward FLOPs per image (the model
FLOPs of `model_flops`, counted from the architecture as papers count them; `--mode=compile`
sets the compiled program's FLOPs beside them). The dataset line is read from the config
alone (name, splits, labelled or not), so a conditional flow on an unlabelled dataset shows
before any data is read. The last line printed is one JSON object:
{"data": {"name", "train_split", "test_split", "labelled", "num_classes", ...},
 "stages": [{"name", "model", "params", "classes", "tokens", "token_grid", "flops_per_image"}, ...]}.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections

from biflow_jax import architecture, model_flops
from biflow_jax.models import registry
from biflow_jax.models.param_trees import count_params
from biflow_jax.objectives import biflow


def describe_flow(config: ml_collections.ConfigDict) -> dict[str, Any]:
    model = registry.build_flow(config.model)
    x, y = registry.flow_example_inputs(config.model)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, y))
    grid = config.model.img_size // config.model.patch_size
    layers = (f"{model.layers_per_block} layers" if not model.block_layers
              else f"({', '.join(map(str, model.block_layers))}) layers")
    labels = {"rope": "RoPE", "rmsnorm": "RMSNorm", "qk_norm": "QK-norm", "swiglu": "SwiGLU (ours)",
              "geglu_starflow": "STARFlow's GEGLU MLP",
              "clip_shift": f"soft clip {model.clip:g} of log-scale and shift"}
    options = [labels[name] for name in architecture.options_in_use(config.model) if name in labels]
    return {"name": "flow", "model": f"{config.model.get('name', 'tarflow')} {model.num_blocks} blocks x "
            f"{layers}, width {model.channels}, patch {model.patch_size}" + "".join(f", {o}" for o in options),
            "params": count_params(params), "classes": model.num_classes, "tokens": model.num_tokens,
            "token_grid": [grid, grid], "token_dim": model.token_dim,
            "flops_per_image": model_flops.flow_forward(model)}


def describe_biflow(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """G as stage 2 would build it over this config's flow (classes and tokens come from the flow)."""
    flow = registry.build_flow(config.model)
    reverse = biflow.build_reverse(config, flow)
    z, y, w = registry.reverse_example_inputs(flow)
    params = jax.eval_shape(lambda: reverse.init(jax.random.key(0), z, y, w))
    fields = registry.reverse_fields(config.biflow.model)
    grid = config.model.img_size // config.model.patch_size
    return {"name": "biflow", "model": f"ReverseViT {config.biflow.model.variant}: depth {fields['depth']}, "
            f"width {fields['width']}, {fields['heads']} heads, {reverse.num_stages} stages",
            "params": count_params(params), "classes": reverse.num_classes, "tokens": reverse.num_tokens,
            "token_grid": [grid, grid], "token_dim": reverse.token_dim,
            "flops_per_image": model_flops.reverse_forward(reverse)}


def describe_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The dataset the config trains on, as the config names it (nothing is read); for latents, also the
    image dataset they are encoded from."""
    data = config.data
    out = {"name": data.name, "train_split": data.train_split, "test_split": data.test_split,
           "labelled": bool(data.num_classes), "num_classes": int(data.num_classes),
           "image_size": int(data.image_size)}
    if config.get("latent") is not None and config.latent.get("enabled", False):
        source = config.latent.source
        out["source"] = {"name": source.name, "train_split": source.train_split, "test_split": source.test_split,
                         "image_size": int(source.image_size)}
    return out


def data_line(data: dict[str, Any]) -> str:
    labels = f"labelled, {data['num_classes']} classes" if data["labelled"] else "unlabelled (unconditional)"
    source = (f", encoded from {data['source']['name']} ({data['source']['train_split']} / "
              f"{data['source']['test_split']}) at {data['source']['image_size']} px") if "source" in data else ""
    return (f"data: {data['name']} (train split {data['train_split']!r}, test split {data['test_split']!r}), "
            f"{data['image_size']} px, {labels}{source}")


def describe(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{'data': {...}, 'stages': [...]} for the stages `config.stage` runs ('both' describes both)."""
    stages = []
    if config.stage in ("flow", "both"):
        stages.append(describe_flow(config))
    if config.stage in ("biflow", "both"):
        stages.append(describe_biflow(config))
    return {"data": describe_data(config), "stages": stages}


def run(config: ml_collections.ConfigDict, all_stages: bool = True) -> dict[str, Any]:
    """Print a human description of each stage, then the JSON line. all_stages: describe stage 2 even
    for a stage-1 config (the paper configs carry a real stage-2 section)."""
    if all_stages and config.stage == "flow":
        config = ml_collections.ConfigDict(config.to_dict())
        config.stage = "both"
    result = describe(config)
    print(data_line(result["data"]))
    for s in result["stages"]:
        gflops = "n/a" if s["flops_per_image"] is None else f"{s['flops_per_image'] / 1e9:.3f} GFLOP"
        print(f"{s['name']}: {s['model']}; {s['params']:,} params ({s['params'] / 1e6:.1f}M); "
              f"{s['tokens']} tokens ({s['token_grid'][0]}x{s['token_grid'][1]}) of {s['token_dim']} dims; "
              f"{s['classes']} classes; forward {gflops} per image")
    print(json.dumps(result))
    return result
