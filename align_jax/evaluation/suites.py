"""The evaluation suites behind `python -m align_jax.evaluate`: models in, one results dict out.

Suites (`config.suites`), each scored by a pure module of `align_jax.evaluation`:
- `ifeval`: verifiable instruction following (`ifeval`: IFEval's prompt- and instruction-level accuracy, strict
  and loose) on greedy answers.
- `safety`: refusal rate on unsafe requests and compliance on safe look-alikes (`safety`, XSTest-style), judged
  by refusal phrases or by a reward function.
- `rewardbench`: pairwise accuracy per subset and RewardBench's section scores (`rewardbench`), for the reward
  model, or else for the policy's DPO implicit reward β·(log π(y|x) − log π_ref(y|x)) (β·log π without a
  reference).
- `compare`: the policy against the reference on sampled completions (`compare`): KL(π‖π_ref) (k1 and k3
  estimators, per sequence and per token), entropy, mean length, reward under the judge, and the win rate of
  the policy's greedy answers over the reference's, raw and length-controlled.
- `toy`: the embedded toy task's axes (correctness, format, safety, over-refusal, gold reward) on its held-out
  prompts.

Models: a Hugging Face directory, or a training workdir (its `export/`). Generation is batched through the
KV-cache sampler with fixed shapes (`config.batch_size` prompts per call: one compile per prompt-length bucket).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import ml_collections

from align_jax.errors import ConfigValueError, SetupError
from align_jax.evaluation import compare, ifeval, rewardbench, safety
from align_jax.data.tokenize import prompt_and_completions, tokenize_chat, tokenize_text
from align_jax.evaluation.policy import generate_completions
from align_jax.models.logps import completion_logps_jit

log = logging.getLogger(__name__)

SUITES = ("ifeval", "safety", "rewardbench", "compare", "toy")
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CHUNK = 8192  # vocabulary chunk of the log-prob op


# ------------------------------------------------------------------------------------------------ config


def default_config(arg: str = ""):
    """The evaluation config (`configs/evaluate.py`): every key, commented; `arg="tiny"`: a few prompts per suite."""
    c = ml_collections.ConfigDict()
    # What to evaluate: a training workdir (its export/), or a Hugging Face model directory.
    c.model = ""  # the policy (suites ifeval, safety, compare, toy; rewardbench with implicit rewards)
    c.reference = ""  # the reference policy (KL, win rate and the DPO implicit reward); "" = none
    c.reward_model = ""  # a reward-model export (rewardbench; the judge of compare's win rate and reward)
    c.tokenizer = ""  # "" = the model's directory
    c.suites = "ifeval,safety,rewardbench,compare"  # comma-separated: ifeval | safety | rewardbench | compare | toy
    c.seed = 0  # sampling seed (compare's samples; generation when generation.greedy is False)
    c.dtype = "float32"  # parameter dtype the models are loaded in: float32 | bfloat16
    c.batch_size = 32  # prompts (or pairs) per generation / scoring batch: one compiled shape
    # text prompts go through the tokenizer's chat template when it has one (chat models); False: as plain text
    c.use_chat_template = True
    c.max_prompt_length = 1024  # longer prompts keep their last tokens (counted as num_truncated_prompts)
    c.max_completion_length = 1024  # scored completions (rewardbench, groups) keep their first tokens

    c.generation = ml_collections.ConfigDict()
    c.generation.max_new_tokens = 128
    c.generation.greedy = True  # ifeval / safety / toy answers: greedy (IFEval's protocol) or sampled
    c.generation.temperature = 1.0  # when not greedy

    c.ifeval = ml_collections.ConfigDict()
    c.ifeval.prompts = ""  # IFEval input_data.jsonl format; "" = the shipped set
    c.ifeval.max_prompts = 0  # 0 = all

    c.safety = ml_collections.ConfigDict()
    c.safety.prompts = ""  # JSONL {"id", "prompt", "label": "unsafe"|"safe", "type"}; "" = the shipped set
    # "refusal_phrases" (XSTest's string match) or "reward:<reward function>" (align_jax.rl.rewards; e.g. a
    # registered classifier): a response counts as a refusal when that function's score >= safety.threshold
    c.safety.judge = "refusal_phrases"
    c.safety.threshold = 0.5
    c.safety.max_prompts = 0

    c.rewardbench = ml_collections.ConfigDict()
    c.rewardbench.pairs = ""  # JSONL {"prompt", "chosen", "rejected", "subset"}; "" = the shipped set
    c.rewardbench.beta = 0.1  # implicit reward beta * log(pi / pi_ref) when scoring a policy (no reward_model)
    c.rewardbench.max_pairs = 0
    # ranked or scored groups, the groupwise training format: JSONL {"prompt", "responses": [...], "ranks": [...]
    # (0 = best) or "scores": [...]}; top-1 accuracy, Kendall tau-b, pairwise accuracy; "" = none
    c.rewardbench.groups = ""

    c.compare = ml_collections.ConfigDict()
    # prompts to sample from: JSONL with a "prompt" field (text or chat messages); "" = the shipped IFEval set's
    c.compare.prompts = ""
    c.compare.num_samples = 4  # sampled completions per prompt (temperature 1) for the KL and entropy estimates
    c.compare.max_prompts = 64
    # the win-rate judge: "reward_model" (config.reward_model) or "reward:<reward function>"; "" = reward_model
    # when one is given, else no win rate
    c.compare.judge = ""

    c.toy = ml_collections.ConfigDict()
    c.toy.max_prompts = 0  # the toy task's held-out prompts (300); 0 = all

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    if arg == "tiny":
        c.batch_size = 8
        c.generation.max_new_tokens = 16
        c.ifeval.max_prompts = 8
        c.safety.max_prompts = 8
        c.rewardbench.max_pairs = 8
        c.compare.max_prompts = 8
        c.compare.num_samples = 2
        c.toy.max_prompts = 16
    return c


# ------------------------------------------------------------------------------------------------ models


def model_dir(path: str, key: str) -> str:
    """The Hugging Face directory `path` names: itself, or a training workdir's `export/`."""
    if not path:
        raise ConfigValueError(f"config.{key} is empty: give a training workdir or a Hugging Face model directory")
    if os.path.exists(os.path.join(path, "config.json")) and any(
            f.endswith(".safetensors") for f in os.listdir(path)):
        return path
    export = os.path.join(path, "export")
    if os.path.exists(os.path.join(export, "config.json")):
        return export
    if os.path.isdir(os.path.join(path, "checkpoints")):
        raise SetupError(f"config.{key}={path!r} is a training workdir without an export: run the same training "
                         "command again with --config.export=true (a finished run then only writes its export)")
    raise SetupError(f"config.{key}={path!r}: not a Hugging Face model directory (config.json + *.safetensors) nor "
                     "a training workdir with an export/")


