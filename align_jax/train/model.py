"""The run's trainable module and frozen reference from its config and algorithm, and its export as a Hugging
Face directory."""

from __future__ import annotations

import os

import jax

from align_jax.errors import SetupError
from align_jax.models import lora, save_pretrained, save_reward_model
from align_jax.models.build import build_policy, frozen_reference
from align_jax.models.checkpoint import check_checkpoint
from align_jax.models.heads import ScalarHeadModel


def check_model_dirs(config) -> None:
    """A pretrained `model.init_from` directory is checked (config.json, every safetensors file whole) before the
    data is built, so a damaged checkpoint is named in seconds, not after tokenizing a dataset."""
    init = config.model.init_from
    if init != "toy" and not init.startswith("random:"):
        require_model_dir("model.init_from", init)
        check_checkpoint(init)


def require_model_dir(key: str, path: str) -> None:
    if not os.path.isdir(path):
        raise SetupError(f"config.{key}={path!r}: no such directory (expected a Hugging Face model directory with "
                         f"config.json, *.safetensors and the tokenizer files; or 'toy' / 'random:<config.json>')")


def build_model(config, mesh, algorithm):
    """The policy (or the reward model: decoder + scalar head; or the algorithm's own module, e.g. PPO's policy +
    value model), created straight into its shardings."""
    if algorithm.build_model is not None:
        model = algorithm.build_model(config, mesh)
    else:
        model = build_policy(config, mesh, scalar_head=algorithm.scalar_head)
    if lora.enabled(config):  # adapters on every decoder of the trainable module (`models.lora`)
        lora.add_lora(model, config.lora, mesh, seed=config.seed)
    return model


def policy_of(model):
    """The policy inside a trainable module (PPO's `PolicyValueModel.policy`), or the module itself."""
    return getattr(model, "policy", model)


def build_reference(config, model, algorithm):
    """The frozen reference policy: a copy of the policy's initial weights (same shardings; the checkpoint is not
    read twice), or None when the algorithm needs none or the loss is reference-free (`loss.reference_free`)."""
    if not algorithm.needs_reference or config.loss.get("reference_free", False):
        return None
    if lora.enabled(config):  # LoRA: the base model = the policy's own weights with the adapters off (no copy)
        ref = lora.adapters_off(policy_of(model))
        ref.config = ref.config.replace(remat_policy="none")
        return ref
    return frozen_reference(policy_of(model))


def export(config, model, tokenizer, path: str) -> None:
    """The trained policy as a Hugging Face directory (config.json + safetensors + tokenizer); a reward model as
    the matching `*ForSequenceClassification` directory (`score.weight`, `num_labels` 1, the pad token id), which
    transformers' `AutoModelForSequenceClassification` loads with the same scores (`models.save_reward_model`)."""
    model = policy_of(model)
    if lora.enabled(config):  # the merged model (W + (α/r)·A·B) as the plain export; the adapters as PEFT's
        if not isinstance(model, ScalarHeadModel):
            lora.save_peft_adapter(model, path.rstrip("/") + "_adapter", config.lora,
                                   base_model_name_or_path=config.model.init_from)
        model = lora.merged_copy(model)
    if isinstance(model, ScalarHeadModel):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        save_reward_model(model, path, pad_token_id=pad)
    else:
        save_pretrained(model, path)
    if jax.process_index() == 0:
        tokenizer.save_pretrained(path)
