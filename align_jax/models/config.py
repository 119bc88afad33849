"""Model configuration, read from (and written back to) a Hugging Face `config.json`.

One decoder covers the Llama family as transformers defines it: Llama 2/3/3.1+ (`llama3` RoPE scaling),
Mistral (without sliding window), Qwen2/2.5 (q/k/v bias), Qwen3 (per-head RMSNorm on q and k), and the
many small models on the Llama architecture (SmolLM, TinyLlama). Anything the decoder cannot run *exactly*
(sliding-window attention, mixture of experts, an unknown RoPE scaling, ...) is refused with a message that
names the offending `config.json` key; it is never run approximately.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from align_jax.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
ATTENTION_IMPLEMENTATIONS = ("xla", "dot_product", "cudnn")
# Keys whose presence (with a value that changes the computation) we cannot honour exactly.
_REFUSED_KEYS = {
    "num_local_experts": "mixture-of-experts layers",
    "num_experts": "mixture-of-experts layers",
    "moe_intermediate_size": "mixture-of-experts layers",
    "layer_types": None,  # checked separately: only all-"full_attention" is fine
}


class ConfigError(UserError, ValueError):
    """A model config that align-jax cannot run exactly; the message names the key."""


class FrozenDict(Mapping):
    """A read-only, hashable dict (`ModelConfig.rope_scaling`): the config is part of the NNX graph definition,
    which `jax.jit` takes as a static (hashed) argument. Reads as a dict (`s["rope_type"]`, `s.get`, `dict(s)`)
    and compares equal to a dict with the same items."""

    def __init__(self, *args, **kw):
        self._d = dict(*args, **kw)

    def __getitem__(self, key):
        return self._d[key]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)

    def __hash__(self):
        return hash(tuple(sorted(self._d.items())))

    def __repr__(self):
        return f"FrozenDict({self._d!r})"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the decoder. Field names follow transformers' `LlamaConfig`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or a mapping with "rope_type" in {"linear", "llama3"} and that type's fields; stored as a hashable
    # `FrozenDict` (a plain dict given here is converted).
    rope_scaling: Mapping | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2) — and on o when `o_bias`
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before RoPE
    model_type: str = "llama"
    # Not part of the architecture: how we run it.
    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    remat_policy: str = "none"
    # Run the decoder layers as one `lax.scan` over their stacked weights (a loop whose body is one layer)
    # instead of unrolled Python code: the same numbers, a compile that does not grow with depth, and
    # rematerialised layers that the compiler cannot schedule ahead of their backward pass. The stacked weights
    # (and their gradients) are one extra sharded copy of the layers per step; only Param state is scanned.
    scan_layers: bool = False
    # How attention runs without a KV cache (training, scoring): "xla" = this module's einsums (softmax in fp32,
    # the reference path); "dot_product" = `jax.nn.dot_product_attention` with XLA's implementation (the same
    # numbers to rounding); "cudnn" = the same function's cuDNN flash-attention kernel (GPU only, bf16/fp16
    # activations, head_dim a multiple of 8 up to 128). Decoding with a cache always uses the einsums.
    attention: str = "xla"
    # The original config.json, written back by `save_pretrained`.
    hf_config: dict | None = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, FrozenDict):
            object.__setattr__(self, "rope_scaling", FrozenDict(self.rope_scaling))

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @property
    def num_params(self) -> int:
        d, i, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        hq, hk, hd = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        attn = d * hq * hd * 2 + d * hk * hd * 2
        if self.attention_bias:
            attn += hq * hd + 2 * hk * hd
        if self.qk_norm:
            attn += 2 * hd
        per_layer = attn + 3 * d * i + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + l * per_layer + d


def _dtype(name_or_dtype) -> Any:
    if name_or_dtype is None:
        return jnp.float32
    if isinstance(name_or_dtype, str):
        table = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
                 "float16": jnp.float16, "fp16": jnp.float16}
        if name_or_dtype not in table:
            raise ConfigError(f"unknown dtype {name_or_dtype!r}; use one of {sorted(table)}")
        return table[name_or_dtype]
    return jnp.dtype(name_or_dtype).type


def _rope_from_hf(cfg: dict) -> tuple[float, dict | None]:
    """Returns (rope_theta, rope_scaling) from transformers 4.x (`rope_theta`, `rope_scaling`) or
    5.x (`rope_parameters`) config dicts."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if scaling is None:
            scaling = params
    if theta is None:
        theta = 10000.0
    if scaling is None:
        return float(theta), None
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    key = "rope_parameters" if isinstance(params, dict) else "rope_scaling"
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear":
        return float(theta), {"rope_type": "linear", "factor": float(scaling["factor"])}
    if rope_type == "llama3":
        need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in need if k not in scaling]
        if missing:
            raise ConfigError(f"config.json: {key} of type 'llama3' lacks {missing}")
        out = {"rope_type": "llama3", **{k: float(scaling[k]) for k in need}}
        out["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
        return float(theta), out
    raise ConfigError(
        f"config.json: {key}.rope_type={rope_type!r} is not supported (supported: default, linear, llama3); "
        "align-jax refuses to run it approximately")


def from_hf_config(cfg: dict, *, param_dtype=jnp.float32, compute_dtype=None,
                   remat_policy: str = "none", scan_layers: bool = False, attention: str = "xla") -> ModelConfig:
    """Builds a `ModelConfig` from a Hugging Face config dict, refusing what we cannot run exactly."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"config.json: model_type={model_type!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    for key, what in _REFUSED_KEYS.items():
        if what and cfg.get(key):
            raise ConfigError(f"config.json: {key}={cfg[key]!r}: {what} are not supported")
    layer_types = cfg.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ConfigError(f"config.json: layer_types contains {sorted(set(layer_types))}; "
                          "only full attention is supported (no sliding window)")
    if model_type == "mistral" and cfg.get("sliding_window") is not None:
        raise ConfigError(f"config.json: sliding_window={cfg['sliding_window']} — sliding-window attention "
                          "is not supported; set it to null only if the model was trained without it")
    if model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        raise ConfigError("config.json: use_sliding_window=true — sliding-window attention is not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act={act!r}; only 'silu' (SwiGLU) is supported")
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise ConfigError("config.json: pretraining_tp != 1 is not supported")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise ConfigError(f"config.json: {key} must be a positive integer, got {cfg.get(key)!r}")
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ConfigError(f"config.json: num_attention_heads={heads} is not a multiple of "
                          f"num_key_value_heads={kv_heads}")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    theta, scaling = _rope_from_hf(cfg)
    attention_bias = bool(cfg.get("attention_bias", False))
    o_bias = attention_bias
    if model_type == "qwen2":  # Qwen2 always has q/k/v bias and no o bias
        attention_bias, o_bias = True, False
    if remat_policy not in REMAT_POLICIES:
        raise ConfigError(f"remat_policy={remat_policy!r}; choose one of {REMAT_POLICIES}")
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"config.model.attention={attention!r}; choose one of {ATTENTION_IMPLEMENTATIONS}")
    if attention == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"config.model.attention='cudnn' needs a GPU (this run's backend is "
                          f"{jax.default_backend()}); use 'xla' or 'dot_product'")
    param_dtype = _dtype(param_dtype)
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        o_bias=o_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        model_type=model_type,
        param_dtype=param_dtype,
        compute_dtype=_dtype(compute_dtype) if compute_dtype is not None else param_dtype,
        remat_policy=remat_policy,
        scan_layers=bool(scan_layers),
        attention=attention,
        hf_config=dict(cfg),
    )


def load_hf_config(path: str, **kw) -> ModelConfig:
    """Reads `path/config.json` (or a config.json path) into a `ModelConfig`."""
    file = path if path.endswith(".json") else os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: no config.json (is this a Hugging Face model directory?)")
    with open(file) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
    try:
        return from_hf_config(cfg, **kw)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def to_hf_config(config: ModelConfig) -> dict:
    """The config.json to write next to the weights (the original one, with dtype and sizes updated)."""
    out = dict(config.hf_config or {})
    if not out:
        out = {"architectures": ["LlamaForCausalLM"], "model_type": config.model_type, "hidden_act": "silu"}
    out.update(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    if "rope_parameters" not in out:
        out["rope_theta"] = config.rope_theta
        if config.rope_scaling is not None:
            out["rope_scaling"] = dict(config.rope_scaling)
    dtype_name = {jnp.float32: "float32", jnp.bfloat16: "bfloat16", jnp.float16: "float16"}.get(
        config.param_dtype, "float32")
    out["torch_dtype" if "dtype" not in out else "dtype"] = dtype_name
    return out


def rope_inv_freq(config: ModelConfig):
    """Inverse RoPE frequencies [head_dim/2] as transformers computes them (`_compute_default_rope_parameters`,
    `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`), in float64 on the host then
    float32 — identical to torch's float32 computation for these formulas up to rounding of the last bit."""
    import numpy as np

    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
    inv_freq = inv_freq.astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return (inv_freq / s["factor"]).astype(np.float32)
    # llama3
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen = old_len / lo
    high_freq_wavelen = old_len / hi
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)