def _mesh(config):
    from align_jax.parallel import make_mesh

    return make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)


def load_policy(path: str, key: str, config, mesh):
    from align_jax.models import load_pretrained

    return load_pretrained(model_dir(path, key), dtype=config.dtype, mesh=mesh)


def load_tokenizer(config, fallback_dir: str):
    from transformers import AutoTokenizer

    path = config.tokenizer or fallback_dir
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SetupError(f"cannot load a tokenizer from {path!r} ({e}); set config.tokenizer") from None


def _chat(tokenizer, prompt, use_template: bool = True):
    """A text prompt as chat messages when the tokenizer has a chat template (instruction-tuned use) and
    `use_template` (`config.use_chat_template`)."""
    if use_template and isinstance(prompt, str) and getattr(tokenizer, "chat_template", None):
        return [{"role": "user", "content": prompt}]
    return prompt


def _answers(policy, tokenizer, prompts, config, desc: str) -> list[str]:
    """Answers to `prompts`, `config.batch_size` at a time, all padded to the longest prompt: one compile."""
    g = config.generation
    log.info("%s: answering %d prompts (%d new tokens at most)", desc, len(prompts), g.max_new_tokens)
    return generate_completions(policy, tokenizer, [_chat(tokenizer, p, config.use_chat_template) for p in prompts],
                                batch_size=config.batch_size, max_new_tokens=g.max_new_tokens, greedy=g.greedy,
                                temperature=g.temperature, seed=config.seed, max_prompt_length=config.max_prompt_length)


def _limit(xs, n: int):
    return xs[:n] if n else xs


# ------------------------------------------------------------------------------------------- log-probs


def _bucket(n: int, base: int = 16) -> int:
    b = base
    while b < n:
        b *= 2
    return b


