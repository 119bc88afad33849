"""The train state and the step's activations are sharded, not only correct: AdamW's moments take their
parameters' shardings (1/n of them per device under FSDP over n devices), and the per-device temporaries of
the compiled DPO step stay flat as the device count grows at a fixed per-device batch (the residual stream is
constrained to the batch sharding)."""

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from util import load_config
from align_jax.algorithms import get_algorithm
from align_jax.models.build import build_policy, frozen_reference
from align_jax.parallel import batch_specs, make_mesh
from align_jax.train.optim import make_optimizer
from align_jax.train.state import init_state
from align_jax.train.step import jit_train_step


def _setup(n, cfg):
    mesh = make_mesh(1, n, 1, devices=jax.devices()[:n])
    model = build_policy(cfg, mesh)
    tx, schedule = make_optimizer(cfg.optimizer, 10)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return mesh, model, tx, schedule, graphdef, params, rest


def _device0_bytes(tree):
    d0 = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == d0)


def test_adamw_moments_take_the_parameters_shardings_and_split_over_fsdp():
    cfg = load_config("dpo")
    per_device = {}
    for n in (2, 8):
        mesh, _, tx, _, _, params, _ = _setup(n, cfg)
        state = init_state(tx, params, mesh, seed=0)
        adam = state["opt_state"][1][0]  # chain(clip_by_global_norm, adamw) -> ScaleByAdamState
        flat_p = jax.tree.leaves(state["params"])
        for moment in (adam.mu, adam.nu):
            flat_m = jax.tree.leaves(moment)
            assert len(flat_m) == len(flat_p)
            for p, m in zip(flat_p, flat_m):
                assert m.shape == p.shape and m.sharding == p.sharding, (m.sharding, p.sharding)
        assert adam.count.sharding.spec == P()  # the step counter is replicated
        assert sum(p.sharding.spec != P() for p in flat_p) >= len(flat_p) // 2  # FSDP splits most parameters
        total = sum(x.nbytes for x in jax.tree.leaves(state["opt_state"]))
        per_device[n] = _device0_bytes(state["opt_state"])
        assert per_device[n] < total / n * 1.2, (n, per_device[n], total)  # not a full copy per device
    assert per_device[8] < per_device[2] / 3.5


def test_step_temporaries_stay_flat_as_devices_grow_at_a_fixed_per_device_batch():
    """DPO step of the toy model, 2 pairs x 64 tokens per device: per-device temporaries on 8 devices equal
    those on 2 with the activation constraint; without it (mesh=None) they grow with the device count."""
    cfg = load_config("dpo")
    algo = get_algorithm("dpo")
    temps = {}
    for n, constrain in ((2, True), (8, True), (8, False)):
        mesh, model, tx, schedule, graphdef, params, rest = _setup(n, cfg)
        ref_g, ref_p, ref_r = nnx.split(frozen_reference(model), nnx.Param, ...)
        state = init_state(tx, params, mesh, seed=0)
        B, T = 2 * n, 64
        batch = {f"{s}_{k}": np.ones((B, T), np.int32) for s in ("chosen", "rejected")
                 for k in ("input_ids", "attention_mask", "completion_mask")}
        batch["label_probs"] = np.ones((B,), np.float32)
        batch["example_weight"] = np.ones((B,), np.float32)
        fn = jit_train_step(state_shardings=jax.tree.map(lambda x: x.sharding, state),
                            batch_shardings=batch_specs(batch, mesh),
                            ref_shardings=jax.tree.map(lambda x: x.sharding, ref_p),
                            metric_sharding=NamedSharding(mesh, P()), graphdef=graphdef, rest=rest,
                            ref_graphdef=ref_g, ref_rest=ref_r, algorithm=algo, cfg=cfg, tx=tx, schedule=schedule,
                            mesh=mesh if constrain else None)
        temps[n, constrain] = fn.lower(state, batch, ref_p).compile().memory_analysis().temp_size_in_bytes
    assert temps[8, True] <= temps[2, True] * 1.05, temps
    assert temps[8, False] > 2 * temps[8, True], temps


def test_a_checkpoint_restores_onto_another_mesh(tmp_path):
    """Saved by a run on 8-way FSDP, the state restores onto a 4 x 2 (data x fsdp) mesh with identical values and
    the new mesh's shardings, and the run resumes there (the mesh may change on resume, e.g. after a preemption
    onto another slice)."""
    import json
    import os

    import orbax.checkpoint as ocp

    from util import final_params
    from align_jax.train import train

    wd = str(tmp_path / "run")
    quick = {"total_steps": 2, "checkpoint.every_steps": 2, "data.eval": "", "export": False}
    cfg = load_config("dpo", **{"mesh.data": 1, "mesh.fsdp": 8, **quick})
    train(cfg, wd)
    saved = final_params(wd, 2)

    cfg2 = load_config("dpo", **{"mesh.data": 4, "mesh.fsdp": 2, **quick})
    mesh2 = make_mesh(4, 2, 1)
    tx, _ = make_optimizer(cfg2.optimizer, 10)
    _, params2, _ = nnx.split(build_policy(cfg2, mesh2), nnx.Param, ...)
    state2 = init_state(tx, params2, mesh2, seed=0)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state2)
    with ocp.CheckpointManager(os.path.join(wd, "checkpoints")) as m:
        restored = m.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    for a, b in zip(jax.tree.leaves(restored["params"]), saved):
        assert a.sharding.mesh == mesh2
        np.testing.assert_array_equal(np.asarray(a), b)
    assert any(x.sharding.spec != P() for x in jax.tree.leaves(restored["opt_state"]))

    cfg2.total_steps = 4
    out = train(cfg2, wd)  # resumes on the new mesh
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
    assert steps == [1, 2, 3, 4] and np.isfinite(out["loss"])
