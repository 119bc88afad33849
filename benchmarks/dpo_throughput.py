"""DPO training throughput: align-jax's jitted train step vs TRL's DPOTrainer, same model, data and machine.

    python benchmarks/dpo_throughput.py                                  # toy and ~110M, 5 timed steps each
    python benchmarks/dpo_throughput.py --sizes toy --steps 20 --warmup 3 --batch-size 16
    python benchmarks/dpo_throughput.py --sides jax                      # align-jax only (no torch / trl needed)

Models (random init, fp32, written once to a temporary Hugging Face directory that both sides load):
* `toy`: align_jax/data/toy/model_config.json (4 layers, hidden 128, vocab 256, tied embeddings, ~0.9M params);
* `100m`: Llama, hidden 768, 12 layers, 12 heads (no GQA), intermediate 2048, vocab 32000, tied embeddings
  (~110M params).
Data (the same pre-tokenized rows, in the same order, on both sides):
* `toy`: the embedded toy task's preference pairs (`toy:pairs`), tokenized by align-jax (chat template; identical to
  TRL's tokenization, see tests/test_trl_parity.py);
* `100m`: random token ids (the toy tokenizer's 256-word vocabulary does not fit a 32000 vocabulary): prompt,
  chosen and rejected lengths drawn uniformly from --prompt-len / --completion-len.
DPO settings on both sides: sigmoid loss, beta 0.1, AdamW lr 5e-6 with linear decay, gradient clipping at norm 1.0,
batch --batch-size pairs (2x rows: chosen and rejected in one forward), no truncation. Sides (--sides):
* `jax-default`: align-jax as configs/dpo.py runs it: packed rows and a precomputed reference (a forward-only pass
  over the same pairs first, `dpo.reference_logps`, as `precompute_reference` runs it: padded rows, batches of the
  config's eval_batch_size = 64 pairs, or all the pairs there are if fewer; the step then runs no reference
  forward). Its throughput counts the reference pass's time with the steps' (the work is the same: every token
  gets one reference forward).
* `jax-packed`, `jax`: packed rows / rows padded to a multiple of --bucket, each with a live reference model (a
  second copy of the weights), i.e. TRL's settings: the "equal settings" ratios.
* `trl`: DPOTrainer at its defaults (live reference, padding to the batch's longest row, gradient checkpointing).
Issue 16's item-3 targets are printed with each comparison: real tokens/s >= 2.5x TRL's with each side at its
defaults (jax-default / trl), and useful FLOPs (analytic, on real tokens only: `useful_flops`) >= 75 % of this
machine's fp32 matmul peak measured in the same process.

What is timed: `--warmup` steps (plus, for align-jax, one extra step per padded length that the timed batches use,
so that nothing is compiled while timed) run first; then the wall time of the next `--steps` optimizer steps,
from the end of the last warm-up step to the end of the last step. Per step that is, for align-jax: collating
the batch (numpy, right-padded to a multiple of --bucket), host->device transfer, the jitted train step (policy
forward + backward, reference forward, AdamW update), waiting for its result; for TRL: `Trainer.train`'s loop
(its DataLoader + `DataCollatorForPreference`, which pads to the longest row of the batch, `DPOTrainer`'s loss
with the fused LM head, backward, clipping, AdamW, its per-step metrics). Throughput = real (non-pad) tokens
of chosen + rejected sequences per second. Each side runs in its own fresh process, one after the other.
The tokenization of text is not timed on either side.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from bench_util import comma_choices, matmul_peak, run_child  # noqa: E402  (benchmarks/bench_util.py)
from align_jax.hostinfo import host_line  # noqa: E402

SIZES = {
    "toy": None,  # align_jax/data/toy/model_config.json
    "100m": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=768,
                 intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 head_dim=64, hidden_act="silu", max_position_embeddings=1024, initializer_range=0.02,
                 rms_norm_eps=1e-5, rope_theta=10000.0, attention_bias=False, mlp_bias=False,
                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0),
}
# Per size: the default batch (pairs) and steps; the 100m ones keep a run of both sides near 5 minutes on 2 cores.
SIZE_DEFAULTS = {"toy": dict(batch_size=8, steps=5, warmup=2), "100m": dict(batch_size=4, steps=3, warmup=1)}
SIDES = ("jax-default", "jax-packed", "jax", "trl")
# issue 16, item 3, at 110M: useful (real-token) FLOPs >= 75 % of the machine's matmul peak; real tokens/s >= 2.5x
# TRL's with each side at its defaults
TARGET_PEAK, TARGET_RATIO = 0.75, 2.5
PAD_ID = 0
LR = 5e-6
BETA = 0.1


# ------------------------------------------------------------------------------------------------ setup


def model_config(size: str) -> dict:
    if size == "toy":
        from align_jax.data.toy import toy_model_config

        return toy_model_config()
    return dict(SIZES[size])


def build_checkpoint(size: str, out: str, seed: int = 0) -> int:
    """Random-init checkpoint (transformers' LlamaForCausalLM if torch is installed, else align-jax's init) plus
    the toy tokenizer (used only for TRL's pad id). Returns the parameter count."""
    import shutil

    from align_jax.data.toy import TOKENIZER_DIR

    cfg = model_config(size)
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**cfg)).float()
        model.save_pretrained(out, safe_serialization=True)
        n = sum(p.numel() for p in model.parameters())
    except ImportError:
        import jax

        from align_jax.models import from_hf_config, init_model, save_pretrained

        model = init_model(from_hf_config(cfg), seed=seed)
        save_pretrained(model, out)
        from flax import nnx

        n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    for f in os.listdir(TOKENIZER_DIR):
        shutil.copyfile(os.path.join(TOKENIZER_DIR, f), os.path.join(out, f))
    return int(n)


