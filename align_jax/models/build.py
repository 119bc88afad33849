"""A run's model from its config (`config.model`): the embedded toy model, a random model of a Hugging Face
config.json, or a pretrained Hugging Face directory, created straight into its shardings (never an unsharded
copy); and weight copies (the frozen reference, a value model's backbone)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from align_jax.errors import SetupError
from align_jax.models.checkpoint import load_pretrained
from align_jax.models.config import from_hf_config, load_hf_config
from align_jax.models.heads import ScalarHeadModel
from align_jax.models.llama import Transformer
from align_jax.parallel import create_sharded


def model_kwargs(config) -> dict:
    return dict(param_dtype=config.model.dtype, compute_dtype=config.model.compute_dtype or None,
                remat_policy=config.model.remat, scan_layers=config.model.scan_layers,
                attention=config.model.get("attention", "xla"))


def build_policy(config, mesh, *, scalar_head: bool = False, seed_offset: int = 0):
    """The policy (`Transformer`), or with `scalar_head` a reward model (decoder + scalar head; a pretrained
    backbone gets a fresh head), from `config.model.init_from` ('toy' | 'random:<config.json>' | a Hugging Face
    directory), seeded by `config.seed + seed_offset` when initialised at random."""
    init = config.model.init_from
    kw = model_kwargs(config)
    if init == "toy" or init.startswith("random:"):
        if init == "toy":
            from align_jax.data.toy import toy_model_config

            mcfg = from_hf_config(toy_model_config(), **kw)
        else:
            mcfg = load_hf_config(init[len("random:"):], **kw)
        seed = config.seed + seed_offset
        if scalar_head:
            return create_sharded(lambda rngs: ScalarHeadModel(mcfg, rngs=rngs), mesh, seed=seed)
        return create_sharded(lambda rngs: Transformer(mcfg, rngs=rngs), mesh, seed=seed)
    if not os.path.isdir(init):
        raise SetupError(f"config.model.init_from={init!r}: not a directory (nor 'toy' / 'random:<config.json>')")
    backbone = load_pretrained(init, dtype=kw["param_dtype"], compute_dtype=kw["compute_dtype"],
                               remat_policy=kw["remat_policy"], scan_layers=kw["scan_layers"],
                               attention=kw["attention"], mesh=mesh)
    if not scalar_head:
        return backbone
    # A fresh scalar head on the pretrained backbone (the head is tiny: replicated is fine).
    return ScalarHeadModel(backbone.config, rngs=nnx.Rngs(config.seed), backbone=backbone)


def copy_module(module):
    """A copy of `module` with its own weight buffers (same shardings; nothing is read from disk again)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.jit(lambda s: jax.tree.map(jnp.copy, s))(state))


def frozen_reference(policy):
    """The frozen reference: a copy of the policy's current weights; no gradient flows into it, so nothing is
    rematerialised."""
    ref = copy_module(policy)
    if isinstance(ref, Transformer):
        ref.config = ref.config.replace(remat_policy="none")
    return ref
