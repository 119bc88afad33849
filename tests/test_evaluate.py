"""`python -m align_jax.evaluate`: every suite end to end on tiny Hugging Face directories made here (the toy
architecture, random weights, the toy tokenizer), with invariants that hold exactly: a policy compared with itself
has zero KL, a 0.5 win rate and zero implicit rewards; the evaluation's log-probabilities equal the trainer's."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from align_jax.data.toy import load_tokenizer, toy_model_config
from align_jax.models import from_hf_config, save_pretrained
from align_jax.models.checkpoint import save_reward_model
from align_jax.models.heads import ScalarHeadModel
from align_jax.models.llama import Transformer
from util import ROOT


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    tok = load_tokenizer()
    cfg = from_hf_config(toy_model_config())
    out = {}
    for name, seed in (("policy", 0), ("reference", 1)):
        out[name] = str(root / name)
        save_pretrained(Transformer(cfg, rngs=nnx.Rngs(seed)), out[name])
        tok.save_pretrained(out[name])
    out["rm"] = str(root / "rm")
    save_reward_model(ScalarHeadModel(cfg, rngs=nnx.Rngs(2)), out["rm"], pad_token_id=tok.pad_token_id)
    tok.save_pretrained(out["rm"])
    return out


def _run(*args, check=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "align_jax.evaluate", "--config=configs/evaluate.py:tiny", *args],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_every_suite_through_the_cli_policy_against_itself(dirs, tmp_path):
    out = tmp_path / "out"
    _run(f"--model={dirs['policy']}", f"--reference={dirs['policy']}", f"--reward_model={dirs['rm']}",
         "--suite=ifeval,safety,rewardbench,compare,toy", f"--out={out}")
    res = json.loads((out / "results.json").read_text())
    s = res["suites"]
    assert s["ifeval"]["num_prompts"] == 8
    for k in ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc"):
        assert 0.0 <= s["ifeval"][k] <= 1.0
    assert s["ifeval"]["prompt_level_loose_acc"] >= s["ifeval"]["prompt_level_strict_acc"]
    assert s["safety"]["num_unsafe"] + s["safety"]["num_safe"] == 8
    assert s["rewardbench"]["scorer"] == "reward_model"
    # The same model on both sides: every sampled token has log pi = log pi_ref (the sampler's decode path and the
    # full forward agree to float32 rounding), and the greedy answers tie.
    c = s["compare"]
    assert c["num_samples"] == 8 * 2
    assert abs(c["kl/k1_mean"]) < 1e-3 and abs(c["kl/k3_mean"]) < 1e-6
    assert c["win_rate"]["win_rate"] == 0.5 and c["win_rate"]["ties"] == 8
    assert c["reward_policy"] == c["reward_reference"]
    assert c["length_controlled"]["length_controlled_win_rate"] == 0.5
    assert c["mean_length_tokens"] > 0
    assert set(s["toy"]) >= {"correctness", "instruction_following", "safety", "over_refusal", "gold_reward"}
    assert s["toy"]["n"] == 16
    md = (out / "results.md").read_text()
    assert "### ifeval" in md and "### compare" in md


def test_implicit_reward_is_zero_against_itself_and_signed_by_the_reference(dirs, tmp_path):
    from align_jax.evaluation import suites
    from align_jax.evaluation.suites import default_config as get_config

    groups = tmp_path / "groups.jsonl"
    groups.write_text("\n".join(json.dumps(g) for g in [
        {"prompt": "What is 2 + 3?", "responses": ["5", "6", "I cannot say."], "ranks": [0, 1, 2]},
        {"prompt": [{"role": "user", "content": "Say hi."}],
         "responses": [[{"role": "assistant", "content": "hi"}], [{"role": "assistant", "content": "no"}]],
         "ranks": [1, 0]}]) + "\n")
    c = get_config("tiny")
    c.model, c.reference, c.suites, c.rewardbench.groups = dirs["policy"], dirs["policy"], "rewardbench", str(groups)
    r = suites.evaluate(c, str(tmp_path / "a"))["suites"]["rewardbench"]
    assert r["scorer"] == "implicit_reward"
    assert r["num_pairs"] == 8 and r["accuracy"] == 0.0  # every implicit reward is 0: ties count as wrong
    g = r["groups"]  # all responses tie: top-1 is the gold-best's share of the tie, 1/3 and 1/2
    assert g["num_groups"] == 2 and g["top1_accuracy"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert g["pairwise_accuracy"] == 0.0
    c.reference = dirs["reference"]  # a different reference: implicit rewards beta * (log pi - log pi_ref)
    r2 = suites.evaluate(c, str(tmp_path / "b"))["suites"]["rewardbench"]
    assert r2["scorer"] == "implicit_reward" and r2["num_ties"] < r2["num_pairs"] / 2  # (the toy vocabulary maps
    # some different English answers to the same tokens: those pairs still tie)


def test_evaluation_logps_equal_the_trainers(dirs):
    """The evaluation's log pi(y|x) (left-padded prompt + right-padded completion, batched by length) equals the
    log-probability of the chosen row that the DPO trainer's tokenizer (`tokenize_pairwise`) makes of the same
    (prompt, chosen, rejected) record, conversational and plain text."""
    from align_jax.data.tokenize import TokenizeConfig, tokenize_pairwise
    from align_jax.evaluation.suites import completion_sequence_logps
    from align_jax.models import load_pretrained
    from align_jax.models.logps import completion_token_logps

    tok = load_tokenizer()
    model = load_pretrained(dirs["policy"])
    trainer_logps = nnx.jit(lambda m, ids, cm: completion_token_logps(m, ids, jnp.ones_like(ids), cm, chunk_size=8192))
    cases = [([{"role": "user", "content": "What is 2 + 3?"}], "5", "6"),
             ([{"role": "user", "content": "Say hi."}], "hi there", "no"),
             ("What is 2 + 3?", " 5", " 7")]
    for use_template in (True, False):
        rows = [c for c in cases if use_template or isinstance(c[0], str)]
        got = completion_sequence_logps(model, tok, [r[0] for r in rows], [r[1] for r in rows], batch_size=4,
                                        use_template=use_template)
        for (prompt, chosen, rejected), g in zip(rows, got):
            if use_template and isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            conv = not isinstance(prompt, str)
            enc = (lambda v: json.dumps([{"role": "assistant", "content": v}])) if conv else (lambda v: v)
            ex = {"conversational": conv, "prompt": json.dumps(prompt) if conv else prompt, "chosen": enc(chosen),
                  "rejected": enc(rejected), "chosen_prob": 1.0}
            t = tokenize_pairwise(ex, tok, TokenizeConfig(max_length=256))
            ids = jnp.asarray(t["chosen_input_ids"][None])
            lp, mask = trainer_logps(model, ids, jnp.asarray(t["chosen_completion_mask"][None]))
            np.testing.assert_allclose(g, float((lp * mask).sum()), rtol=1e-5)


@pytest.mark.parametrize("args,msg", [
    (["--model=/nonexistent", "--suite=ifeval"], "config.model='/nonexistent': not a Hugging Face model directory"),
    (["--model=X", "--suite=ifeval,nope"], "config.suites='ifeval,nope': unknown ['nope']"),
    (["--suite=ifeval"], "suites ['ifeval'] evaluate a policy: set --model"),
    (["--model=X", "--config.ifeval.max_prompt=1"], "--config.ifeval.max_prompt: the config has no key"),
])
def test_bad_input_is_one_error_line(args, msg, tmp_path):
    p = _run(*args, f"--out={tmp_path}", check=False)
    assert p.returncode == 2
    assert msg in p.stderr and "Traceback" not in p.stderr


def test_training_runs_the_suites_and_its_workdir_evaluates(tmp_path):
    """A tiny DPO run with `eval_suites` logs the suites' metrics at its final eval; then `evaluate` reads the
    run's workdir (its export) and gives the same IFEval answers' score as the training loop logged."""
    from align_jax.logfile import read_metrics
    from align_jax.train import train
    from util import load_config

    wd = str(tmp_path / "dpo")
    c = load_config("dpo", "tiny", **{"eval_suites": "ifeval,compare,rewardbench", "eval_suites_max_prompts": 4,
                                      "eval_suites_max_new_tokens": 8, "export": True, "data.eval": ""})
    train(c, wd)
    final = [r for r, _ in read_metrics(os.path.join(wd, "metrics.jsonl")) if "eval/ifeval/num_prompts" in r]
    assert final and final[-1]["step"] == c.total_steps
    m = final[-1]
    assert 0.0 <= m["eval/ifeval/prompt_level_strict_acc"] <= 1.0
    assert m["eval/compare/num_samples"] == 4 * 4  # default compare.num_samples = 4
    assert m["eval/rewardbench/num_pairs"] == 4
    assert "eval/compare/kl/k3_mean" in m and m["eval/compare/kl/k3_mean"] >= 0.0
    from align_jax.evaluation import suites
    from align_jax.evaluation.suites import default_config as get_config

    e = get_config()
    e.model, e.suites, e.ifeval.max_prompts, e.batch_size = wd, "ifeval", 4, c.eval_batch_size
    e.generation.max_new_tokens = 8
    r = suites.evaluate(e, str(tmp_path / "eval"))["suites"]["ifeval"]
    assert r["prompt_level_strict_acc"] == m["eval/ifeval/prompt_level_strict_acc"]
    assert r["inst_level_loose_acc"] == m["eval/ifeval/inst_level_loose_acc"]


def test_sampled_kl_estimates_match_the_exact_kl_of_a_tiny_model():
    """KL(pi || pi_ref) over every completion of 3 tokens from an 8-token vocabulary (512 sequences, enumerated
    exactly) against the k1 and k3 estimates from 1024 samples: within 4 standard errors."""
    import itertools

    from align_jax.evaluation import compare
    from align_jax.evaluation.suites import sampled_logps
    from align_jax.models.logps import completion_logps

    cfg = from_hf_config(dict(model_type="llama", vocab_size=8, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    pi, ref = Transformer(cfg, rngs=nnx.Rngs(0)), Transformer(cfg, rngs=nnx.Rngs(1))
    for m, scale in ((pi, 40.0), (ref, 40.0)):  # sharper distributions than std-0.02 weights give: a KL to measure
        m.lm_head.set_value(m.lm_head[...] * scale)
    prompt = [3, 5]
    ys = np.asarray(list(itertools.product(range(8), repeat=3)), np.int32)
    rows = jnp.asarray(np.concatenate([np.tile(prompt, (len(ys), 1)), ys], axis=1))
    ones = jnp.ones_like(rows)
    lp = nnx.jit(lambda m: completion_logps(m, rows, ones, 3).sum(-1))
    lp_pi, lp_ref = np.asarray(lp(pi), np.float64), np.asarray(lp(ref), np.float64)
    p = np.exp(lp_pi)
    assert abs(p.sum() - 1) < 1e-4
    exact = float((p * (lp_pi - lp_ref)).sum())
    assert exact > 0.05
    a, b, mask = sampled_logps(pi, ref, [prompt], num_samples=1024, max_new_tokens=3, batch_size=1, seed=0)
    assert mask.shape == (1024, 3) and mask.all()
    k = compare.kl_estimates(a, b, mask)
    k1 = (a - b).sum(-1)
    r = (b - a)
    k3 = (np.expm1(r) - r).sum(-1)
    for est, per_seq in ((k["k1_mean"], k1), (k["k3_mean"], k3)):
        se = per_seq.std(ddof=1) / np.sqrt(len(per_seq))
        assert abs(est - exact) < 4 * se, (est, exact, se)
    np.testing.assert_allclose(k["k1_mean"], k1.mean(), rtol=1e-12)
