"""Device mesh, logical-axis rules, and shardings for parameters and batches.

Every parameter carries logical axis names (metadata `logical_axes` on its `nnx.Param`, e.g.
`("embed", "mlp")`). One rules table maps logical names to mesh axes; a dimension that a mesh axis does not
divide evenly stays replicated on that axis (and a warning says so). The mesh has three axes:

- `data`:   pure data parallelism (parameters replicated, batch split);
- `fsdp`:   fully-sharded data parallelism (batch split *and* parameters split along `embed`);
- `tensor`: tensor (model) parallelism over heads, MLP features and the vocabulary.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from align_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # mesh axes the batch dimension is split over

# Logical axis name -> mesh axis (or None: replicated). This is the whole sharding policy.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH),      # activations / data: split over data-parallel replicas
    ("vocab", "tensor"),   # embedding rows and LM-head columns
    ("embed", "fsdp"),     # the model dimension of every weight matrix: FSDP shards here
    ("mlp", "tensor"),     # MLP hidden features (Megatron column/row split)
    ("q_heads", "tensor"),  # attention heads (q and o projections)
    ("kv_heads", "tensor"),  # key/value heads (GQA): needs num_key_value_heads % tensor == 0
    ("head_dim", None),
    ("norm", None),        # RMSNorm scales: small, replicated
)

log = logging.getLogger(__name__)


class MeshError(UserError, ValueError):
    """A mesh shape that cannot be built on the available devices; the message names the config key."""


def mesh_shape(data: int = 1, fsdp: int = -1, tensor: int = 1, *, num_devices: int | None = None,
               key: str = "mesh") -> tuple[int, int, int]:
    """Resolves one -1 entry so that data * fsdp * tensor == num_devices; refuses impossible shapes."""
    n = jax.device_count() if num_devices is None else num_devices
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise MeshError(f"{key}: at most one of data/fsdp/tensor may be -1, got {sizes}")
    for k, v in sizes.items():
        if v != -1 and (not isinstance(v, int) or v < 1):
            raise MeshError(f"{key}.{k}={v!r}: must be a positive integer or -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n % known:
            raise MeshError(f"{key}: {n} devices are not divisible by the fixed axes {sizes}")
        sizes[free[0]] = n // known
    if math.prod(sizes.values()) != n:
        raise MeshError(f"{key}: data*fsdp*tensor = {math.prod(sizes.values())} but there are {n} devices "
                        f"({sizes}); use -1 for one axis to fill the rest")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, *, devices: Sequence[Any] | None = None,
              key: str = "mesh") -> Mesh:
    """A `Mesh` with axes ('data', 'fsdp', 'tensor'); `tensor` varies fastest (kept on one host's chips)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, num_devices=len(devices), key=key)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)  # GSPMD propagation, no explicit-sharding types
    if len(devices) == jax.device_count() and devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def mesh_from_config(cfg) -> Mesh:
    """Builds the mesh from a config with fields `data`, `fsdp`, `tensor` (an ml_collections block)."""
    return make_mesh(cfg.get("data", 1), cfg.get("fsdp", -1), cfg.get("tensor", 1))


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules=RULES) -> P:
    """PartitionSpec for logical `axes` under `rules`; with `shape` and `mesh`, a dimension that the mesh
    axis does not divide is left replicated."""
    if axes is None:
        return P()
    table = dict(rules)
    out, used = [], set()
    for i, name in enumerate(axes):
        mesh_axis = table.get(name) if name is not None else None
        if mesh_axis is None:
            out.append(None)
            continue
        names = mesh_axis if isinstance(mesh_axis, tuple) else (mesh_axis,)
        names = tuple(a for a in names if a not in used)
        if mesh is not None:
            names = tuple(a for a in names if mesh.shape[a] > 1)
            if shape is not None and names:
                size = math.prod(mesh.shape[a] for a in names)
                if shape[i] % size:
                    log.warning("dimension %d (%s, size %d) is not divisible by mesh axes %s (size %d); "
                                "kept replicated", i, name, shape[i], names, size)
                    names = ()
        used.update(names)
        out.append(None if not names else names[0] if len(names) == 1 else names)
    return P(*out)


def param_specs(state: nnx.State, mesh: Mesh | None = None, rules=RULES):
    """Tree of PartitionSpecs for an (abstract) model state, from each Param's `logical_axes` metadata."""

    def spec(v):
        axes = v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None
        shape = getattr(v, "shape", None)
        return logical_to_spec(axes, shape, mesh, rules)

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state: nnx.State, mesh: Mesh, rules=RULES):
    """Tree of NamedShardings (one per leaf of `state`)."""
    specs = param_specs(state, mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a batch array: leading dimension split over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def create_sharded(module_fn, mesh: Mesh | None, rules=RULES, *, seed: int | None = None):
    """Creates the NNX module built by `module_fn()` (with `seed`: `module_fn(nnx.Rngs(seed))`) with every
    parameter directly in its sharding.

    The state's shapes come from `nnx.eval_shape` (nothing allocated), then one `jax.jit` with
    `out_shardings` runs the initialisers so that each device only ever holds its own shards; no unsharded
    copy exists on any device. With `seed`, the PRNG key is an argument of that program rather than a constant
    in it, so models that differ only in their seed share one compiled initialiser (the same numbers as
    `nnx.Rngs(seed)` built inside)."""
    build = module_fn if seed is None else (lambda: module_fn(nnx.Rngs(seed)))
    if mesh is None:
        return build()
    graphdef, abs_state = nnx.split(nnx.eval_shape(build))
    shardings = param_shardings(abs_state, mesh, rules)
    if seed is None:
        return nnx.merge(graphdef, jax.jit(lambda: nnx.state(module_fn()), out_shardings=shardings)())
    init = jax.jit(lambda key: nnx.state(module_fn(nnx.Rngs(key))), out_shardings=shardings)
    return nnx.merge(graphdef, init(jax.random.key(seed)))