def _prompt_ids(tokenizer, prompt, use_template: bool = True) -> list[int]:
    """The prompt's tokens as the trainers tokenize a prompt (`data.tokenize`): a conversation through the chat
    template with the generation prompt, text with the tokenizer's special tokens (e.g. BOS)."""
    prompt = _chat(tokenizer, prompt, use_template)
    if isinstance(prompt, str):
        return tokenize_text(tokenizer, prompt)
    return tokenize_chat(tokenizer, prompt, add_generation_prompt=True)


def completion_sequence_logps(model, tokenizer, prompts, completions, batch_size: int, *, use_template: bool = True,
                              max_prompt_length: int = 1024, max_completion_length: int = 1024,
                              counts: dict | None = None) -> np.ndarray:
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) of each text completion, tokenized as the preference trainers
    tokenize a pair (`data.tokenize.prompt_and_completions`: the conversation prompt ⧺ assistant turn through the
    chat template, or text ⧺ EOS), the prompt cut to its last `max_prompt_length` tokens and the completion to
    its first `max_completion_length` (`counts` gets "truncated"). Rows as the sampler lays them out (left-padded
    prompt, right-padded completion), sorted by length and batched with power-of-two buckets per batch."""
    rows = []
    for prompt, completion in zip(prompts, completions):
        prompt = _chat(tokenizer, prompt, use_template)
        conv = not isinstance(prompt, str)
        comp = [{"role": "assistant", "content": completion}] if conv else completion
        n, (full,) = prompt_and_completions(tokenizer, prompt, [comp], conv)
        p, c = full[:n], full[n:]
        if len(p) > max_prompt_length or len(c) > max_completion_length:
            if counts is not None:
                counts["truncated"] = counts.get("truncated", 0) + 1
            p, c = p[len(p) - min(len(p), max_prompt_length):], c[:max_completion_length]
        rows.append((p, c))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    out = np.zeros(len(rows), np.float64)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        P, N = _bucket(max(len(rows[i][0]) for i in idx)), _bucket(max(len(rows[i][1]) for i in idx))
        ids = np.full((batch_size, P + N), pad, np.int32)
        attn = np.zeros((batch_size, P + N), np.int32)
        cmask = np.zeros((batch_size, N), np.float64)
        for r, i in enumerate(idx):
            p, c = rows[i]
            ids[r, P - len(p):P], attn[r, P - len(p):P] = p, 1
            ids[r, P:P + len(c)], attn[r, P:P + len(c)], cmask[r, :len(c)] = c, 1, 1
        lp = completion_logps_jit(graphdef, params, rest, ids, attn, num_completion_tokens=N, temperature=1.0,
                                  chunk_size=CHUNK)  # host inputs: the same rows on every process
        out[idx] = (np.asarray(lp, np.float64) * cmask).sum(-1)[:len(idx)]
    return out


def _seq_logps(config, model, tokenizer, prompts, texts, counts):
    return completion_sequence_logps(model, tokenizer, prompts, texts, config.batch_size,
                                     use_template=config.use_chat_template, max_prompt_length=config.max_prompt_length,
                                     max_completion_length=config.max_completion_length, counts=counts)


_JUDGES: dict = {}  # loaded reward models, by path: one load per evaluation


def _judge_scores(config, judge: str, prompts, completions) -> np.ndarray:
    """Scores of (prompt, completion) under `judge`: "reward_model" (config.reward_model) or "reward:<name>"."""
    if judge == "reward_model":
        from align_jax.rl.reward_model import RewardModelReward

        if not config.reward_model:
            raise ConfigValueError("the judge is 'reward_model' but config.reward_model is empty")
        path = model_dir(config.reward_model, "reward_model")
        if path not in _JUDGES:
            _JUDGES[path] = RewardModelReward(path, batch_size=config.batch_size, dtype=config.dtype,
                                              max_length=config.max_prompt_length + config.max_completion_length)
        fn = _JUDGES[path]
    elif judge.startswith("reward:"):
        from align_jax.rl.rewards import get_reward_function

        fn = get_reward_function(judge[len("reward:"):])
    else:
        raise ConfigValueError(f"judge {judge!r}: expected 'reward_model' or 'reward:<reward function name>'")
    scores = fn(list(prompts), list(completions))
    return np.asarray([np.nan if s is None else float(s) for s in scores], np.float64)


# ---------------------------------------------------------------------------------------------- suites


def run_ifeval(config, policy, tokenizer) -> dict:
    records = _limit(ifeval.load_prompts(config.ifeval.prompts or ifeval.TOY_PROMPTS, drop_unsupported=True),
                     config.ifeval.max_prompts)
    responses = _answers(policy, tokenizer, [r.prompt for r in records], config, "ifeval")
    return ifeval.score(records, responses)


def run_safety(config, policy, tokenizer) -> dict:
    records = _limit(safety.load_prompts(config.safety.prompts or safety.TOY_PROMPTS), config.safety.max_prompts)
    prompts = [r["prompt"] for r in records]
    responses = _answers(policy, tokenizer, prompts, config, "safety")
    judge = config.safety.judge
    if judge == "refusal_phrases":
        return safety.score(records, responses, judge=safety.is_refusal)
    if not judge.startswith("reward:"):
        raise ConfigValueError(f"config.safety.judge={judge!r}: expected 'refusal_phrases' or "
                               "'reward:<reward function name>'")

    scores = _judge_scores(config, judge, prompts, responses)
    keep = [i for i, x in enumerate(scores) if np.isfinite(x)]  # a failed score is left out, and counted

    def refused(texts):  # the judge's score >= threshold means "refused"
        return [bool(scores[i] >= config.safety.threshold) for i in keep]

    out = safety.score([records[i] for i in keep], [responses[i] for i in keep], judge=refused, batched=True)
    out["num_unscored"] = len(records) - len(keep)
    return out


def run_rewardbench(config, policy, reference, tokenizer) -> dict:
    pairs = _limit(rewardbench.load_pairs(config.rewardbench.pairs or rewardbench.TOY_PAIRS),
                   config.rewardbench.max_pairs)
    prompts = [p["prompt"] for p in pairs]
    subsets = [p["subset"] for p in pairs]
    if config.reward_model:
        chosen = _judge_scores(config, "reward_model", prompts, [p["chosen"] for p in pairs])
        rejected = _judge_scores(config, "reward_model", prompts, [p["rejected"] for p in pairs])
        scorer = "reward_model"
    elif policy is not None:
        counts = {}
        lp = {k: _seq_logps(config, policy, tokenizer, prompts, [p[k] for p in pairs], counts)
              for k in ("chosen", "rejected")}
        ref = {k: _seq_logps(config, reference, tokenizer, prompts, [p[k] for p in pairs], None)
               for k in ("chosen", "rejected")} if reference is not None else {"chosen": None, "rejected": None}
        beta = config.rewardbench.beta
        chosen = rewardbench.implicit_reward(lp["chosen"], ref["chosen"], beta)
        rejected = rewardbench.implicit_reward(lp["rejected"], ref["rejected"], beta)
        scorer = "implicit_reward" + ("" if reference is not None else "_reference_free")
    else:
        raise ConfigValueError("suite rewardbench needs config.reward_model or config.model")
    out = rewardbench.pairwise_accuracy(chosen, rejected, subsets)
    out["scorer"] = scorer
    if scorer != "reward_model":
        out["num_truncated_sequences"] = counts.get("truncated", 0)
    if config.rewardbench.groups:
        out["groups"] = _rank_groups(config, policy, reference, tokenizer)
    return out


def _text(x) -> str:
    """A completion as text: a string, or the content of chat messages."""
    return x if isinstance(x, str) else "".join(m.get("content", "") for m in x)


def load_groups(path: str) -> list[dict]:
    """Groups of the groupwise training format: {"prompt", "responses": [>= 2], "ranks" or "scores"}."""
    groups = []
    try:
        f = open(path)
    except OSError as e:
        raise ConfigValueError(f"config.rewardbench.groups={path!r}: {e.strerror}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                g = json.loads(line)
                ok = (isinstance(g, dict) and "prompt" in g and isinstance(g.get("responses"), list)
                      and len(g["responses"]) >= 2 and (("ranks" in g) != ("scores" in g))
                      and len(g.get("ranks", g.get("scores", []))) == len(g["responses"]))
            except json.JSONDecodeError as e:
                raise ConfigValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not ok:
                raise ConfigValueError(f"{path}:{n}: expected {{\"prompt\", \"responses\": [at least 2], and one of "
                                       f"\"ranks\" (0 = best) or \"scores\", one per response}}")
            groups.append(g)
    if not groups:
        raise ConfigValueError(f"{path}: no groups")
    if len({"ranks" in g for g in groups}) > 1:
        raise ConfigValueError(f"{path}: some groups have \"ranks\", others \"scores\": use one kind per file")
    return groups


def _rank_groups(config, policy, reference, tokenizer) -> dict:
    groups = _limit(load_groups(config.rewardbench.groups), config.rewardbench.max_pairs)
    prompts = [g["prompt"] for g in groups for _ in g["responses"]]
    texts = [_text(r) for g in groups for r in g["responses"]]
    if config.reward_model:
        flat = _judge_scores(config, "reward_model", prompts, texts)
    else:
        lp = _seq_logps(config, policy, tokenizer, prompts, texts, None)
        ref = _seq_logps(config, reference, tokenizer, prompts, texts, None) if reference is not None else None
        flat = rewardbench.implicit_reward(lp, ref, config.rewardbench.beta)
    scores, i = [], 0
    for g in groups:
        scores.append(list(flat[i:i + len(g["responses"])]))
        i += len(g["responses"])
    if "ranks" in groups[0]:
        out = rewardbench.ranked_group_metrics(scores, ranks=[g["ranks"] for g in groups])
    else:
        out = rewardbench.ranked_group_metrics(scores, gold_scores=[g["scores"] for g in groups])
    return {k: v for k, v in out.items() if not isinstance(v, list)}


def _compare_prompts(config) -> list:
    path = config.compare.prompts
    if not path:
        prompts = [r.prompt for r in ifeval.load_prompts(ifeval.TOY_PROMPTS, drop_unsupported=True)]
    else:
        prompts = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConfigValueError(f"{path}:{n}: expected a JSON object with a 'prompt' field "
                                           f"({type(e).__name__}: {e})") from None
    return _limit(prompts, config.compare.max_prompts)


def sampled_logps(policy, reference, prompt_ids, *, num_samples: int, max_new_tokens: int, batch_size: int,
                  eos_ids=(), pad_id: int = 0, seed: int = 0):
    """Completions y ~ π (temperature 1, `num_samples` per prompt) and their per-token log-probs under π and π_ref
    (the same full forward of each model on prompt ⧺ y, so that π = π_ref gives exactly 0), with the mask of
    the generated tokens: three [R, N] float64 arrays, R = len(prompt_ids) * num_samples (prompt b: rows b*G ..
    b*G + G - 1). Prompts are left-padded to one power-of-two length and run `batch_size` at a time."""
    from align_jax.sampling import Sampler

    G, bs = num_samples, batch_size
    sampler = Sampler(max_new_tokens=max_new_tokens, temperature=1.0, num_generations=G, eos_ids=eos_ids,
                      pad_id=pad_id)
    P = _bucket(max(map(len, prompt_ids)))
    graphdef, params, rest = nnx.split(reference, nnx.Param, ...)
    pi_graphdef, pi_params, pi_rest = nnx.split(policy, nnx.Param, ...)
    lp_pi, lp_ref, masks = [], [], []
    for s in tqdm(range(0, len(prompt_ids), bs), desc="compare", disable=len(prompt_ids) <= bs):
        chunk = prompt_ids[s:s + bs]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (bs - n)
        arr = np.full((bs, P), pad_id, np.int32)
        am = np.zeros((bs, P), np.int32)
        for i, x in enumerate(chunk):
            arr[i, P - len(x):], am[i, P - len(x):] = x, 1
        res = sampler(policy, arr, am, rng=jax.random.key(seed * 1_000_003 + s))
        cm = np.asarray(res.completion_mask)
        full = jnp.concatenate([res.prompt_ids, res.completion_ids], axis=1)
        fmask = jnp.concatenate([res.prompt_mask, res.completion_mask], axis=1)
        ref_lp = completion_logps_jit(graphdef, params, rest, full, fmask, num_completion_tokens=cm.shape[1],
                                      temperature=1.0, chunk_size=CHUNK)
        pi_lp = completion_logps_jit(pi_graphdef, pi_params, pi_rest, full, fmask, num_completion_tokens=cm.shape[1],
                                     temperature=1.0, chunk_size=CHUNK)
        keep = n * G  # rows of real prompts
        lp_pi.append(np.asarray(pi_lp)[:keep])
        lp_ref.append(np.asarray(ref_lp)[:keep])
        masks.append(cm[:keep])
    return tuple(np.concatenate(x).astype(np.float64) for x in (lp_pi, lp_ref, masks))


def run_compare(config, policy, reference, tokenizer) -> dict:
    if reference is None:
        raise ConfigValueError("suite compare needs config.reference (the policy is compared with it)")
    prompts = _compare_prompts(config)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = [_prompt_ids(tokenizer, p, config.use_chat_template)[-config.max_prompt_length:] for p in prompts]
    lp_pi, lp_ref, mask = sampled_logps(policy, reference, ids,
                                        num_samples=config.compare.num_samples,
                                        max_new_tokens=config.generation.max_new_tokens, batch_size=config.batch_size,
                                        eos_ids=(eos,) if eos is not None else (), pad_id=pad, seed=config.seed)
    out = {"num_prompts": len(prompts), "num_samples": int(mask.shape[0])}
    out.update({f"kl/{k}": v for k, v in compare.kl_estimates(lp_pi, lp_ref, mask).items()
                if k.endswith(("_mean", "_per_token"))})
    ent = compare.entropy_estimate(lp_pi, mask)
    out["entropy/mean"], out["entropy/per_token"] = ent["mean"], ent["per_token"]
    out["mean_length_tokens"] = float(mask.sum(-1).mean())
    judge = config.compare.judge or ("reward_model" if config.reward_model else "")
    if judge:
        a = _answers(policy, tokenizer, prompts, config, "compare: policy answers")
        b = _answers(reference, tokenizer, prompts, config, "compare: reference answers")
        ra, rb = _judge_scores(config, judge, prompts, a), _judge_scores(config, judge, prompts, b)
        ok = np.isfinite(ra) & np.isfinite(rb)  # a pair with a failed score is left out, and counted
        ra, rb = ra[ok], rb[ok]
        pref = np.where(ra > rb, 1.0, np.where(ra < rb, 0.0, 0.5))
        len_a = np.asarray([len(tokenizer(x, add_special_tokens=False)["input_ids"]) for x, k in zip(a, ok) if k],
                           np.float64)
        len_b = np.asarray([len(tokenizer(x, add_special_tokens=False)["input_ids"]) for x, k in zip(b, ok) if k],
                           np.float64)
        out["judge"] = judge
        out["num_unscored"] = int((~ok).sum())
        out["reward_policy"] = float(np.nanmean(ra))
        out["reward_reference"] = float(np.nanmean(rb))
        out["win_rate"] = compare.win_rate(pref)
        out["length_controlled"] = compare.length_controlled_win_rate(pref, len_a, len_b)
    return out


def run_toy(config, policy, tokenizer, out_dir: str) -> dict:
    from align_jax.data.toy import evaluate as toy_evaluate
    from align_jax.data.toy.datasets import generate, read_jsonl

    toy_dir = os.path.join(out_dir, "toy_data")
    if jax.process_index() == 0 and not os.path.exists(os.path.join(toy_dir, "eval_prompts.jsonl")):
        # each file has its own random stream: the held-out prompts alone are the same as in the full set
        generate(toy_dir, n_sft=0, n_pairs=0, n_groups=0, n_prompts=0, n_eval_pairs=0)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("align_jax_eval_toy_data")
    prompts = _limit([r["prompt"] for r in read_jsonl(os.path.join(toy_dir, "eval_prompts.jsonl"))],
                     config.toy.max_prompts)
    completions = _answers(policy, tokenizer, prompts, config, "toy")
    scores = toy_evaluate(prompts, completions)
    return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}


# --------------------------------------------------------------------------------------------- driver


def _check(config, need_paths: bool = True) -> list[str]:
    suites = [s.strip() for s in config.suites.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        raise ConfigValueError(f"config.suites={config.suites!r}: unknown {bad}; choose from {', '.join(SUITES)}")
    needs_policy = [s for s in suites if s in ("ifeval", "safety", "compare", "toy")]
    if not need_paths:
        return suites
    if needs_policy and not config.model:
        raise ConfigValueError(f"suites {needs_policy} evaluate a policy: set --model (config.model)")
    if "rewardbench" in suites and not (config.model or config.reward_model):
        raise ConfigValueError("suite rewardbench needs --reward_model or --model (config.reward_model/model)")
    for key in ("batch_size", "generation.max_new_tokens", "compare.num_samples"):
        v = config[key.split(".")[0]] if "." not in key else config[key.split(".")[0]][key.split(".")[1]]
        if not isinstance(v, int) or v < 1:
            raise ConfigValueError(f"config.{key}={v!r}: must be a positive integer")
    return suites


def markdown(results: dict) -> str:
    """One table per suite: metric | value."""
    lines = []
    for suite, metrics in results["suites"].items():
        lines += [f"### {suite}", "", "| metric | value |", "|---|---|"]
        for k, v in _flat(metrics).items():
            if isinstance(v, (list, tuple)):
                continue  # per-example values: in results.json
            lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines.append("")
    return "\n".join(lines)


def _finite(x):
    """`x` with non-finite floats as None (strict JSON: null), e.g. an infinite LC-win-rate coefficient."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _versions() -> dict:
    import importlib.metadata

    out = {}
    for name in ("align-jax", "jax", "jaxlib", "flax", "transformers"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_suites(config, suites, policy, reference, tokenizer, out_dir: str) -> tuple[dict, dict]:
    """({suite: metrics}, {suite: seconds}) of `suites` on in-memory models (`evaluate` and the training loop)."""
    results, seconds = {}, {}
    for s in suites:
        t0 = time.perf_counter()
        if s == "ifeval":
            r = run_ifeval(config, policy, tokenizer)
        elif s == "safety":
            r = run_safety(config, policy, tokenizer)
        elif s == "rewardbench":
            r = run_rewardbench(config, policy, reference, tokenizer)
        elif s == "compare":
            r = run_compare(config, policy, reference, tokenizer)
        else:
            r = run_toy(config, policy, tokenizer, out_dir)
        results[s], seconds[s] = r, round(time.perf_counter() - t0, 2)
        log.info("%s done in %.1f s", s, seconds[s])
    return results, seconds


def scalars(results: dict, prefix: str = "eval/") -> dict:
    """The numeric metrics of `run_suites`' results as flat {"<prefix><suite>/<metric>": float} (for
    metrics.jsonl and TensorBoard); per-example lists and strings are left out."""
    out = {}
    for k, v in _flat(results).items():
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)) or v is None:
            continue
        if np.isfinite(v):
            out[prefix + k] = float(v)
    return out


