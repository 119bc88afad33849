"""Host batches -> global device arrays split over the mesh's batch axes (every process passes its own rows)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from align_jax.parallel.mesh import BATCH


def host_batch(batch: dict) -> dict:
    """The numeric arrays of a loader batch (host-side text columns stay on the host)."""
    return {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype != object}


def batch_specs(batch: dict, mesh) -> dict:
    """{key: NamedSharding} splitting dimension 0 of each array over the batch axes."""
    return {k: NamedSharding(mesh, P(BATCH, *([None] * (v.ndim - 1)))) for k, v in batch.items()}


def to_device(batch: dict, mesh) -> dict:
    """Each process's rows -> one global array per key, split over the batch mesh axes."""
    specs = batch_specs(batch, mesh)
    return {k: jax.make_array_from_process_local_data(specs[k], v) for k, v in batch.items()}