def make_rows(size: str, n: int, workdir: str, prompt_len, completion_len, seed: int = 0) -> list[dict]:
    """n pre-tokenized rows {prompt_ids, chosen_ids, rejected_ids} (TRL's tokenized format)."""
    import numpy as np

    if size == "toy":
        from align_jax.data import formats, tokenize
        from align_jax.data.toy import generate, load_tokenizer

        files = generate(os.path.join(workdir, "toy_data"), seed=seed)
        tok = load_tokenizer()
        cfg = tokenize.TokenizeConfig(max_length=10_000)
        rows = []
        with open(files["pairs"]) as f:
            for line in f:
                ex = tokenize.tokenize_pairwise(formats.parse_pairwise(json.loads(line)), tok, cfg)
                p = int(np.argmax(ex["chosen_completion_mask"]))
                rows.append({"prompt_ids": ex["chosen_input_ids"][:p].tolist(),
                             "chosen_ids": ex["chosen_input_ids"][p:].tolist(),
                             "rejected_ids": ex["rejected_input_ids"][p:].tolist()})
                if len(rows) == n:
                    return rows
        raise ValueError(f"the toy task has fewer than {n} pairs")
    rng = np.random.default_rng(seed)
    vocab = model_config(size)["vocab_size"]
    ids = lambda lo_hi: rng.integers(7, vocab, rng.integers(lo_hi[0], lo_hi[1] + 1)).tolist()  # noqa: E731
    return [{"prompt_ids": ids(prompt_len), "chosen_ids": ids(completion_len), "rejected_ids": ids(completion_len)}
            for _ in range(n)]


def model_config_of(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


def real_tokens(rows) -> int:
    return sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)


def _throughput(ends: list[float], tokens: list[int]) -> dict:
    """From the end times of the last warm-up step and of each timed step, and the real tokens of each timed step:
    tokens / total time, and the median step's tokens per second (robust to a busy machine's stalls)."""
    import numpy as np

    secs = np.diff(ends)
    return {"tokens": int(sum(tokens)), "seconds": float(secs.sum()), "tokens_per_second": sum(tokens) / secs.sum(),
            "median_tokens_per_second": float(np.median(np.asarray(tokens) / secs)),
            "step_seconds": [round(float(x), 4) for x in secs]}


# ------------------------------------------------------------------------------------------------ align-jax


