"""Building the pieces of a run from its config: tokenizer, data, model, reference model, export."""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align_jax.errors import UserError
from align_jax.models import from_hf_config, load_hf_config, load_pretrained, save_pretrained, save_reward_model
from align_jax.models.heads import ScalarHeadModel
from align_jax.models.llama import Transformer
from align_jax.parallel import create_sharded

log = logging.getLogger(__name__)


class SetupError(UserError, ValueError):
    """A config value that cannot work; the message names the key."""


def check_batch_divisibility(config, mesh) -> None:
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % replicas:
            raise SetupError(f"config.{key}={config[key]} is not divisible by the data-parallel size "
                             f"{replicas} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
    per_replica = config.batch_size // replicas
    if per_replica % config.optimizer.grad_accum_steps:
        raise SetupError(f"config.optimizer.grad_accum_steps={config.optimizer.grad_accum_steps} does not divide "
                         f"the per-replica batch {per_replica} (config.batch_size / {replicas})")


def check_model_dirs(config) -> None:
    """A pretrained `model.init_from` directory is checked (config.json, every safetensors file whole) before the
    data is built, so a damaged checkpoint is named in seconds, not after tokenizing a dataset."""
    from align_jax.models.checkpoint import check_checkpoint

    init = config.model.init_from
    if init != "toy" and not init.startswith("random:"):
        _require_model_dir("model.init_from", init)
        check_checkpoint(init)


def _require_model_dir(key: str, path: str) -> None:
    if not os.path.isdir(path):
        raise SetupError(f"config.{key}={path!r}: no such directory (expected a Hugging Face model directory with "
                         f"config.json, *.safetensors and the tokenizer files; or 'toy' / 'random:<config.json>')")


# ------------------------------------------------------------------------------------------------ tokenizer


def load_tokenizer(config):
    from transformers import AutoTokenizer

    from align_jax.data.toy import TOKENIZER_DIR

    path, key = config.model.tokenizer, "model.tokenizer"
    if not path:
        init = config.model.init_from
        path = str(TOKENIZER_DIR) if init == "toy" or init.startswith("random:") else init
        key = "model.init_from"
    _require_model_dir(key, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SetupError(f"config.{key}={path!r}: no tokenizer could be loaded from it ({e}); give a directory "
                         f"with tokenizer.json / tokenizer_config.json via --config.model.tokenizer") from None
    template = config.model.get("chat_template", "")
    if template == "chatml":
        tokenizer.chat_template = CHATML_TEMPLATE
    elif template:
        if not os.path.isfile(template):
            raise SetupError(f"config.model.chat_template={template!r}: neither 'chatml' nor a .jinja file")
        with open(template) as f:
            tokenizer.chat_template = f.read()
    return tokenizer


# ChatML (<|im_start|>role\ncontent<|im_end|>\n), as Qwen and SmolLM use it; the generation prompt opens an
# assistant turn. The EOS of the tokenizer is not added: the template ends each turn with <|im_end|>.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


# ------------------------------------------------------------------------------------------------ data


@dataclasses.dataclass
class Data:
    kind: str
    train: object  # grain IterDataset of batches (infinite)
    eval: Callable | None  # () -> a fresh one-epoch eval IterDataset
    skips: object
    train_source: object = None
    loader_kw: dict = dataclasses.field(default_factory=dict)
    parse_skipped: int = 0  # bad records skipped while building the TFDS dataset (before tokenization)
    train_fingerprint: str = ""  # the built training dataset (its content hash): a restart must train on the same

    @property
    def num_skipped(self) -> int:
        """Every skipped training example, counted once: at parse time plus at tokenization."""
        return self.parse_skipped + (self.skips.num_skipped if self.skips is not None else 0)

    @property
    def num_train_examples(self) -> int:
        """Usable training examples (records of the source minus those skipped at tokenization)."""
        return len(self.train_source) - (self.skips.num_skipped if self.skips is not None else 0)


def _resolve_files(spec: str, workdir: str, config, key: str):
    """'toy:<name>' | 'hh:<dir>' | paths/globs (comma-separated) -> ('files', [paths]) or ('hh', dir)."""
    if spec.startswith("toy:"):
        from align_jax.data.toy import generate

        out = config.data.toy_dir or os.path.join(workdir, "toy_data")
        name = spec[4:]
        path = os.path.join(out, f"{name}.jsonl")
        if not os.path.exists(path):
            files = generate(out, seed=config.data.toy_seed)
            if name not in {k for k in files}:
                raise SetupError(f"config.data.{key}={spec!r}: the toy task has no file {name!r}; "
                                 f"it has {sorted(files)}")
        return "files", [path]
    if spec.startswith("hh:"):
        return "hh", spec[3:]
    paths = []
    for part in spec.split(","):
        part = part.strip()
        found = sorted(glob.glob(part))
        base, _, split = part.rpartition(":")
        if not found and base and os.path.isdir(base) and split.isidentifier():
            found = [part]  # "<save_to_disk dir>:<split>" of a Hugging Face DatasetDict
        if not found:
            raise SetupError(f"config.data.{key}: no file matches {part!r} (expected JSON/JSONL files, parquet or "
                             f"arrow files, a Hugging Face save_to_disk directory [':<split>'], or toy:<name>)")
        paths += found
    return "files", paths


def _build(spec: str, kind: str, workdir: str, config, key: str, split: str):
    from align_jax.data import build_dataset
    from align_jax.data.hh_rlhf import build_hh_rlhf

    data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
    how, what = _resolve_files(spec, workdir, config, key)
    if how == "hh":
        builder, stats = build_hh_rlhf(what, data_dir=data_dir, on_bad_example=config.data.on_bad_example,
                                       splits=(split,))
        source = builder.as_data_source(split)
    else:
        builder, stats = build_dataset(what, kind=kind, data_dir=data_dir, on_bad_example=config.data.on_bad_example)
        source = builder.as_data_source("train")
    # The built dataset's directory under data_dir names its content fingerprint (files, contents, parser version).
    return source, stats, os.path.relpath(str(builder.data_dir), data_dir)


def make_data(config, workdir: str, tokenizer, algorithm) -> Data:
    from align_jax.data import make_loader

    kind = config.data.kind or algorithm.data_kind
    train_source, stats, fingerprint = _build(config.data.train, kind, workdir, config, "train", "train")
    kw = dict(kind=kind, max_length=config.data.max_length, max_prompt_length=config.data.max_prompt_length or None,
              truncation_mode=config.data.truncation_mode, length_buckets=tuple(config.data.length_buckets),
              group_size=config.data.group_size or None, on_bad_example=config.data.on_bad_example)
    train, skips = make_loader(train_source, tokenizer, batch_size=config.batch_size // jax.process_count(),
                               seed=config.seed, shuffle=config.data.shuffle, num_epochs=None,
                               packing=config.data.packing, drop_remainder=True, prefetch=2, **kw)
    eval_fn = None
    if config.data.eval:
        eval_source, _, _ = _build(config.data.eval, kind, workdir, config, "eval", "test")

        def eval_fn():
            ds, _ = make_loader(eval_source, tokenizer, batch_size=config.eval_batch_size // jax.process_count(),
                                seed=0, shuffle=False, num_epochs=1, packing=False, drop_remainder=False, **kw)
            return ds

    return Data(kind, train, eval_fn, skips, train_source, kw, parse_skipped=stats.num_skipped,
                train_fingerprint=fingerprint)


def rollout_steps(config) -> int:
    """Optimizer steps per rollout of an online algorithm (GRPO: num_iterations; PPO: num_ppo_epochs x
    num_mini_batches); 1 otherwise."""
    if config.algorithm == "grpo":
        return config.grpo.num_iterations
    if config.algorithm == "ppo":
        return config.ppo.num_ppo_epochs * config.ppo.num_mini_batches
    return 1


def resolve_config(config, data: Data):
    """The config a run actually uses: `num_epochs` > 0 turns into `total_steps` = ceil(num_epochs x usable
    training examples / batch_size). Returns a new (unlocked) ConfigDict; `config` is not changed."""
    config = config.copy_and_resolve_references()
    if config.get("num_epochs", 0) and config.num_epochs > 0:
        n = data.num_train_examples
        config.total_steps = max(1, math.ceil(config.num_epochs * n / config.batch_size))
        per_rollout = rollout_steps(config)
        config.total_steps = math.ceil(config.total_steps / per_rollout) * per_rollout  # whole rollouts
        log.info("num_epochs=%g over %d examples at batch %d: total_steps=%d", config.num_epochs, n,
                 config.batch_size, config.total_steps)
    return config


# ------------------------------------------------------------------------------------------------ models


def _model_kw(config):
    return dict(param_dtype=config.model.dtype, compute_dtype=config.model.compute_dtype or None,
                remat_policy=config.model.remat)


def build_model(config, mesh, algorithm, *, seed_offset: int = 0):
    """The policy (or the reward model: decoder + scalar head; or the algorithm's own module, e.g. PPO's policy +
    value model), created straight into its shardings."""
    if algorithm.build_model is not None:
        return algorithm.build_model(config, mesh)
    init = config.model.init_from
    kw = _model_kw(config)
    if init == "toy" or init.startswith("random:"):
        if init == "toy":
            from align_jax.data.toy import toy_model_config

            mcfg = from_hf_config(toy_model_config(), **kw)
        else:
            mcfg = load_hf_config(init[len("random:"):], **kw)
        seed = config.seed + seed_offset
        if algorithm.scalar_head:
            return create_sharded(lambda: ScalarHeadModel(mcfg, rngs=nnx.Rngs(seed)), mesh)
        return create_sharded(lambda: Transformer(mcfg, rngs=nnx.Rngs(seed)), mesh)
    if not os.path.isdir(init):
        raise SetupError(f"config.model.init_from={init!r}: not a directory (nor 'toy' / 'random:<config.json>')")
    backbone = load_pretrained(init, dtype=kw["param_dtype"], compute_dtype=kw["compute_dtype"],
                               remat_policy=kw["remat_policy"], mesh=mesh)
    if not algorithm.scalar_head:
        return backbone
    # A fresh scalar head on the pretrained backbone (the head is tiny: replicated is fine).
    head = ScalarHeadModel(backbone.config, rngs=nnx.Rngs(config.seed), backbone=backbone)
    return head


def policy_of(model):
    """The policy inside a trainable module (PPO's `PolicyValueModel.policy`), or the module itself."""
    return getattr(model, "policy", model)


def build_reference(config, policy, algorithm):
    """The frozen reference policy (DPO): a copy of the policy's initial weights (same shardings; the checkpoint
    is not read twice), or None when the loss is reference-free (`config.loss.reference_free`)."""
    if not algorithm.needs_reference or config.loss.get("reference_free", False):
        return None
    policy = policy_of(policy)
    graphdef, state = nnx.split(policy)
    ref = nnx.merge(graphdef, jax.jit(lambda s: jax.tree.map(jnp.copy, s))(state))
    if isinstance(ref, Transformer):  # no gradient flows into the reference: nothing to rematerialise
        ref.config = ref.config.replace(remat_policy="none")
    return ref


def precompute_reference(config, data: Data, ref_model, mesh, tokenizer) -> Data:
    """One pass over the training source (unshuffled) computes the reference sequence log-probs of every
    pair, keyed by record index; the training batches then carry them (`ref_chosen_logps`,
    `ref_rejected_logps`), so no reference forward runs during training. The values are those the live
    reference would give (same function, same masks)."""
    from align_jax.data import make_loader
    from align_jax.train.algorithms import pair_token_logps, seq_logps
    from align_jax.train.loop import host_batch, to_device

    n = len(data.train_source)
    table = np.full((n, 2), np.nan, np.float32)
    graphdef, params, rest = nnx.split(ref_model, nnx.Param, ...)

    @jax.jit
    def ref_logps(params, batch):
        m = nnx.merge(graphdef, params, rest)
        (c_lp, c_m), (r_lp, r_m) = pair_token_logps(m, batch, config.chunk_size)
        return seq_logps(c_lp, c_m), seq_logps(r_lp, r_m)

    ds, _ = make_loader(data.train_source, tokenizer, batch_size=config.eval_batch_size // jax.process_count(),
                        seed=0, shuffle=False, num_epochs=1, drop_remainder=False, shard_by_process=False,
                        **data.loader_kw)
    for batch in ds:
        host = host_batch(batch)
        c, r = jax.device_get(ref_logps(params, to_device(host, mesh)))
        idx = host["record_index"]
        ok = idx >= 0
        table[idx[ok], 0], table[idx[ok], 1] = np.asarray(c)[ok], np.asarray(r)[ok]

    def attach(batch):
        idx = batch["record_index"]
        batch = dict(batch)
        batch["ref_chosen_logps"] = np.where(idx >= 0, table[np.maximum(idx, 0), 0], 0.0).astype(np.float32)
        batch["ref_rejected_logps"] = np.where(idx >= 0, table[np.maximum(idx, 0), 1], 0.0).astype(np.float32)
        return batch

    return dataclasses.replace(data, train=data.train.map(attach))


def toy_generation_eval(config, model, tokenizer, workdir: str) -> dict:
    """Generation quality per axis on the toy task's held-out prompts (greedy; programs score the answers)."""
    from align_jax.data.toy import evaluate, read_jsonl
    from align_jax.evaluation import generate_completions

    toy_dir = config.data.toy_dir or os.path.join(workdir, "toy_data")
    prompts = [r["prompt"] for r in read_jsonl(os.path.join(toy_dir, "eval_prompts.jsonl"))]
    prompts = prompts[:config.eval_generation]
    completions = generate_completions(policy_of(model), tokenizer, prompts, batch_size=min(100, len(prompts)),
                                       max_new_tokens=24)
    scores = evaluate(prompts, completions)
    return {f"eval/gen/{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float)) and v == v}


def export(config, model, tokenizer, path: str) -> None:
    """The trained policy as a Hugging Face directory (config.json + safetensors + tokenizer); a reward model as
    the matching `*ForSequenceClassification` directory (`score.weight`, `num_labels` 1, the pad token id), which
    transformers' `AutoModelForSequenceClassification` loads with the same scores (`models.save_reward_model`)."""
    model = policy_of(model)
    if isinstance(model, ScalarHeadModel):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        save_reward_model(model, path, pad_token_id=pad)
    else:
        save_pretrained(model, path)
    if jax.process_index() == 0:
        tokenizer.save_pretrained(path)
