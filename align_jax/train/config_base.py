"""The shared experiment config: every field, commented. `configs/*.py` start from `base_config()` and set what
their algorithm needs; any field can be overridden on the command line (`--config.optimizer.learning_rate=5e-7`).
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # one of align_jax.algorithms.ALGORITHMS: sft | reward_model | dpo | orpo | grpo | grpo_offline | rloo | ppo
    c.algorithm = "dpo"
    c.seed = 0  # seeds parameter init (random init only), data shuffling and the state RNG

    c.model = ml_collections.ConfigDict()
    # Where the weights come from: a Hugging Face model directory; "toy" = the embedded toy config randomly
    # initialised; "random:<path to config.json>" = that architecture randomly initialised.
    c.model.init_from = "toy"
    c.model.tokenizer = ""  # tokenizer directory (AutoTokenizer); "" = init_from's directory, or the toy tokenizer
    # Chat template for conversational data: "" = the tokenizer's own (tokenizer_config.json / chat_template.jinja;
    # conversational data without one is refused); "chatml" = the built-in ChatML template; or a .jinja file path
    c.model.chat_template = ""
    c.model.dtype = "float32"  # parameter dtype: float32 | bfloat16
    c.model.compute_dtype = ""  # activation dtype; "" = same as dtype
    c.model.remat = "none"  # gradient checkpointing per layer: none | full | dots | dots_with_no_batch_dims
    # One lax.scan over the decoder layers instead of unrolled layers: same numbers (to rounding), compile time
    # independent of depth, and with remat the peak memory of one layer's recompute instead of several
    # (the compiler may hoist unrolled layers' recomputes; see benchmarks/aot_topology.py)
    c.model.scan_layers = False
    # Attention without a KV cache: "xla" (einsums, the default), "dot_product" (jax.nn.dot_product_attention,
    # XLA's implementation) or "cudnn" (its cuDNN flash-attention kernel: GPU only, bf16 activations)
    c.model.attention = "xla"

    c.data = ml_collections.ConfigDict()
    # JSON/JSONL, Parquet or Arrow file(s) (a path, a glob, or comma-separated paths), a Hugging Face save_to_disk
    # directory ("<dir>" or "<dir>:<split>"), an HH-RLHF directory ("hh:<dir>"), or a file of the embedded toy task
    # ("toy:<name>", e.g. toy:pairs, toy:sft, toy:groups_ranked).
    c.data.train = "toy:pairs"
    c.data.eval = "toy:eval_pairs"  # held-out data in the same format ("" = no eval)
    c.data.kind = ""  # pairwise | groupwise | sft; "" = the algorithm's default (groupwise for ranked RMs)
    c.data.data_dir = ""  # where TFDS datasets are built; "" = <workdir>/tfds
    c.data.max_length = 128  # prompt + completion tokens (TRL's max_length)
    c.data.max_prompt_length = 0  # 0 = no separate prompt limit
    c.data.truncation_mode = "keep_start"  # keep_start | keep_end (TRL)
    c.data.length_buckets = (64, 128)  # batches are padded to the smallest bucket that fits: no recompiles
    # Several sequences per row (segment ids keep them apart). None: on for preference data (DPO, ORPO, reward
    # models, offline GRPO: each batch's sequences packed, the same batches and losses as padded), off for SFT.
    c.data.packing = ml_collections.FieldReference(None, field_type=bool)
    # Packed preference rows' length (0 = data.max_length); e.g. 2 x max_length lets two long sequences share a row
    # (attention runs over the whole row, so its cost grows with the square of this length)
    c.data.packing_length = 0
    c.data.group_size = 0  # groupwise: responses per prompt K (0 = largest in the data)
    c.data.on_bad_example = "raise"  # raise | skip (skipped examples are counted and logged)
    c.data.shuffle = True
    c.data.toy_seed = 0  # seed of the embedded toy task's generator
    c.data.toy_dir = ""  # where the toy task's files are written; "" = <workdir>/toy_data

    c.batch_size = 32  # global batch (pairs / groups / rows) per optimizer step
    c.total_steps = 200  # optimizer steps
    # > 0: train for this many passes over the (usable) training examples instead: total_steps becomes
    # ceil(num_epochs * examples / batch_size), fixed when the run starts and written to <workdir>/config.json
    c.num_epochs = 0.0
    c.chunk_size = 8192  # vocabulary chunk of the log-prob op

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"  # adamw | sgd
    c.optimizer.learning_rate = 5e-7
    c.optimizer.schedule = "linear"  # cosine | linear | constant (after linear warmup); TRL's default is linear
    c.optimizer.warmup_steps = 0
    c.optimizer.min_lr_ratio = 0.0  # final lr / peak lr
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.max_grad_norm = 1.0  # 0 = no clipping
    c.optimizer.grad_accum_steps = 1  # micro-batches per step (batch_size must divide)

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "dpo:sigmoid"  # a name from align_jax.losses.available()
    c.loss.kwargs = ml_collections.ConfigDict({"beta": 0.1})  # keyword arguments of that loss
    c.loss.use_soft_labels = True  # pass the data's chosen_prob as label_probs (1.0 for hard labels)

    # LoRA (Hu et al. 2021; align_jax.models.lora, PEFT's conventions): rank > 0 trains only rank-r adapters on
    # lora.target_modules (and a reward / value model's scalar head); the base weights stay frozen (in model.dtype,
    # e.g. bfloat16, while the adapters are lora.dtype) and out of the optimizer state; the reference of DPO / GRPO
    # / PPO is the base model with the adapters switched off (the same weights: no second copy). Checkpoints hold
    # the adapters (the base is read again from model.init_from); export writes the merged model to
    # <workdir>/export and the adapters as a PEFT directory to <workdir>/export_adapter.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0 = full fine-tuning
    c.lora.alpha = 16.0  # scaling alpha / rank (PEFT's lora_alpha)
    c.lora.dropout = 0.0  # PEFT's lora_dropout: on the adapters' input, in the train step only
    c.lora.target_modules = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    c.lora.init = "default"  # default (PEFT: kaiming-uniform A, zero B) | gaussian (A ~ N(0, 1/r), zero B)
    c.lora.dtype = "float32"  # the adapters' dtype
    c.lora.init_from = ""  # a PEFT adapter directory to start from (continue training, or evaluate)

    c.reference = ml_collections.ConfigDict()
    c.reference.precompute = False  # DPO: compute reference log-probs once before training
    # ... and keep them in <data_dir>/reference_logps/ (keyed by data, tokenizer, reference weights, lengths, mesh):
    # a restarted run and later runs on the same data and reference reuse them
    c.reference.cache = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # pure data parallelism
    c.mesh.fsdp = -1  # FSDP (-1: all remaining devices)
    c.mesh.tensor = 1  # tensor parallelism

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100  # also saved at the end and on SIGTERM
    c.checkpoint.keep = 3  # keep the last K
    c.checkpoint.async_save = True

    c.log_every = 10  # steps between console/TensorBoard logs (metrics.jsonl gets every step)
    c.eval_every = 100  # steps between evaluations (0 = only at the end)
    c.eval_batches = 0  # 0 = the whole eval set
    c.eval_batch_size = 64
    c.eval_generation = 0  # toy task only: held-out prompts answered greedily and scored per axis at each eval
    # suites of `python -m align_jax.evaluate` run on the policy at each eval (eval/<suite>/<metric>), e.g.
    # "ifeval,safety"; compare and rewardbench use the run's reference (compare is skipped without one)
    c.eval_suites = ""
    c.eval_suites_max_prompts = 32  # prompts (pairs) per suite at each eval
    c.eval_suites_max_new_tokens = 128  # answer length of the suites' generations
    c.progress_bar = True
    c.export = True  # write the final policy as a Hugging Face directory to <workdir>/export
    return c


def tiny(c: ml_collections.ConfigDict, steps: int = 4, checkpoint_every: int = 2) -> ml_collections.ConfigDict:
    """The part every `:tiny` variant shares: a few optimizer steps of 8 examples with a checkpoint mid-way and
    no progress bar (seconds on CPU; the tests' configs). Algorithm-specific shrinking stays in the config."""
    c.total_steps = steps
    c.batch_size = 8
    c.eval_batch_size = 8
    c.checkpoint.every_steps = checkpoint_every
    c.progress_bar = False
    return c