def useful_flops(hf: dict, rows, live_reference: bool) -> float:
    """Analytic model FLOPs on the real tokens of `rows` (no padding): per chosen and rejected sequence of n =
    prompt + completion tokens, the policy's forward + backward and, with a live reference, its forward
    (`aot_topology.step_flops` for one sequence of n tokens: 6 x matmul weights x n, attention over n x n, the LM
    head on n - 1 positions)."""
    from aot_topology import step_flops

    from align_jax.models import from_hf_config

    mcfg = from_hf_config(hf)
    total = 0.0
    for r in rows:
        for side in ("chosen", "rejected"):
            f = step_flops(mcfg, "dpo", 1, len(r["prompt_ids"]) + len(r[f"{side}_ids"]))  # 2 sequences of n
            total += (f["policy"] + (f["reference"] if live_reference else 0.0)) / 2
    return total


def run_jax(model_dir: str, rows: list[dict], batch_size: int, steps: int, warmup: int, bucket: int,
            packing: bool = False, precompute: bool = False) -> dict:
    import importlib.util

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from align_jax.data.pipeline import collate_pairwise
    from align_jax.models import load_pretrained
    from align_jax.parallel import make_mesh
    from align_jax.algorithms import get_algorithm
    from align_jax.algorithms.dpo import reference_logps
    from align_jax.parallel import batch_specs, host_batch, to_device
    from align_jax.train.optim import make_optimizer
    from align_jax.train.step import jit_train_step

    spec = importlib.util.spec_from_file_location("dpo_config", ROOT / "configs" / "dpo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    cfg.batch_size = batch_size
    cfg.loss.name, cfg.loss.kwargs = "dpo:sigmoid", {"beta": BETA}
    cfg.optimizer.learning_rate, cfg.optimizer.schedule, cfg.optimizer.max_grad_norm = LR, "linear", 1.0

    batches_rows = [rows[i * batch_size:(i + 1) * batch_size] for i in range(len(rows) // batch_size)]
    max_len = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows)
    buckets = tuple(range(bucket, max_len + bucket, bucket))

    def examples(rs):
        out = []
        for i, r in enumerate(rs):
            ex = {"label_prob": np.float32(1.0), "record_index": np.int32(i)}
            for side in ("chosen", "rejected"):
                ex[f"{side}_input_ids"] = np.asarray(r["prompt_ids"] + r[f"{side}_ids"], np.int32)
                ex[f"{side}_completion_mask"] = np.asarray([0] * len(r["prompt_ids"]) + [1] * len(r[f"{side}_ids"]),
                                                           np.int32)
            out.append(ex)
        return out

    # packed: every batch's 2B sequences first-fit into rows of the longest sequence's bucket (align_jax.data.packing)
    packed = {"length": buckets[-1], "micro_batches": 1, "row_multiple": 1} if packing else None

    def collate(rs):
        return host_batch(collate_pairwise(examples(rs), batch_size=batch_size, buckets=buckets, pad_id=PAD_ID,
                                           packed=packed))

    def shape(host):  # what a compiled step depends on: the padded length, or the number of packed rows
        return host["packed_input_ids"].shape[0] if packing else host["chosen_input_ids"].shape[1]

    def cells(host):  # token places the forward computes (real + padding)
        return host["packed_input_ids"].size if packing else 2 * host["chosen_input_ids"].size

    timed = batches_rows[warmup:warmup + steps]
    timed_shapes = sorted({shape(collate(b)) for b in timed})
    warm = batches_rows[:warmup]
    seen = {shape(collate(b)) for b in warm}
    for L in timed_shapes:  # one extra warm-up step per compiled shape not met yet
        if L not in seen:
            warm.append(next(b for b in timed if shape(collate(b)) == L))
            seen.add(L)

    algorithm = get_algorithm("dpo")
    mesh = make_mesh(1, -1, 1)
    model = load_pretrained(model_dir, mesh=mesh)
    ref_model = load_pretrained(model_dir, mesh=mesh)
    tx, schedule = make_optimizer(cfg.optimizer, len(warm) + len(timed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ref_graphdef, ref_params, ref_rest = nnx.split(ref_model, nnx.Param, ...)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": jax.jit(tx.init)(params),
             "rng": jax.random.key_data(jax.random.key(0))}
    state = jax.device_put(state, jax.tree.map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        else NamedSharding(mesh, P()), state))
    # precomputed reference (configs/dpo.py's default): a forward-only pass over the batches gives each pair's
    # reference log-probs (`dpo.reference_logps`, what `precompute_reference` stores); the step then runs no
    # reference forward. Timed separately (`reference_seconds`) and counted in the side's throughput.
    ref_pass = jax.jit(lambda p, b: reference_logps(nnx.merge(ref_graphdef, p, ref_rest), b, cfg.chunk_size))
    ref_table = {}

    def with_reference(i, host):
        if precompute:
            host = dict(host, ref_chosen_logps=ref_table[i][0], ref_rejected_logps=ref_table[i][1])
        return host

    def reference_pass(batches):
        """As `precompute_reference` runs it in `train()`: the batches' pairs in order, in padded (not packed) batches
        of configs/dpo.py's eval_batch_size pairs (here at most the pairs there are: on a real dataset only the last
        partial batch is padded with empty rows). Fills ref_table {batch index: (chosen [B], rejected [B])};
        returns its seconds."""
        pairs = [r for rs in batches for r in rs]
        B = min(cfg.eval_batch_size, len(pairs))
        t = time.perf_counter()
        c, r = [], []
        for k in range(0, len(pairs), B):
            part = pairs[k:k + B]
            host = host_batch(collate_pairwise(examples(part), batch_size=B, buckets=buckets, pad_id=PAD_ID))
            ck, rk = jax.device_get(ref_pass(ref_params, to_device(host, mesh)))
            c.append(np.asarray(ck)[:len(part)])
            r.append(np.asarray(rk)[:len(part)])
        seconds = time.perf_counter() - t
        c, r, k = np.concatenate(c), np.concatenate(r), 0
        for rs in batches:
            ref_table[index[id(rs)]] = (c[k:k + len(rs)], r[k:k + len(rs)])
            k += len(rs)
        return seconds

    index = {id(rs): i for i, rs in enumerate(batches_rows)}
    reference_seconds = 0.0
    if precompute:
        reference_pass(warm)
        reference_pass(timed)  # compiles the pass's shapes (untimed, as the steps' warm-up); the same work again:
        reference_seconds = reference_pass(timed)
    step_fn = jit_train_step(state_shardings=jax.tree.map(lambda x: x.sharding, state),
                             batch_shardings=batch_specs(with_reference(0, collate(batches_rows[0])), mesh),
                             ref_shardings=None if precompute else jax.tree.map(lambda x: x.sharding, ref_params),
                             metric_sharding=NamedSharding(mesh, P()), tx=tx, schedule=schedule, accum=1,
                             graphdef=graphdef, rest=rest, ref_graphdef=None if precompute else ref_graphdef,
                             ref_rest=None if precompute else ref_rest, algorithm=algorithm, cfg=cfg)
    step_ref = None if precompute else ref_params

    def host_of(rs):
        return with_reference(index[id(rs)], collate(rs))

    def one_step(state, rs):
        state, metrics = step_fn(state, to_device(host_of(rs), mesh), step_ref)
        jax.block_until_ready(metrics)
        return state, metrics

    # XLA's own count of the floating-point operations of one compiled step, per padded length (for the roofline)
    flops_by_len = {}
    for rs in timed:
        host = host_of(rs)
        L = shape(host)
        if L not in flops_by_len:
            cost = step_fn.lower(state, to_device(host, mesh), step_ref).compile().cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            flops_by_len[L] = float(cost.get("flops", float("nan")))

    t0 = time.perf_counter()
    for rs in warm:
        state, metrics = one_step(state, rs)
    ends = [time.perf_counter()]
    for rs in timed:
        state, metrics = one_step(state, rs)
        ends.append(time.perf_counter())
    padded = sum(cells(collate(b)) for b in timed)
    step_flops = sum(flops_by_len[shape(collate(b))] for b in timed)
    tokens = [real_tokens(b) for b in timed]
    seconds = ends[-1] - ends[0] + reference_seconds  # the whole work: steps (+ the reference pass)
    useful = useful_flops(model_config_of(model_dir), [r for b in timed for r in b], live_reference=True)
    name = "align-jax default" if precompute else "align-jax packed" if packing else "align-jax"
    return {"side": name, **_throughput(ends, tokens), "padded_tokens": padded,
            "reference_seconds": reference_seconds, "steps_tokens_per_second": sum(tokens) / (ends[-1] - ends[0]),
            "work_tokens_per_second": sum(tokens) / seconds,
            "flops": step_flops, "flops_per_second": step_flops / (ends[-1] - ends[0]),
            "useful_flops": useful, "useful_flops_per_second": useful / seconds, "matmul_peak": matmul_peak(),
            "warmup_seconds": ends[0] - t0, "warmup_steps": len(warm),
            "padded_lengths": timed_shapes, "loss_last": float(metrics["loss"]),
            "devices": f"{jax.device_count()} x {jax.devices()[0].platform}", "jax": jax.__version__}


# ------------------------------------------------------------------------------------------------ TRL


def run_trl(model_dir: str, rows: list[dict], batch_size: int, steps: int, warmup: int) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.t = []

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.t.append(time.perf_counter())

    times = StepTimes()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n = warmup + steps
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=batch_size, max_steps=n, learning_rate=LR,
                         lr_scheduler_type="linear", max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"],
                         max_length=None, precompute_ref_log_probs=False, train_sampling_strategy="sequential",
                         dataloader_drop_last=True, save_strategy="no", report_to="none", use_cpu=True,
                         disable_tqdm=True, logging_steps=n, bf16=False, fp16=False, seed=0)
        # The trainer tokenizes its dataset at init: give it a one-row text dataset, then the pre-tokenized rows.
        dummy = Dataset.from_list([{"prompt": "What", "chosen": " is", "rejected": " it"}])
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=dummy, processing_class=tok,
                             callbacks=[times])
        trainer.train_dataset = Dataset.from_list(rows[:n * batch_size])
        trainer.train()
    assert len(times.t) == n, len(times.t)
    ends = [times.t0] + times.t
    timed = [rows[i * batch_size:(i + 1) * batch_size] for i in range(warmup, n)]
    return {"side": "TRL", **_throughput(ends[warmup:], [real_tokens(b) for b in timed]),
            "warmup_seconds": ends[warmup] - ends[0], "warmup_steps": warmup,
            "loss_last": trainer.state.log_history[-2].get("loss") if len(trainer.state.log_history) > 1 else None,
            "torch_threads": torch.get_num_threads(), "trl": trl.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__}


