"""Memory of a DPO train step on this machine's CPU, from the compiled step's memory analysis (nothing is allocated):
full fine-tuning vs LoRA, with the reference live or precomputed, remat policies, Llama shapes from 110M to 8B; and
the largest Llama-shaped model whose DPO step fits the machine, full and LoRA.

    JAX_PLATFORMS=cpu python benchmarks/memory.py                 # the README's table + the search (~40 min, 2 cores)
    JAX_PLATFORMS=cpu python benchmarks/memory.py --models=llama-110m --no-search     # one model, ~6 min
    JAX_PLATFORMS=cpu python benchmarks/memory.py --run=llama-110m:lora   # run 2 steps: measured vs planned memory

What is compiled: the train step `align_jax.train.train()` runs (`train.step.jit_train_step`, built by
`benchmarks/aot_topology.build_step`: loss + gradients + AdamW update, state donated), on one CPU device, for a batch
of 8 pairs x 512 tokens (16 sequences), parameters in bfloat16 (AdamW's moments follow the parameter dtype; LoRA
adapters float32), layers as one `lax.scan` (`model.scan_layers`, so the compile time does not grow with depth),
vocabulary-chunked log-probs (config.chunk_size 8192). LoRA: rank 16, alpha 16, all seven projections
(config.lora's defaults but the rank); the reference is the base model with the adapters off, computed from the same
weights inside the step (no second copy). "precomputed": `reference.precompute` (the batch carries the reference's
log-probs; no reference weights or forward in the step).

Peak = arguments + outputs − donated (aliased) + temporaries (XLA's buffer assignment for this program). With the
layers scanned, remat changes the CPU plan as it would on an accelerator (`none` keeps every layer's activations
for the backward pass: 1B full fine-tuning 60.2 GiB of temporaries against 16.1 GiB with `full`; with the layers
unrolled the CPU compiler plans the same temporaries whatever the policy). A fit means
peak <= 0.9 x the machine's memory (24 GiB here: 21.6 GiB), leaving room for the Python process, XLA's runtime and
the data pipeline.

Largest model that fits. Per-device memory is linear in the number of decoder layers at a fixed width (checked on
TPU compiles in aot_topology.py; here from two depths), so the search compiles the step at two depths of a width,
solves for the deepest model under the budget, then compiles that depth to confirm: full fine-tuning on the
Llama-3.2-3B width (hidden 3072), LoRA on the Llama-3-8B width (hidden 4096).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

MODELS = ("llama-110m", "llama3.2-1b", "llama3.2-3b", "llama3-8b")
# compiled at 2 and 4 layers and extrapolated (a full-depth CPU compile of these needs 11+ GB of compiler memory)
EXTRAPOLATED = ("llama3.2-3b", "llama3-8b")
BATCH, SEQ_LEN, RANK = 8, 512, 16


def machine_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def measure(model: str, *, lora: bool, live: bool, remat: str = "full", layers: int = 0) -> dict:
    import aot_topology as a

    devices, spec = a.slice_devices("cpu:1")
    r = a.run_config(model, "dpo", "cpu:1", (1, 1, 1), batch=BATCH, seq_len=SEQ_LEN, remat=remat, dtype="bfloat16",
                     devices=devices, spec=spec, scan=True, lora_rank=RANK if lora else 0, live_reference=live,
                     layers=layers)
    return {"model": model, "mode": "LoRA r16" if lora else "full", "reference": "live" if live else "precomputed",
            "remat": remat, "layers": r.layers, "params_b": r.num_params / 1e9, "args_gib": r.args_gib,
            "temp_gib": r.temp_gib, "peak_gib": r.peak_gib, "compile_s": r.compile_s}


def run_steps(model: str, *, lora: bool, steps: int = 2, layers: int = 0) -> dict:
    """Materialises the step's arguments as a fresh run has them (random base weights and LoRA A, LoRA B zero as in
    PEFT's init, AdamW's moments and count zero, step 0; a batch of random tokens) and runs `steps` train steps,
    measuring the process's peak resident memory (getrusage) against the compiled plan's peak.

    Step 0's loss is ln 2 by construction (the policy is its reference: `policy_is_reference`); later losses move
    only if the update was applied, so the result reports `nonfinite` and the state's step counter too (random
    AdamW second moments, as this function once used, are negative: sqrt -> NaN, every update skipped)."""
    import resource

    import numpy as np

    import aot_topology as a

    devices, spec = a.slice_devices("cpu:1")
    built = a.build_step(model, "dpo", devices, (1, 1, 1), batch=BATCH, seq_len=SEQ_LEN, remat="full",
                         dtype="bfloat16", scan=True, lora_rank=RANK if lora else 0, layers=layers)
    compiled, compile_s, plan = a.compile_planned(built)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    state, batch, ref, *frozen = a.fresh_arguments(built)
    times, losses, nonfinite = [], [], []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch, ref, *frozen)
        losses.append(float(metrics["loss"]))
        nonfinite.append(float(metrics["nonfinite"]))
        times.append(time.perf_counter() - t)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"model": model, "mode": "LoRA r16" if lora else "full", "layers": built.mcfg.num_hidden_layers,
            "params_b": built.num_params / 1e9, "planned_peak_gib": plan, "rss_before_gib": rss0,
            "rss_peak_gib": rss1, "step_seconds": times, "losses": losses, "nonfinite": nonfinite,
            "steps_applied": int(state["step"]), "compile_s": compile_s,
            "finite": bool(np.all(np.isfinite(losses)))}


def linear_fit(model: str, *, lora: bool, depths=(2, 4)) -> dict:
    """Per-device peak memory of `model`'s DPO step as fixed + per_layer x layers, from compiles truncated to two
    depths (memory is linear in depth at a fixed width); the full-depth row and its parameter count follow."""
    import aot_topology as a

    lo, hi = (measure(model, lora=lora, live=True, layers=d) for d in depths)
    dl = hi["layers"] - lo["layers"]
    fit = {k: ((hi[k] - lo[k]) / dl, lo[k] - (hi[k] - lo[k]) / dl * lo["layers"])
           for k in ("peak_gib", "args_gib", "temp_gib", "params_b")}
    L = a.model_config(model).num_hidden_layers
    row = dict(lo, layers=L, reference="live", extrapolated=True,
               **{k: fit[k][1] + fit[k][0] * L for k in fit})
    return {"fit": fit, "row": row, "compiles": [lo, hi]}


def largest(fit: dict, budget: float) -> dict:
    """The deepest model of the fitted width whose peak is within `budget`."""
    per, fixed = fit["fit"]["peak_gib"]
    depth = int(math.floor((budget - fixed) / per))
    p_per, p_fixed = fit["fit"]["params_b"]
    return {"model": fit["row"]["model"], "mode": fit["row"]["mode"], "layers": depth,
            "params_b": p_fixed + p_per * depth, "peak_gib": fixed + per * depth, "per_layer_gib": per,
            "fixed_gib": fixed, "next_layer_peak_gib": fixed + per * (depth + 1)}


def table(rows: list[dict]) -> str:
    out = ["| model | params | mode | reference | remat | arguments GiB | temporaries GiB | peak GiB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ext = ", extrapolated" if r.get("extrapolated") else ""
        out.append(f"| {r['model']} ({r['layers']} layers{ext}) | {r['params_b']:.2f} B | {r['mode']} | {r['reference']} | "
                   f"{r['remat']} | {r['args_gib']:.2f} | {r['temp_gib']:.2f} | {r['peak_gib']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--no-search", action="store_true", help="skip the largest-model search")
    p.add_argument("--search-only", action="store_true", help="only the largest-model search")
    p.add_argument("--out", default="", help="also write the rows as JSON here")
    p.add_argument("--steps", type=int, default=2, help="--run: how many steps")
    p.add_argument("--run", default="", help="MODEL[:LAYERS]:full|lora: run --steps steps of that DPO step with random "
                   "weights and report the process's peak memory against the compiled plan (nothing else)")
    args = p.parse_args(argv)
    if args.run:
        model, *rest = args.run.split(":")
        mode = rest[-1]
        layers = int(rest[0]) if len(rest) == 2 else 0
        r = run_steps(model, lora=mode == "lora", layers=layers, steps=args.steps)
        print(json.dumps(r, indent=2))
        print(f"{r['model']} ({r['layers']} layers, {r['params_b']:.2f} B), {r['mode']}: planned peak "
              f"{r['planned_peak_gib']:.2f} GiB; process peak RSS {r['rss_peak_gib']:.2f} GiB (before the arguments "
              f"existed: {r['rss_before_gib']:.2f} GiB); steps {', '.join(f'{t:.1f}' for t in r['step_seconds'])} s; "
              f"losses {r['losses']}; updates applied {r['steps_applied']} of {len(r['losses'])}")
        return
    t0 = time.time()
    total = machine_gib()
    budget = 0.9 * total
    rows, found = [], []
    for m in [] if args.search_only else args.models.split(","):
        if m in EXTRAPOLATED:  # compiled at 2 and 4 layers, extrapolated to the full depth
            continue
        for lora in (False, True):
            for live in (True, False):
                rows.append(measure(m, lora=lora, live=live))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
        if m == "llama3.2-1b":
            for lora in (False, True):
                rows.append(measure(m, lora=lora, live=True, remat="none"))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    fits = {}
    for m in EXTRAPOLATED:
        if m not in args.models.split(",") and args.no_search:
            continue
        for lora in (False, True):
            fits[(m, lora)] = linear_fit(m, lora=lora)
            if not args.search_only:
                rows.append(fits[(m, lora)]["row"])
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\nDPO step, {BATCH} pairs x {SEQ_LEN} tokens, bfloat16 parameters, one CPU device "
          f"(compiled memory analysis; {total:.1f} GiB machine, budget {budget:.1f} GiB):\n")
    print(table(rows))
    if not args.no_search:
        for model, lora in (("llama3.2-3b", False), ("llama3-8b", True)):
            f = largest(fits[(model, lora)], budget)
            found.append(f)
            print(f"\nlargest {f['mode']} DPO step that fits {budget:.1f} GiB: {model} width with {f['layers']} layers = "
                  f"{f['params_b']:.2f} B parameters, peak {f['peak_gib']:.2f} GiB ({f['per_layer_gib']:.3f} GiB per "
                  f"layer + {f['fixed_gib']:.2f} GiB; one more layer: {f['next_layer_peak_gib']:.2f} GiB)", flush=True)
    print(f"\n(total {time.time() - t0:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "largest": found, "machine_gib": total, "budget_gib": budget,
                       "fits": {f"{m}:{'lora' if lo else 'full'}": v for (m, lo), v in fits.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