def training_eval(config, policy, reference, tokenizer, workdir: str) -> dict:
    """The suites `config.eval_suites` of a training run (every `eval_every` steps and at the end) on its current
    policy, with `default_config()`'s settings, at most `config.eval_suites_max_prompts` prompts per suite and
    answers of at most `config.eval_suites_max_new_tokens` tokens;
    `compare` and `rewardbench` use the run's reference when it has one. Flat `eval/<suite>/<metric>` scalars."""
    ec = default_config()
    ec.suites = config.eval_suites
    n = config.eval_suites_max_prompts
    ec.ifeval.max_prompts = ec.safety.max_prompts = ec.rewardbench.max_pairs = ec.compare.max_prompts = n
    ec.toy.max_prompts = n
    ec.seed = config.seed
    ec.batch_size = config.eval_batch_size
    ec.generation.max_new_tokens = config.eval_suites_max_new_tokens
    suites = _check(ec, need_paths=False)
    if reference is None:
        suites = [s for s in suites if s != "compare"]
    results, _ = run_suites(ec, suites, policy, reference, tokenizer, os.path.join(workdir, "eval_suites"))
    return scalars(results)


def evaluate(config, out_dir: str) -> dict:
    """Runs `config.suites` and writes `<out_dir>/results.json` and `results.md`; returns the results."""
    suites = _check(config)
    os.makedirs(out_dir, exist_ok=True)
    mesh = _mesh(config)
    policy = load_policy(config.model, "model", config, mesh) if config.model else None
    reference = load_policy(config.reference, "reference", config, mesh) if config.reference else None
    tok_dir = model_dir(config.model, "model") if config.model else model_dir(config.reward_model, "reward_model")
    tokenizer = load_tokenizer(config, tok_dir)
    suite_results, seconds = run_suites(config, suites, policy, reference, tokenizer, out_dir)
    results = {"model": config.model, "reference": config.reference, "reward_model": config.reward_model,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "config": config.to_dict(), "suites": suite_results, "seconds": seconds}
    results["versions"] = _versions()
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(_finite(results), f, indent=1, sort_keys=True, default=float, allow_nan=False)
    md = markdown(results)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    print(md)
    return results