# ------------------------------------------------------------------------------------------------ driver


def report(size: str, res: dict) -> list[str]:
    """Prints the comparisons and issue 16's item-3 targets for one size; returns the summary's ratio strings."""
    def tps(side):  # real tokens per second of the side's whole work (the reference pass included)
        return res[side].get("work_tokens_per_second", res[side]["tokens_per_second"])

    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    out = []
    if "jax" in res and "jax-packed" in res:
        print(f"    packing: packed / padded align-jax (both a live reference) = "
              f"{tps('jax-packed') / tps('jax'):.2f}x real tokens/s")
    if "trl" in res:
        trl = tps("trl")
        if "jax-default" in res:
            r = tps("jax-default") / trl
            print(f"    defaults: align-jax (packed, precomputed reference, its pass counted) / TRL (padded, live "
                  f"reference) = {r:.2f}x real tokens/s; target >= {TARGET_RATIO}x: {met(r >= TARGET_RATIO)}")
            out.append(f"{size} defaults {r:.2f}x")
        for side, what in (("jax-packed", "packed"), ("jax", "padded")):
            if side in res:
                r = tps(side) / trl
                print(f"    equal settings (both a live reference): align-jax {what} / TRL = {r:.2f}x real tokens/s")
                out.append(f"{size} {what} live {r:.2f}x")
    for side in ("jax-default", "jax-packed", "jax"):
        if side in res:
            j = res[side]
            peak = j["matmul_peak"]
            u = j["useful_flops_per_second"] / peak
            print(f"    {j['side']}: useful FLOPs (analytic, real tokens: policy forward+backward and reference forward)"
                  f" {j['useful_flops_per_second'] / 1e9:.1f} GFLOP/s = {u:.0%} of this machine's fp32 matmul peak "
                  f"({peak / 1e9:.1f} GFLOP/s, same process); target >= {TARGET_PEAK:.0%}: {met(u >= TARGET_PEAK)}. "
                  f"Executed FLOPs (XLA cost analysis of the steps, padding included) "
                  f"{j['flops_per_second'] / 1e9:.1f} GFLOP/s = {j['flops_per_second'] / peak:.0%}")
    return out


