"""Evaluation of a trained policy and/or reward model: `python -m align_jax.evaluate` (see its docstring).

    python -m align_jax.evaluate --model=/tmp/dpo --reference=/tmp/sft --out=/tmp/dpo_eval
    python -m align_jax.evaluate --model=/tmp/dpo --suite=ifeval,safety --config.generation.max_new_tokens=256
    python -m align_jax.evaluate --reward_model=/tmp/rm --suite=rewardbench --config.rewardbench.pairs=rb.jsonl
    python -m align_jax.evaluate --config=configs/evaluate.py:tiny --model=... --out=...   # a few prompts per suite

Every data file defaults to a small set shipped in `align_jax/evaluation/data/` (written for this project), so
every suite runs offline out of the box; point a suite at your own file (same format, documented in its module)
for numbers you can publish.
"""

import ml_collections


def get_config(arg: str = ""):
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
