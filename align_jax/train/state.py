"""The train state, created straight into its shardings.

state = {"step": int32[], "params": the model's Params, "opt_state": the optax state, "rng": uint32[2]}

Shardings: each parameter keeps the sharding it was created with (the logical-axis rules); every slot of the
optimizer state that is a copy of the parameter tree (AdamW's `mu` and `nu`, SGD momentum) takes its
parameter's sharding (`optax.tree_map_params`), everything else (step counters, the rng) is replicated. The
optimizer state is built inside `jax.jit(init, out_shardings=...)` from `jax.eval_shape`, so it never exists
unsharded (with FSDP over n devices each holds 1/n of `mu` and `nu`, not a full copy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P


def param_shardings(params, mesh):
    """Each parameter's NamedSharding on `mesh` (a parameter not yet on the mesh, e.g. a small head created on
    one device, is replicated)."""
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: x.sharding if isinstance(getattr(x, "sharding", None), NamedSharding)
                        and x.sharding.mesh == mesh else replicated, params)


def state_shardings(tx: optax.GradientTransformation, params, mesh) -> dict:
    """The shardings of the train state for `params` (arrays or `jax.ShapeDtypeStruct`s with shardings)."""
    replicated = NamedSharding(mesh, P())
    p_sh = param_shardings(params, mesh)
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, p_sh,
                                   transform_non_params=lambda _: replicated)
    return {"step": replicated, "params": p_sh, "opt_state": opt_sh, "rng": replicated}


def init_state(tx: optax.GradientTransformation, params, mesh, seed: int) -> dict:
    """The initial train state in `state_shardings` (the parameters are copied into it, not donated)."""
    shardings = state_shardings(tx, params, mesh)

    def init(params):
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
                "rng": jax.random.key_data(jax.random.key(seed))}

    params = jax.device_put(params, shardings["params"])  # no-op for parameters already on the mesh
    return jax.jit(init, out_shardings=shardings)(params)