def _child(args):
    with open(os.path.join(args.workdir, "rows.json")) as f:
        rows = json.load(f)
    model_dir = os.path.join(args.workdir, "model")
    if args.child.startswith("jax"):
        res = run_jax(model_dir, rows, args.batch_size, args.steps, args.warmup, args.bucket,
                      packing=args.child in ("jax-packed", "jax-default"), precompute=args.child == "jax-default")
    else:
        res = run_trl(model_dir, rows, args.batch_size, args.steps, args.warmup)
    res["loadavg_after"] = os.getloadavg()
    print("RESULT " + json.dumps(res))


def _spawn(side, workdir, args) -> dict:
    return run_child([sys.executable, __file__, "--child", side, "--workdir", workdir, "--batch-size",
                      str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup), "--bucket",
                      str(args.bucket)], side)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="toy,100m")
    ap.add_argument("--sides", default="jax-default,jax-packed,jax,trl", type=comma_choices(*SIDES),
                    help="jax-default (packed rows, precomputed reference: configs/dpo.py's defaults), jax-packed "
                         "(packed, live reference), jax (padded to buckets, live reference), trl (DPOTrainer at its "
                         "defaults: padded, live reference)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default: toy 5, 100m 3)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps first; align-jax compiles here (default: toy 2, 100m 1)")
    ap.add_argument("--batch-size", type=int, default=None, help="preference pairs per step (default: toy 8, 100m 4)")
    ap.add_argument("--prompt-len", default="16,48", help="100m: min,max prompt tokens")
    ap.add_argument("--completion-len", default="8,32", help="100m: min,max tokens per completion")
    ap.add_argument("--bucket", type=int, default=16, help="align-jax pads each batch to a multiple of this")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)

    print(host_line())
    summary = []
    for size in args.sizes.split(","):
        size_args = argparse.Namespace(**{**vars(args), **{k: v if getattr(args, k) is None else getattr(args, k)
                                                           for k, v in SIZE_DEFAULTS[size].items()}})
        with tempfile.TemporaryDirectory() as wd:
            model_dir = os.path.join(wd, "model")
            n_params = build_checkpoint(size, model_dir)
            rows = make_rows(size, (size_args.warmup + size_args.steps) * size_args.batch_size, wd,
                             tuple(map(int, size_args.prompt_len.split(","))),
                             tuple(map(int, size_args.completion_len.split(","))))
            with open(os.path.join(wd, "rows.json"), "w") as f:
                json.dump(rows, f)
            lens = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
            print(f"\n== {size}: {n_params / 1e6:.2f}M params, batch {size_args.batch_size} pairs, "
                  f"sequence lengths {min(lens)}-{max(lens)}, {size_args.warmup} warm-up + {size_args.steps} "
                  "timed steps")
            res = {}
            for side in size_args.sides:
                r = _spawn(side, wd, size_args)
                res[side] = r
                extra = (f", {'padded to' if side == 'jax' else 'rows'} {r['padded_lengths']} "
                         f"({r['tokens'] / r['padded_tokens']:.0%} real)"
                         if side.startswith("jax") else f", torch threads {r['torch_threads']}")
                if side == "jax-default":
                    extra += (f"; + reference pass {r['reference_seconds']:.2f} s -> "
                              f"{r['work_tokens_per_second']:.1f} real tokens/s for the whole work")
                print(f"{r['side']:>17}: {r['tokens_per_second']:10.1f} real tokens/s in steps (median step "
                      f"{r['median_tokens_per_second']:.1f})  ({r['tokens']} tokens in "
                      f"{r['seconds']:.2f} s; warm-up {r['warmup_steps']} steps {r['warmup_seconds']:.1f} s{extra}; "
                      f"load avg {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f})")
            summary += report(size, res)
    if summary:
        print("\nsummary (real tokens/s over TRL's): " + "; ".join(summary))


if __name__ == "__main__":
    main()
