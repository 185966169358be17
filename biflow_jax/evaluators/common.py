"""The one evaluation loop: a jitted per-example function averaged over a split, across processes.

Every process reads its shard of the split, padded to whole batches; the padded rows are
masked out and the values of all processes are gathered before averaging, so the mean is
exactly the split mean on 1 device, 8 devices or a pod.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from biflow_jax import sharding
from biflow_jax.data import input_pipeline


def masked_mean(per_example: Callable[[dict[str, jax.Array], int], jax.Array], data: Any, batch_size: int,
                mesh: Mesh, split: str | None = None) -> float:
    """Mean over a split of per_example(global batch, offset) -> (batch,) values.

    `offset` is the global index of the batch's first example (for per-example noise keys).
    """
    batch_sharding = NamedSharding(mesh, P(sharding.AXIS))
    total, count, offset = 0.0, 0, 0
    for batch in input_pipeline.eval_batches(data, batch_size, split):
        g = sharding.to_global(batch, batch_sharding)
        # The whole global batch on every process (device_get cannot read other processes' shards).
        values = multihost_utils.process_allgather(per_example(g, offset), tiled=True)
        mask = multihost_utils.process_allgather(g["mask"], tiled=True)
        total += float(values[mask].sum())
        count += int(mask.sum())
        offset += len(mask)
    return total / max(count, 1)

