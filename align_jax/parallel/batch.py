"""Host batches -> global device arrays split over the mesh's batch axes (every process passes its own rows), and
the batch-sharding constraint on activations inside the jitted steps."""

from __future__ import annotations

import contextlib
import contextvars
import math

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


_ACTIVATION_MESH: contextvars.ContextVar = contextvars.ContextVar("align_jax_activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh):
    """While tracing inside this context, `constrain_batch` pins activations to the batch sharding of `mesh`
    (the train and eval steps trace the model inside it)."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def constrain_batch(x):
    """`x` [B, ...] constrained to P(batch axes, None, ...) on the active mesh (`activation_sharding`): dimension 0
    split over the data-parallel axes of size > 1, the rest unsplit. Without it the compiler may keep
    activations at the global batch size on every device (per-device temporaries then grow with the device
    count). A no-op outside the context, on one device, or when B does not divide."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return x
    axes = tuple(a for a in BATCH if mesh.shape[a] > 1)
    n = math.prod(mesh.shape[a] for a in axes)
    if n == 1 or x.shape[0] % n:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(axes, *([None] * (x.ndim - 1)))))


def same_shapes_across_processes(batch: dict) -> dict:
    """With several processes, each pads its rows to its own length bucket; a global array needs one shape. Pads
    every array on the right of its last axis to the largest length any process has (padding = 0: masks 0, so
    the padded positions count nowhere; right-padded layouts only), and packed rows (`packed_*`,
    `align_jax.data.packing`) to the most rows any process has (rows of segment 0 appended: the places the
    sequences' token indices point to do not move). One process: unchanged."""
    if jax.process_count() == 1:
        return batch
    from jax.experimental import multihost_utils

    keys = sorted(batch)
    lengths = np.array([batch[k].shape[-1] if batch[k].ndim > 1 else 0 for k in keys], np.int64)
    rows = np.array([batch[k].shape[0] if k.startswith("packed_") else 0 for k in keys], np.int64)
    both = np.asarray(multihost_utils.process_allgather(np.concatenate([lengths, rows])))
    longest, most = both.reshape(-1, 2, len(keys)).max(0)
    out = {}
    for k, n, r in zip(keys, longest, most):
        v = batch[k]
        if v.ndim > 1 and v.shape[-1] < n:
            v = np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, int(n) - v.shape[-1])])
        if v.shape[0] < r:
            v = np.pad(v, [(0, int(r) - v.shape[0])] + [(0, 0)] * (v.ndim - 1))
        out[k] = v
    return out
