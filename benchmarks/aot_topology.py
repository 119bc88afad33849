"""Compile-time proof of scale: the project's own jitted train step, lowered and compiled ahead of time for a real
TPU slice on a CPU-only machine, with the per-chip memory the compiler plans and the model FLOPs per step.

With the TPU runtime library installed (`pip install -r requirements-aot.txt`: libtpu, no TPU needed),
`jax.experimental.topologies.get_topology_desc` describes a slice (v5p-64, v5e-256, v6e-64) and the train step
that `align_jax.train.train()` runs (`train.step.jit_train_step`: loss + gradients + AdamW update, state donated,
the activation batch-sharding constraint on) is compiled for it, for real model shapes (Llama-3-8B, Llama-3-70B,
Qwen3-8B, their config.json numbers embedded below) with abstract weights: nothing is downloaded or allocated.
Everything the step sees is a `jax.ShapeDtypeStruct` carrying the sharding the training loop would give it:
parameters from their logical axes (`parallel.param_shardings`), the optimizer state from `train.state.
state_shardings` (AdamW's mu/nu take their parameter's sharding), the batch split over ('data', 'fsdp')
(`parallel.batch_specs`), the frozen reference (DPO, GRPO) with the policy's shardings.

    export JAX_PLATFORMS=cpu
    python benchmarks/aot_topology.py --model llama3-8b --algorithm dpo --slice v5p-64 --mesh 1,32,1 \
        --batch 64 --seq_len 2048 --remat full --step_time 10
    python benchmarks/aot_topology.py --table --step_time 10  # the README's grid (~2 hours on 2 cores)
    python benchmarks/aot_topology.py --model tiny --slice cpu:8 --mesh 1,8,1 --batch 8 --seq_len 64   # no libtpu

Printed per configuration (one table row): per-chip argument, temporary and peak bytes, from
`compiled.memory_analysis()` (peak = arguments + outputs - aliased (the donated state) + temporaries + generated
code, + inputs that the step does not read but the training loop keeps in HBM: GRPO's frozen reference), the
chip's HBM and whether the peak fits; the model FLOPs of one step (analytic, below) and the MFU a given
`--step_time` would mean (model FLOPs / (step time x chips x peak bf16 FLOP/s)); the compile time. When the TPU
compiler itself refuses the program for lack of HBM, the row says so with the compiler's own figures
("> HBM (temps 16.42 > 15.75)": its temporaries alone exceed the HBM it can use).

Chip figures used (Google Cloud TPU documentation; HBM per chip, peak dense bf16): v5e 16 GiB, 197 TFLOP/s; v5p
95 GiB, 459 TFLOP/s; v6e (Trillium) 32 GiB, 918 TFLOP/s (libtpu 0.0.42's compiler allows 15.75 GiB on v5e and
95.74 GiB on v5p). v5p-64 is 32 chips (64 TensorCores, megacore: one JAX device per chip), v5e-256 is 256 chips,
v6e-64 is 64 chips (topologies as MaxText's accelerator_to_spec_map.py: "v5:2x4x4" megacore, "v5e:16x16",
"v6e:8x8").

The decoder's layers are unrolled (a Python loop), so compile time and the compiler's own memory grow with depth:
an 8B step compiles in 5-10 minutes of CPU (~9 GB of memory); 80-layer Llama-3-70B would need ~38 GB, so the grid
compiles it truncated to 8 and 16 layers (`--layers`) and extrapolates linearly (`extrapolate`; Llama-3-8B's
per-chip memory is linear in depth: 2, 4, 8 and 32 layers checked).

Model FLOPs per step (counted analytically; `compiled.cost_analysis()` counts each loop body once and is
unavailable or unreliable for TPU programs), with S sequences of T tokens through the model, N_mm = the
parameters of the decoder's matmuls (L * (2 D H E + 2 D K E + 3 D F), no embedding table), V the vocabulary:

    policy forward + backward   6 N_mm S T  +  12 L H E S T^2  +  6 D V S T'
    reference forward (DPO)     2 N_mm S T  +   4 L H E S T^2  +  2 D V S T'
where T' = the positions that go through the LM head (T - 1; GRPO: the N completion tokens; reward model: none,
its scalar head costs 6 D S T). Attention is counted over the full T x T square (the decoder computes the
masked square; a causal kernel would halve that term). "Model FLOPs" (for MFU) is the sum of these two lines.
The step also executes, and the cross-check counts: the remat recompute (`full`: another policy forward of the
decoder, 2 N_mm S T + 4 L H E S T^2; `dots_with_no_batch_dims`: the attention dots, 4 L H E S T^2; `dots`: no
matmul) and the vocabulary-chunked log-prob op's logits recompute in its backward (2 D V S T'). The test
(tests/test_aot_topology.py) checks the executed count against `cost_analysis()` of a CPU compile of the tiny
model (one vocabulary chunk, layers unrolled).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import re
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _early_cpu_device_count(argv) -> None:
    """`--slice cpu:<n>` needs n host devices, which must be set before jax is imported."""
    n = 0
    for i, a in enumerate(argv):
        v = a.split("=", 1)[1] if a.startswith("--slice=") else argv[i + 1] if a == "--slice" and i + 1 < len(argv) \
            else ""
        if v.startswith("cpu:"):
            n = max(n, int(v[4:]))
    if n and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={n}").strip()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run from a checkout without install
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _early_cpu_device_count(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from align_jax.algorithms import get_algorithm  # noqa: E402
from align_jax.cli import load_config_file  # noqa: E402
from align_jax.models.config import from_hf_config, rope_inv_freq  # noqa: E402
from align_jax.models.heads import ScalarHeadModel  # noqa: E402
from align_jax.models.llama import Transformer  # noqa: E402
from align_jax.parallel import batch_specs, logical_to_spec, make_mesh  # noqa: E402
from align_jax.train.optim import make_optimizer  # noqa: E402
from align_jax.train.state import state_shardings  # noqa: E402
from align_jax.train.step import jit_train_step  # noqa: E402

GIB = 2.0**30

# --------------------------------------------------------------------------------------------------- models
# The architecture fields of each model's Hugging Face config.json (public numbers).
MODELS = {
    # meta-llama/Meta-Llama-3-8B
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                      rope_scaling=None, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                      hidden_act="silu"),
    # meta-llama/Meta-Llama-3-70B
    "llama3-70b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=8192,
                       intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                       rope_scaling=None, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                       hidden_act="silu"),
    # Qwen/Qwen3-8B
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=False, attention_bias=False,
                     use_sliding_window=False, sliding_window=None, hidden_act="silu"),
    # Llama-shaped, smaller (benchmarks/memory.py): ~110M (benchmarks/dpo_throughput.py's "100m"), and
    # meta-llama/Llama-3.2-1B and -3B's config.json numbers
    "llama-110m": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=768,
                       intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                       max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                       tie_word_embeddings=True, attention_bias=False, mlp_bias=False, hidden_act="silu"),
    "llama3.2-1b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048,
                        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=64, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                        rope_theta=500000.0, rope_scaling=None, tie_word_embeddings=True, attention_bias=False,
                        mlp_bias=False, hidden_act="silu"),
    "llama3.2-3b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=3072,
                        intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                        head_dim=128, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                        rope_theta=500000.0, rope_scaling=None, tie_word_embeddings=True, attention_bias=False,
                        mlp_bias=False, hidden_act="silu"),
    "tiny": None,  # align_jax/data/toy/model_config.json (4 layers, hidden 128, vocab 256, tied; ~0.9M parameters)
}

# ---------------------------------------------------------------------------------------------------- slices


@dataclasses.dataclass(frozen=True)
class SliceSpec:
    name: str
    topology: str  # get_topology_desc's topology_name
    chip_config_name: str | None
    chips: int
    hbm_gib: float  # per chip (one JAX device)
    peak_tflops: float  # dense bf16 per chip


SLICES = {
    "v5p-64": SliceSpec("v5p-64", "v5:2x4x4", "megacore", 32, 95.0, 459.0),
    "v5e-256": SliceSpec("v5e-256", "v5e:16x16", None, 256, 16.0, 197.0),
    "v6e-64": SliceSpec("v6e-64", "v6e:8x8", None, 64, 32.0, 918.0),
}


def slice_devices(name: str):
    """(devices, SliceSpec) of `name`: a TPU slice from `SLICES` (needs libtpu; no TPU) or "cpu:<n>" (the first n
    host devices; no HBM limit, no peak FLOP/s) or "gpu:<n>" (the first n GPUs)."""
    if name.startswith("gpu:"):
        n = int(name[4:])
        devices = jax.devices("gpu")[:n]
        return devices, SliceSpec(name, "", None, n, float("nan"), float("nan"))
    if name.startswith("cpu:"):
        n = int(name[4:])
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise SystemExit(f"--slice {name}: only {len(devices)} CPU devices (set XLA_FLAGS="
                             f"--xla_force_host_platform_device_count={n} before jax is imported)")
        return devices[:n], SliceSpec(name, "", None, n, float("nan"), float("nan"))
    if name not in SLICES:
        raise SystemExit(f"--slice {name}: unknown; choose one of {sorted(SLICES)} or cpu:<n>")
    spec = SLICES[name]
    try:
        from jax.experimental import topologies

        kw = {"chip_config_name": spec.chip_config_name} if spec.chip_config_name else {}
        topo = topologies.get_topology_desc(topology_name=spec.topology, platform="tpu", **kw)
    except Exception as e:  # noqa: BLE001
        raise SystemExit(f"--slice {name}: cannot describe the TPU topology {spec.topology!r} ({type(e).__name__}: "
                         f"{e}); install the TPU runtime library: pip install -r requirements-aot.txt") from None
    devices = list(topo.devices)
    assert len(devices) == spec.chips, (name, len(devices))
    return devices, spec


# ---------------------------------------------------------------------------------------------- model + state


def model_config(model: str, *, dtype: str = "bfloat16", compute_dtype: str = "", remat: str = "none",
                 layers: int = 0, scan: bool = False):
    """The `ModelConfig` of `model` (`layers` > 0: only that many decoder layers, to measure compile time and
    memory of a truncated model)."""
    hf = MODELS[model]
    if hf is None:
        from align_jax.data.toy import toy_model_config

        hf = toy_model_config()
    if layers:
        hf = dict(hf, num_hidden_layers=layers)
    return from_hf_config(hf, param_dtype=dtype, compute_dtype=compute_dtype or None, remat_policy=remat,
                          scan_layers=scan)


def experiment_config(algorithm: str, *, batch: int, mesh_shape, dtype: str, compute_dtype: str, remat: str,
                      chunk_size: int | None = None, completion_len: int = 0, scan: bool = False):
    """configs/<algorithm>.py's config with the benchmark's batch, model dtype, remat and mesh."""
    c = load_config_file(str(ROOT / "configs" / f"{algorithm}.py"))
    c.batch_size = batch
    c.model.dtype, c.model.compute_dtype, c.model.remat = dtype, compute_dtype, remat
    c.model.scan_layers = scan
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_shape
    if chunk_size:
        c.chunk_size = chunk_size
    if algorithm == "grpo":
        c.grpo.max_completion_length = completion_len
    return c


def _abstract_module(module_fn, mesh, filters=(nnx.Param,)):
    """(graphdef, params, rest) of the module `module_fn()` builds, without allocating it: the parameters are
    `ShapeDtypeStruct`s carrying the NamedSharding of their logical axes (as `parallel.create_sharded` creates
    them); `rest` (non-parameter variables: the RoPE frequencies) is made concrete, since the train step closes
    over it. With several `filters` (LoRA: trainable, frozen), one parameter state per filter:
    (graphdef, *states, rest)."""
    abstract = nnx.eval_shape(module_fn)
    graphdef, *states, rest = nnx.split(abstract, *filters, ...)

    def attach(v):
        spec = logical_to_spec(v.get_metadata().get("logical_axes"), v.shape, mesh)
        return v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, spec)))

    states = [jax.tree.map(attach, st, is_leaf=lambda x: isinstance(x, nnx.Variable)) for st in states]
    config = abstract.config

    def concrete(path, x):
        if isinstance(x, jax.ShapeDtypeStruct):
            if "'inv_freq'" in jax.tree_util.keystr(path):
                return jnp.asarray(rope_inv_freq(config))
            raise NotImplementedError(f"non-parameter variable {jax.tree_util.keystr(path)} has no concrete value "
                                      "here: teach aot_topology._abstract_module how to build it")
        return x

    rest = jax.tree_util.tree_map_with_path(concrete, rest)
    return (graphdef, *states, rest)


def _sds(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_batch(algorithm: str, batch: int, seq_len: int, mesh, completion_len: int = 0,
                   precomputed_reference: bool = False) -> dict:
    """The training batch the loop feeds `algorithm` (`align_jax.data.pipeline` collate functions; GRPO:
    `rl.rollout.training_batch` with the reference's log-probs), as ShapeDtypeStructs split over the batch axes.
    `batch`: pairs (dpo, reward_model), rows (sft), completions R = prompts x G (grpo)."""
    B, L, i32, f32 = batch, seq_len, jnp.int32, jnp.float32
    if algorithm in ("dpo", "reward_model"):
        shapes = {f"{s}_{k}": ((B, L), i32) for s in ("chosen", "rejected")
                  for k in ("input_ids", "attention_mask", "completion_mask")}
        shapes.update(label_probs=((B,), f32), example_weight=((B,), f32), record_index=((B,), i32))
        if precomputed_reference:  # reference.precompute: the batch carries the reference's sequence log-probs
            shapes.update(ref_chosen_logps=((B,), f32), ref_rejected_logps=((B,), f32))
    elif algorithm == "sft":
        shapes = {k: ((B, L), i32) for k in ("input_ids", "attention_mask", "completion_mask", "segment_ids",
                                             "positions")}
        shapes["example_weight"] = ((B,), f32)
    elif algorithm == "grpo":
        N = completion_len
        shapes = {"input_ids": ((B, L), i32), "attention_mask": ((B, L), i32), "completion_mask": ((B, N), i32),
                  "advantages": ((B,), f32), "num_items": ((B,), f32), "ref_logps": ((B, N), f32)}
    else:
        raise SystemExit(f"--algorithm {algorithm}: choose dpo, sft, reward_model or grpo")
    arrays = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}
    return _sds(arrays, batch_specs(arrays, mesh))


@dataclasses.dataclass
class Built:
    fn: object  # the jitted train step
    args: tuple  # (abstract state, abstract batch, abstract reference params or None)
    mcfg: object
    num_params: int
    mesh_shape: tuple  # (data, fsdp, tensor), -1 resolved


def build_step(model: str, algorithm: str, devices, mesh_shape, *, batch: int, seq_len: int, remat: str = "none",
               dtype: str = "bfloat16", compute_dtype: str = "", chunk_size: int | None = None,
               completion_len: int = 0, layers: int = 0, scan: bool = False, lora_rank: int = 0,
               live_reference: bool = True, attention: str = "xla") -> Built:
    """The jitted train step of `train()` for `model` x `algorithm` on `devices` with mesh `mesh_shape` =
    (data, fsdp, tensor), and its abstract arguments. `lora_rank` > 0: LoRA on every projection (config.lora's
    defaults), the base weights a frozen fourth argument, the reference (DPO) made from them in the step as
    `train()` does; `live_reference=False`: the reference's log-probs precomputed (DPO: in the batch).
    `attention`: config.model.attention ("xla" | "dot_product" | "cudnn")."""
    mesh = make_mesh(*mesh_shape, devices=devices)
    mesh_shape = tuple(mesh.shape[a] for a in ("data", "fsdp", "tensor"))
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % replicas:
        raise SystemExit(f"--batch {batch} is not divisible by the data-parallel size {replicas} (data x fsdp)")
    if algorithm == "grpo" and not 0 < completion_len < seq_len:
        raise SystemExit(f"grpo: --completion_len must be in (0, --seq_len), got {completion_len}")
    algo = get_algorithm(algorithm)
    cfg = experiment_config(algorithm, batch=batch, mesh_shape=mesh_shape, dtype=dtype, compute_dtype=compute_dtype,
                            remat=remat, chunk_size=chunk_size, completion_len=completion_len, scan=scan)
    mcfg = model_config(model, dtype=dtype, compute_dtype=compute_dtype, remat=remat, layers=layers, scan=scan)
    mcfg = mcfg.replace(attention=attention)
    base_fn = (lambda: ScalarHeadModel(mcfg, rngs=nnx.Rngs(0))) if algo.scalar_head else \
        (lambda: Transformer(mcfg, rngs=nnx.Rngs(0)))
    frozen = frozen_sh = None
    if lora_rank:
        from align_jax.models import lora

        cfg.lora.rank = lora_rank

        def module_fn():
            m = base_fn()
            lora.add_lora(m, cfg.lora)
            return m

        graphdef, params, frozen, rest = _abstract_module(module_fn, mesh, (lora.trainable_filter(), nnx.Param))
        frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    else:
        graphdef, params, rest = _abstract_module(base_fn, mesh)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.total_steps)
    sh = state_shardings(tx, params, mesh)
    replicated = NamedSharding(mesh, P())
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), "params": params,
             "opt_state": _sds(jax.eval_shape(tx.init, params), sh["opt_state"]),
             "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)}
    ref_graphdef = ref_params = ref_rest = ref_sh = None
    wants_ref = algo.needs_reference and not cfg.loss.get("reference_free", False)
    if wants_ref and live_reference and lora_rank:
        # train(): the base model = the policy's own arrays with the adapters off, made inside the step
        def off_fn():
            return lora.adapters_off(module_fn())

        ref_graphdef, _, _, ref_rest = _abstract_module(off_fn, mesh, (lora.trainable_filter(), nnx.Param))
    elif wants_ref and live_reference:
        # train.model.frozen_reference: a copy of the policy (same shardings), never rematerialised
        ref_cfg = mcfg.replace(remat_policy="none")
        ref_graphdef, ref_params, ref_rest = _abstract_module(lambda: Transformer(ref_cfg, rngs=nnx.Rngs(0)), mesh)
        ref_sh = jax.tree.map(lambda x: x.sharding, ref_params)
    abatch = abstract_batch(algorithm, batch, seq_len, mesh, completion_len,
                            precomputed_reference=wants_ref and not live_reference)
    fn = jit_train_step(state_shardings=sh, batch_shardings=jax.tree.map(lambda x: x.sharding, abatch),
                        ref_shardings=ref_sh, metric_sharding=replicated, graphdef=graphdef, rest=rest,
                        ref_graphdef=ref_graphdef, ref_rest=ref_rest, algorithm=algo, cfg=cfg, tx=tx,
                        schedule=schedule, accum=cfg.optimizer.grad_accum_steps, mesh=mesh,
                        frozen_shardings=frozen_sh)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params)) + \
        sum(math.prod(x.shape) for x in jax.tree.leaves(frozen or {}))
    args = (state, abatch, ref_params) + (() if frozen is None else (frozen,))
    return Built(fn, args, mcfg, n, mesh_shape)


def compile_planned(built: Built):
    """(compiled step, compile seconds, planned peak GiB = arguments + outputs - donated + temporaries, from XLA's
    memory analysis of `built.fn`)."""
    t0 = time.perf_counter()
    compiled = built.fn.lower(*built.args).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    plan = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
            + ma.temp_size_in_bytes) / GIB
    return compiled, compile_s, plan


def fresh_arguments(built: Built, seed: int = 0):
    """Concrete arguments for `built.fn` as a fresh run has them: random base weights and LoRA A (std 0.02), LoRA
    B zero (PEFT's init), AdamW's moments and count zero, step 0; a preference batch of random tokens with every
    token real and the second half of each sequence the completion (random second moments would be negative:
    sqrt -> NaN, every update skipped as non-finite)."""
    key = [jax.random.key(seed)]

    def make(path, x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        name = jax.tree_util.keystr(path)
        key[0], k = jax.random.split(key[0])
        if "opt_state" in name or re.search(r"\['lora_[a-z]+_b'\]", name) or (
                x.shape == () and jnp.issubdtype(x.dtype, jnp.signedinteger)):
            v = jnp.zeros(x.shape, x.dtype)
        elif jnp.issubdtype(x.dtype, jnp.integer):
            v = jax.random.randint(k, x.shape, 1, 250, x.dtype)
        else:
            v = (0.02 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
        return jax.device_put(v, x.sharding)

    state, batch, *rest = jax.tree_util.tree_map_with_path(make, built.args)
    batch = dict(batch)
    for side in ("chosen", "rejected"):
        if f"{side}_attention_mask" in batch:
            T = batch[f"{side}_attention_mask"].shape[1]
            batch[f"{side}_attention_mask"] = jnp.ones_like(batch[f"{side}_attention_mask"])
            batch[f"{side}_completion_mask"] = jnp.ones_like(batch[f"{side}_completion_mask"]).at[:, :T // 2].set(0)
    for k in ("label_probs", "example_weight"):
        if k in batch:
            batch[k] = jnp.ones_like(batch[k])
    for k in ("ref_chosen_logps", "ref_rejected_logps"):  # a precomputed reference near the random policy's
        if k in batch:
            T = batch["chosen_attention_mask"].shape[1]
            batch[k] = jnp.full_like(batch[k], -(T // 2) * math.log(built.mcfg.vocab_size))
    return (state, batch, *rest)


# ------------------------------------------------------------------------------------------------------ FLOPs


def step_flops(mcfg, algorithm: str, batch: int, seq_len: int, *, remat: str = "none",
               completion_len: int = 0) -> dict:
    """Analytic FLOPs of one train step (module docstring): {"policy", "reference", "remat", "logits_recompute",
    "model" (policy + reference: for MFU), "executed" (everything the step runs)}."""
    c = mcfg
    D, F, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    H, K, E = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    T = seq_len
    n_mm = L * (2 * D * H * E + 2 * D * K * E + 3 * D * F)
    S = 2 * batch if algorithm in ("dpo", "reward_model") else batch
    tokens = S * T
    attn_fwd = 4 * L * H * E * T * T * S  # q k^T and p v over the full T x T square
    head_tokens = {"grpo": S * completion_len, "reward_model": 0}.get(algorithm, S * (T - 1))
    head = 2 * D * V * head_tokens  # one forward of the LM head
    scalar = 2 * D * tokens if algorithm == "reward_model" else 0
    out = {"policy": 3 * (2 * n_mm * tokens + attn_fwd + head + scalar),
           "reference": 2 * n_mm * tokens + attn_fwd + head if algorithm == "dpo" else 0,
           "remat": {"full": 2 * n_mm * tokens + attn_fwd, "dots_with_no_batch_dims": attn_fwd}.get(remat, 0),
           "logits_recompute": head}
    out["model"] = out["policy"] + out["reference"]
    out["executed"] = out["model"] + out["remat"] + out["logits_recompute"]
    return out


# ---------------------------------------------------------------------------------------------------- running


@dataclasses.dataclass
class Result:
    model: str
    algorithm: str
    slice: str
    mesh: tuple
    batch: int
    seq_len: int
    remat: str
    dtype: str
    num_params: int
    hbm_gib: float
    chips: int
    peak_tflops: float
    flops: dict
    compile_s: float = float("nan")
    args_gib: float = float("nan")
    out_gib: float = float("nan")
    alias_gib: float = float("nan")
    temp_gib: float = float("nan")
    code_gib: float = 0.0
    # Inputs the step does not read (GRPO's loss step gets the frozen reference, which only the rollout uses):
    # `jax.jit` drops them from the executable, but the training loop keeps them in HBM, so they count in the peak.
    unused_gib: float = 0.0
    peak_gib: float = float("nan")
    error: str = ""  # the compiler's refusal (out of HBM), shortened
    # When the compiler refused: what it said the program needs ("temps": its temporaries alone, "total": all
    # buffers) and the HBM it had (the usable part of the chip's HBM, e.g. 15.75 of v5e's 16 GiB).
    needed_gib: float = float("nan")
    needed_what: str = ""
    available_gib: float = float("nan")
    step_time: float = 0.0
    layers: int = 0  # decoder layers compiled (`layers` < the model's: a truncated model)
    total_layers: int = 0  # the model's
    extrapolated: bool = False  # `extrapolate`d to the full depth from two truncated compiles
    cost_flops: float = float("nan")  # compiled.cost_analysis()["flops"] (CPU compiles; per device)
    scan: bool = False  # the layers as one lax.scan (config.model.scan_layers) instead of unrolled

    @property
    def fits(self) -> str:
        if self.error:
            return "no"
        if math.isnan(self.hbm_gib):
            return "n/a"
        return "yes" if self.peak_gib <= self.hbm_gib else "no"

    @property
    def mfu(self) -> float:
        if not self.step_time or math.isnan(self.peak_tflops):
            return float("nan")
        return self.flops["model"] / (self.step_time * self.chips * self.peak_tflops * 1e12)


OOM = re.compile(r"Ran out of memory|RESOURCE_EXHAUSTED|exceeds available HBM|Exceeded hbm capacity", re.I)
# The TPU compiler's refusals: libtpu 0.0.42 says "the total memory required for HLO temporaries (16.42G) exceeds
# available HBM (15.75G)"; other releases say "Used 17.29G of 15.48G hbm".
HBM_REFUSALS = (
    ("temps", re.compile(r"temporaries\s*\(([\d.]+)([KMGT])i?B?\)\s*exceeds available HBM\s*\(([\d.]+)([KMGT])", re.I)),
    ("total", re.compile(r"Used\s+([\d.]+)([KMGT])i?B?\s+of\s+([\d.]+)([KMGT])i?B?\s+hbm", re.I)),
)


def parse_hbm_refusal(msg: str):
    """(what, needed GiB, available GiB) from a TPU compiler out-of-HBM message, or None."""
    for what, pattern in HBM_REFUSALS:
        m = pattern.search(msg)
        if m:
            return what, gib(m.group(1), m.group(2)), gib(m.group(3), m.group(4))
    return None


def gib(x: str, unit: str) -> float:
    return float(x) * 1024.0 ** ("KMGT".index(unit.upper()) + 1) / GIB


def _per_device_bytes(x: jax.ShapeDtypeStruct) -> int:
    return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def run_config(model: str, algorithm: str, slice_name: str, mesh_shape, *, batch: int, seq_len: int,
               remat: str = "none", dtype: str = "bfloat16", compute_dtype: str = "", step_time: float = 0.0,
               chunk_size: int | None = None, completion_len: int = 0, layers: int = 0, devices=None, spec=None,
               cost: bool = False, compiler_options: dict | None = None, scan: bool = False, lora_rank: int = 0,
               live_reference: bool = True) -> Result:
    """Builds, lowers and compiles one configuration; returns its `Result` (a compiler refusal for lack of HBM is
    recorded, not raised). `cost`: also record `compiled.cost_analysis()["flops"]` (per device);
    `compiler_options`: XLA options for this compile (the test lowers the CPU backend's optimisation level)."""
    if devices is None:
        devices, spec = slice_devices(slice_name)
    if algorithm == "grpo" and not completion_len:
        completion_len = seq_len // 2
    built = build_step(model, algorithm, devices, mesh_shape, batch=batch, seq_len=seq_len, remat=remat, dtype=dtype,
                       compute_dtype=compute_dtype, chunk_size=chunk_size, completion_len=completion_len,
                       layers=layers, scan=scan, lora_rank=lora_rank, live_reference=live_reference)
    flops = step_flops(built.mcfg, algorithm, batch, seq_len, remat=remat, completion_len=completion_len)
    r = Result(model, algorithm, slice_name, built.mesh_shape, batch, seq_len, remat, dtype, built.num_params,
               spec.hbm_gib, spec.chips, spec.peak_tflops, flops, step_time=step_time,
               layers=built.mcfg.num_hidden_layers, total_layers=model_config(model).num_hidden_layers, scan=scan)
    t0 = time.perf_counter()
    try:
        compiled = built.fn.lower(*built.args).compile(compiler_options)
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        if not OOM.search(msg):
            raise
        r.compile_s = time.perf_counter() - t0
        parsed = parse_hbm_refusal(msg)
        if parsed:
            r.needed_what, r.needed_gib, r.available_gib = parsed
        r.error = " ".join(msg.split())[:300]
        return r
    r.compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    r.args_gib = ma.argument_size_in_bytes / GIB
    r.out_gib = ma.output_size_in_bytes / GIB
    r.alias_gib = ma.alias_size_in_bytes / GIB
    r.temp_gib = ma.temp_size_in_bytes / GIB
    r.code_gib = getattr(ma, "generated_code_size_in_bytes", 0) / GIB
    inputs_gib = sum(_per_device_bytes(x) for x in jax.tree.leaves(built.args)) / GIB
    if inputs_gib - r.args_gib > 1e-3 * inputs_gib + 1e-6:
        r.unused_gib = inputs_gib - r.args_gib
    r.peak_gib = r.args_gib + r.out_gib - r.alias_gib + r.temp_gib + r.code_gib + r.unused_gib
    if cost:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        r.cost_flops = float(ca.get("flops", float("nan"))) if ca else float("nan")
    return r


def extrapolate(a: Result, b: Result) -> Result:
    """The full-depth row from two compiles of the same configuration truncated to different layer counts: every
    memory figure linear in the layer count (what the compiles of Llama-3-8B at 2, 4, 8 and 32 layers show),
    FLOPs for the full model, no compile time."""
    assert (a.model, a.algorithm, a.slice, a.mesh, a.batch, a.seq_len, a.remat) == \
        (b.model, b.algorithm, b.slice, b.mesh, b.batch, b.seq_len, b.remat) and a.layers != b.layers
    full = a.total_layers
    t = (full - a.layers) / (b.layers - a.layers)
    lin = lambda name: getattr(a, name) + t * (getattr(b, name) - getattr(a, name))  # noqa: E731
    mcfg = model_config(a.model, dtype=a.dtype, remat=a.remat)
    completion = a.seq_len // 2 if a.algorithm == "grpo" else 0
    flops = step_flops(mcfg, a.algorithm, a.batch, a.seq_len, remat=a.remat, completion_len=completion)
    names = ("args_gib", "out_gib", "alias_gib", "temp_gib", "code_gib", "unused_gib", "peak_gib")
    return dataclasses.replace(a, flops=flops, layers=full, extrapolated=True, compile_s=float("nan"),
                               num_params=mcfg.num_params, **{n: lin(n) for n in names})


def extrapolations(results) -> list[Result]:
    """`extrapolate` for each configuration compiled truncated at two (or more: the two deepest) layer counts."""
    groups = {}
    for r in results:
        if r.layers < r.total_layers and not r.error:
            groups.setdefault((r.model, r.algorithm, r.slice, r.mesh, r.batch, r.seq_len, r.remat, r.scan),
                              []).append(r)
    out = []
    for rs in groups.values():
        rs = sorted({r.layers: r for r in rs}.values(), key=lambda r: r.layers)
        if len(rs) >= 2:
            out.append(extrapolate(rs[-2], rs[-1]))
    return out


# ------------------------------------------------------------------------------------------------------ output

COLUMNS = ("model", "algorithm", "slice", "mesh d,f,t", "batch x len", "remat, layers", "args GiB", "temps GiB",
           "peak GiB", "HBM GiB", "fits", "model TFLOP/step", "MFU @ step", "compile s")


def _f(x: float, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def row(r: Result) -> list[str]:
    peak = _f(r.peak_gib)
    if r.error:
        peak = (f"> HBM ({r.needed_what} {r.needed_gib:.2f} > {r.available_gib:.2f})" if r.needed_what else "> HBM")
    mfu = "-" if math.isnan(r.mfu) else f"{100 * r.mfu:.1f}% @ {r.step_time:g} s"
    model = r.model
    if r.extrapolated:
        model += f" (extrapolated to {r.layers} layers)"
    elif r.layers < r.total_layers:
        model += f" ({r.layers} of {r.total_layers} layers)"
    return [model, r.algorithm, r.slice, ",".join(map(str, r.mesh)), f"{r.batch} x {r.seq_len}",
            f"{r.remat}, {'scan' if r.scan else 'unrolled'}",
            _f(r.args_gib), _f(r.temp_gib), peak, _f(r.hbm_gib, ".0f"), r.fits, f"{r.flops['model'] / 1e12:.1f}",
            mfu, _f(r.compile_s, ".0f")]


def markdown(results) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- grid

# (model, algorithm, slice, mesh, batch, seq_len, remat[, layers[, scan]]): the README's table. Each does-not-fit
# row is followed by the change that makes it fit. `scan`: the layers as one lax.scan (config.model.scan_layers);
# unrolled layers let the compiler schedule several layers' rematerialised forwards at once (their [B, T, 14336]
# MLP activations live together: ~1 GiB per layer for 8B at 2 pairs x 2048 tokens per chip), and their compile
# grows with depth (an 80-layer unrolled 70B needs ~38 GB of compiler memory); scanned, both stay flat.
GRID = [
    ("llama3-8b", "dpo", "v5p-64", (1, 32, 1), 64, 2048, "none"),  # does not fit ...
    ("llama3-8b", "dpo", "v5p-64", (1, 32, 1), 64, 2048, "full"),  # ... remat fits
    ("llama3-8b", "dpo", "v5p-64", (1, 32, 1), 64, 2048, "full", 0, True),  # ... scanned: a third of the memory
    ("llama3-8b", "dpo", "v5e-256", (1, 256, 1), 256, 2048, "full"),  # does not fit ...
    ("llama3-8b", "dpo", "v5e-256", (1, 128, 2), 256, 2048, "full"),  # ... tensor parallelism 2 fits
    ("llama3-8b", "dpo", "v5e-256", (1, 256, 1), 256, 2048, "full", 0, True),  # ... and so does scanning
    ("llama3-8b", "sft", "v6e-64", (1, 64, 1), 128, 2048, "full"),
    ("llama3-8b", "sft", "v6e-64", (1, 64, 1), 128, 2048, "full", 0, True),
    ("llama3-8b", "reward_model", "v6e-64", (1, 64, 1), 64, 2048, "full"),
    ("llama3-8b", "reward_model", "v6e-64", (1, 64, 1), 64, 2048, "full", 0, True),
    ("llama3-8b", "grpo", "v5p-64", (1, 32, 1), 256, 1024, "full"),
    ("llama3-8b", "grpo", "v5p-64", (1, 32, 1), 256, 1024, "full", 0, True),
    ("qwen3-8b", "dpo", "v6e-64", (1, 64, 1), 64, 2048, "full"),
    ("qwen3-8b", "dpo", "v6e-64", (1, 64, 1), 64, 2048, "full", 0, True),
    ("llama3-70b", "dpo", "v5p-64", (1, 32, 1), 32, 2048, "full", 0, True),
    ("llama3-70b", "dpo", "v5e-256", (1, 256, 1), 256, 2048, "full", 0, True),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b", choices=sorted(MODELS))
    p.add_argument("--algorithm", default="dpo", choices=("dpo", "sft", "reward_model", "grpo"))
    p.add_argument("--slice", default="v5p-64", help=f"{', '.join(SLICES)} or cpu:<n>")
    p.add_argument("--mesh", default="", help="data,fsdp,tensor (one may be -1); default 1,<chips>,1 (all FSDP)")
    p.add_argument("--batch", type=int, default=64,
                   help="global batch: pairs (dpo, reward_model), rows (sft), completions (grpo)")
    p.add_argument("--seq_len", type=int, default=2048, help="padded length of each sequence (grpo: prompt + "
                                                             "completion)")
    p.add_argument("--completion_len", type=int, default=0, help="grpo: completion tokens N (default seq_len/2)")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots", "dots_with_no_batch_dims"))
    p.add_argument("--dtype", default="bfloat16", help="parameter (and optimizer state) dtype")
    p.add_argument("--compute_dtype", default="", help="activation dtype (default: --dtype)")
    p.add_argument("--chunk_size", type=int, default=0, help="vocabulary chunk of the log-prob op (default: config)")
    p.add_argument("--scan_layers", action="store_true", help="the decoder layers as one lax.scan "
                                                               "(config.model.scan_layers)")
    p.add_argument("--layers", type=int, default=0, help="compile only this many decoder layers (0: all), to see "
                                                         "how memory and compile time grow per layer")
    p.add_argument("--step_time", type=float, default=0.0, help="seconds per step: print the MFU it would mean")
    p.add_argument("--table", action="store_true", help="run the README grid (GRID) instead of one configuration")
    p.add_argument("--only", default="", help="with --table: comma-separated row indices of GRID to run")
    a = p.parse_args(argv)
    print(f"jax {jax.__version__}, jaxlib {jax.lib.__version__}, libtpu {_libtpu_version()}", flush=True)
    if a.table:
        keys = ("model", "algorithm", "slice", "mesh", "batch", "seq_len", "remat", "layers", "scan")
        configs = [dict(zip(keys, g)) for g in GRID]
        if a.only:
            configs = [configs[int(i)] for i in a.only.split(",")]
    else:
        configs = [dict(model=a.model, algorithm=a.algorithm, slice=a.slice, mesh=a.mesh, batch=a.batch,
                        seq_len=a.seq_len, remat=a.remat, layers=a.layers, scan=a.scan_layers)]
    print("| " + " | ".join(COLUMNS) + " |\n|" + "|".join("---" for _ in COLUMNS) + "|", flush=True)
    results = []
    for c in configs:
        devices, spec = slice_devices(c["slice"])
        mesh = c["mesh"]
        if isinstance(mesh, str):
            mesh = tuple(int(x) for x in mesh.split(",")) if mesh else (1, len(devices), 1)
        r = run_config(c["model"], c["algorithm"], c["slice"], mesh, batch=c["batch"], seq_len=c["seq_len"],
                       remat=c["remat"], dtype=a.dtype, compute_dtype=a.compute_dtype, step_time=a.step_time,
                       chunk_size=a.chunk_size or None, completion_len=a.completion_len,
                       layers=c.get("layers", 0), devices=devices, spec=spec, scan=c.get("scan", False))
        results.append(r)
        print("| " + " | ".join(row(r)) + " |", flush=True)
        detail = (f"    {r.num_params / 1e9:.2f} B params; per chip: args {r.args_gib:.2f} + out {r.out_gib:.2f} - "
                  f"aliased {r.alias_gib:.2f} + temps {r.temp_gib:.2f} + code {r.code_gib:.3f} + resident inputs the "
                  f"step does not read {r.unused_gib:.2f} GiB; FLOPs/step: "
                  f"model {r.flops['model'] / 1e12:.1f} T (policy {r.flops['policy'] / 1e12:.1f}, reference "
                  f"{r.flops['reference'] / 1e12:.1f}), executed {r.flops['executed'] / 1e12:.1f} T")
        print(detail if not r.error else f"    compiler: {r.error}", file=sys.stderr, flush=True)
    for r in extrapolations(results):
        print("| " + " | ".join(row(r)) + " |", flush=True)
    return 0


def _libtpu_version() -> str:
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:  # noqa: BLE001
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
