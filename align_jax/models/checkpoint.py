"""Hugging Face checkpoint directories (config.json + safetensors) in and out, without PyTorch.

`load_pretrained` maps each safetensors tensor to its parameter (transposing torch's [out, in] Linear layout
into our [in, ..., out] layout) and places it straight into its sharding with
`jax.make_array_from_callback`: every device receives only its own slice, and only that slice is read from the
file (`_read_slice`: the slice of our layout mapped back to a block of the stored tensor), so with several
processes each reads only what its devices hold, and no device or host ever holds an unsharded copy. `save_pretrained` writes the inverse mapping, so that
transformers and vLLM load the result and load -> save -> load is bit-exact.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from align_jax.errors import UserError
from align_jax.models.config import ModelConfig, load_hf_config, rope_inv_freq, to_hf_config
from align_jax.models.heads import ScalarHeadModel
from align_jax.models.llama import Transformer

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SCORE_NAME = "score.weight"  # the [num_labels, D] head of transformers' *ForSequenceClassification
SEQ_CLS_ARCHITECTURES = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
                         "qwen2": "Qwen2ForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification"}


class CheckpointError(UserError, ValueError):
    """A checkpoint directory that does not match its config; the message names the file and tensor."""


def _t(x):
    return np.ascontiguousarray(x.T)


def hf_key_map(c: ModelConfig) -> dict[tuple, tuple[str, Callable, Callable]]:
    """Our parameter path -> (HF tensor name, HF->ours, ours->HF)."""
    D, H, K, E = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    ident = lambda x: x  # noqa: E731
    m = {("embed",): ("model.embed_tokens.weight", ident, ident),
         ("final_norm", "weight"): ("model.norm.weight", ident, ident)}
    if not c.tie_word_embeddings:
        m[("lm_head",)] = ("lm_head.weight", _t, _t)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        a, L = ("layers", i, "attn"), ("layers", i)
        m[a + ("q",)] = (p + "self_attn.q_proj.weight", lambda x: _t(x).reshape(D, H, E),
                         lambda x: _t(x.reshape(D, H * E)))
        for n, heads in (("k", K), ("v", K)):
            m[a + (n,)] = (p + f"self_attn.{n}_proj.weight", lambda x, h=heads: _t(x).reshape(D, h, E),
                           lambda x, h=heads: _t(x.reshape(D, h * E)))
        m[a + ("o",)] = (p + "self_attn.o_proj.weight", lambda x: _t(x).reshape(H, E, D),
                         lambda x: _t(x.reshape(H * E, D)))
        if c.attention_bias:
            for n, heads in (("q", H), ("k", K), ("v", K)):
                m[a + (f"{n}_bias",)] = (p + f"self_attn.{n}_proj.bias", lambda x, h=heads: x.reshape(h, E),
                                         lambda x: x.reshape(-1))
        if c.o_bias:
            m[a + ("o_bias",)] = (p + "self_attn.o_proj.bias", ident, ident)
        if c.qk_norm:
            m[a + ("q_norm", "weight")] = (p + "self_attn.q_norm.weight", ident, ident)
            m[a + ("k_norm", "weight")] = (p + "self_attn.k_norm.weight", ident, ident)
        for n in ("gate", "up", "down"):
            m[L + ("mlp", n)] = (p + f"mlp.{n}_proj.weight", _t, _t)
            if c.mlp_bias:
                m[L + ("mlp", f"{n}_bias")] = (p + f"mlp.{n}_proj.bias", ident, ident)
        m[L + ("input_norm", "weight")] = (p + "input_layernorm.weight", ident, ident)
        m[L + ("post_attn_norm", "weight")] = (p + "post_attention_layernorm.weight", ident, ident)
    return m


def _layouts(c: ModelConfig) -> dict[tuple, tuple[str, int]]:
    """Our parameter path -> how our layout derives from the stored tensor, for reading slices (`_read_slice`):
    "id" (same), "T" ([out, in] -> [in, out]), "T_split" ([h*E, D] -> [D, h, E]), "T_merge" ([D, H*E] ->
    [H, E, D]), "split" ([h*E] -> [h, E]), with h the heads of that split."""
    H, K = c.num_attention_heads, c.num_key_value_heads
    out = {}
    for pth, (name, _, _) in hf_key_map(c).items():
        leaf = pth[-1]
        if pth == ("lm_head",) or (len(pth) == 4 and pth[2] == "mlp" and leaf in ("gate", "up", "down")):
            out[pth] = ("T", 0)
        elif len(pth) == 4 and pth[2] == "attn" and leaf in ("q", "k", "v"):
            out[pth] = ("T_split", H if leaf == "q" else K)
        elif len(pth) == 4 and pth[2] == "attn" and leaf == "o":
            out[pth] = ("T_merge", H)
        elif len(pth) == 4 and pth[2] == "attn" and leaf in ("q_bias", "k_bias", "v_bias"):
            out[pth] = ("split", H if leaf == "q_bias" else K)
        else:
            out[pth] = ("id", 0)
    return out


def _stored_shape(layout: tuple[str, int], shape: tuple) -> tuple:
    """The shape of the stored tensor that our `shape` derives from under `layout` (see `_layouts`)."""
    kind, _ = layout
    return {"id": lambda: tuple(shape), "T": lambda: (shape[1], shape[0]),
            "T_split": lambda: (shape[1] * shape[2], shape[0]), "T_merge": lambda: (shape[2], shape[0] * shape[1]),
            "split": lambda: (shape[0] * shape[1],)}[kind]()


def _read_slice(handle, name: str, layout: tuple[str, int], shape: tuple, idx: tuple) -> np.ndarray:
    """Block `idx` (slices of our layout `shape`) of stored tensor `name`, reading only that block of it
    (safetensors' `get_slice`)."""
    kind, _ = layout
    r = [range(*s.indices(n)) for s, n in zip(idx, shape)]
    sl = [slice(x.start, x.stop) for x in r]
    src = handle.get_slice(name)
    if kind == "id":
        return np.asarray(src[tuple(sl)])
    if kind == "T":
        return np.ascontiguousarray(np.asarray(src[sl[1], sl[0]]).T)
    if kind == "split":  # [h*E] -> [h, E]; E (head_dim) is never split
        E = shape[1]
        return np.asarray(src[r[0].start * E:r[0].stop * E]).reshape(len(r[0]), E)[:, sl[1]]
    if kind == "T_split":  # [h*E, D] -> [D, h, E]
        E = shape[2]
        block = np.asarray(src[r[1].start * E:r[1].stop * E, sl[0]])  # [h_len*E, d_len]
        return np.ascontiguousarray(block.T.reshape(len(r[0]), len(r[1]), E)[:, :, sl[2]])
    if kind == "T_merge":  # [D, H*E] -> [H, E, D]
        E = shape[1]
        block = np.asarray(src[sl[2], r[0].start * E:r[0].stop * E])  # [d_len, h_len*E]
        return np.ascontiguousarray(block.T.reshape(len(r[0]), E, len(r[2]))[:, sl[1], :])
    raise ValueError(kind)


_REFETCH = "re-download the checkpoint or re-export it (e.g. with `save_pretrained`)"


def check_safetensors(fname: str) -> None:
    """Checks the framing of a safetensors file before it is opened: an 8-byte little-endian header length N,
    an N-byte JSON header whose `data_offsets` end at E, then exactly E bytes of data (8 + N + E in all).
    CheckpointError naming `fname` when the file is not a safetensors file (too short, a header length past the
    end of the file, a header that is not a JSON object) or is truncated / has trailing bytes."""
    if not os.path.exists(fname):
        raise CheckpointError(f"{fname}: file not found; {_REFETCH}")
    size = os.path.getsize(fname)
    with open(fname, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if 0 < n <= 100 * 2**20 and n > size - 8 and f.read(1) == b"{":  # cut inside the JSON header
            raise CheckpointError(f"{fname}: truncated: header says more than {8 + n} bytes, file has {size}; "
                                  f"{_REFETCH}")
        f.seek(8)
        if n <= 0 or n > min(size - 8, 100 * 2**20):
            raise CheckpointError(
                f"{fname}: not a safetensors file ({size} bytes; the first 8 bytes should give the length of a "
                f"JSON header inside the file, got {n if n >= 0 else 'a file too short'}); {_REFETCH}")
        try:
            header = json.loads(f.read(n))
            end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"], default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise CheckpointError(f"{fname}: not a safetensors file (its header is not a JSON object of tensors "
                                  f"with data_offsets); {_REFETCH}") from None
    want = 8 + n + end
    if size != want:
        what = "truncated" if size < want else "corrupted (trailing bytes)"
        raise CheckpointError(f"{fname}: {what}: header says {want} bytes, file has {size}; {_REFETCH}")


def _tensor_files(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file that holds it (each file's framing checked: `check_safetensors`)."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid safetensors index (JSON with a 'weight_map'); "
                                  f"{_REFETCH}") from None
        files = {k: os.path.join(path, v) for k, v in weight_map.items()}
        for fname in sorted(set(files.values())):
            if not os.path.exists(fname):
                raise CheckpointError(f"{fname}: shard listed in {index} is missing; download every shard the "
                                      "index lists (or re-export the checkpoint)")
            check_safetensors(fname)
        return files
    single = os.path.join(path, WEIGHTS_NAME)
    if not os.path.exists(single):
        raise CheckpointError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found "
                              "(PyTorch .bin checkpoints are not read; convert them to safetensors)")
    check_safetensors(single)
    with safe_open(single, framework="numpy") as f:
        return {k: single for k in f.keys()}


def check_checkpoint(path: str) -> None:
    """Cheap checks of a Hugging Face model directory before anything else is built: its config.json is one the
    decoder runs exactly, and every safetensors file is present and whole (headers only; nothing is loaded).
    CheckpointError / ConfigError naming the file."""
    load_hf_config(path)
    _tensor_files(path)


def _to_dtype(x: np.ndarray, dtype) -> np.ndarray:
    return x if x.dtype == np.dtype(dtype) else x.astype(np.dtype(dtype))


def is_sequence_classification(path: str) -> bool:
    """Whether `path/config.json` names a `*ForSequenceClassification` architecture (e.g. a TRL reward model)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            archs = json.load(f).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def load_pretrained(path: str, *, dtype=jnp.float32, compute_dtype=None, remat_policy: str = "none",
                    mesh=None, scan_layers: bool = False, attention: str = "xla") -> Transformer:
    """Loads a Hugging Face model directory into a `Transformer`.

    Args:
      path: directory with config.json and model.safetensors (or sharded *.safetensors + index).
      dtype: parameter dtype (weights are cast on the host as they are read).
      compute_dtype: activation dtype (default: `dtype`).
      remat_policy: 'none', 'full', 'dots', 'dots_with_no_batch_dims'.
      mesh: a `jax.sharding.Mesh`; each weight goes straight to its sharding under `align_jax.parallel.RULES`.
      scan_layers: run the layers as one `lax.scan` (`ModelConfig.scan_layers`).
      attention: "xla" | "dot_product" | "cudnn" (`ModelConfig.attention`).
    """
    config = load_hf_config(path, param_dtype=dtype, compute_dtype=compute_dtype, remat_policy=remat_policy,
                            scan_layers=scan_layers, attention=attention)
    return _load(path, config, mesh)[0]


def load_sequence_classification(path: str, *, dtype=jnp.float32, compute_dtype=None, remat_policy: str = "none",
                                 mesh=None) -> tuple[Transformer, np.ndarray]:
    """Loads a transformers `*ForSequenceClassification` directory with `num_labels=1` (`save_reward_model`'s
    output, or a TRL reward model): (backbone, score head [D] as a host array in the parameter dtype).

    The checkpoint has no LM head, so the backbone is built with `tie_word_embeddings=True` (its `lm_head_DxV`
    is the embedding, which a scalar head never reads). Arguments as `load_pretrained`. CheckpointError naming
    the file when there is no `score.weight` or it is not [1, hidden_size]."""
    config = load_hf_config(path, param_dtype=dtype, compute_dtype=compute_dtype, remat_policy=remat_policy)
    backbone, extra = _load(path, config.replace(tie_word_embeddings=True), mesh, extra=(SCORE_NAME,))
    head = extra[SCORE_NAME]
    if head.shape != (1, config.hidden_size):
        raise CheckpointError(
            f"{path}: {SCORE_NAME} has shape {tuple(head.shape)}, expected (1, {config.hidden_size}): a reward "
            "model is a sequence classifier with num_labels=1 (one score per sequence)")
    return backbone, _to_dtype(head[0], config.param_dtype)


def _load(path: str, config: ModelConfig, mesh, extra: tuple[str, ...] = ()) -> tuple[Transformer, dict]:
    """`load_pretrained` with `config`; also reads the tensors named in `extra` (host arrays, as stored)."""
    from align_jax.parallel import param_shardings

    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    shardings = param_shardings(abs_state, mesh) if mesh is not None else None
    flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    files = _tensor_files(path)
    key_map = hf_key_map(config)
    layouts = _layouts(config)
    expected = {v[0] for v in key_map.values()}
    ignored = {k for k in files if k not in expected and k not in extra and not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        ignored.discard("lm_head.weight")  # some exporters write the tied copy too
    if ignored:
        hint = (f" ({SCORE_NAME}: a sequence-classification checkpoint, e.g. a reward model; load it with "
                "`align_jax.rl.reward_model.load_reward_model`)" if SCORE_NAME in ignored else "")
        raise CheckpointError(f"{path}: tensors that this architecture does not use: {sorted(ignored)[:5]}"
                              f"{' ...' if len(ignored) > 5 else ''}{hint}")
    missing = [n for n in extra if n not in files]
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing from the checkpoint")
    handles: dict[str, object] = {}
    out = []
    try:
        for pth, var in nnx.to_flat_state(abs_state):
            sharding = flat_shardings.get(pth)
            sharding = getattr(sharding, "value", sharding)
            if pth == ("inv_freq",):
                host = rope_inv_freq(config)
            else:
                name, to_jax, _ = key_map[pth]
                if name not in files:
                    raise CheckpointError(f"{path}: tensor {name!r} is missing from the checkpoint")
                fname = files[name]
                if fname not in handles:
                    handles[fname] = safe_open(fname, framework="numpy")
                shape, dtype = var.get_value().shape, var.get_value().dtype
                stored = tuple(handles[fname].get_slice(name).get_shape())
                implied = _stored_shape(layouts[pth], shape)
                if stored != implied:
                    raise CheckpointError(f"{fname}: tensor {name!r} has shape {list(stored)} but config.json "
                                          f"implies {list(implied)}")
                if sharding is not None:
                    blocks = {}  # a block several local devices hold (replicated axes) is read once

                    def read(idx, f=handles[fname], n=name, lay=layouts[pth], s=shape, d=dtype, blocks=blocks):
                        key = tuple(sl.indices(k)[:2] for sl, k in zip(idx, s))
                        if key not in blocks:
                            blocks[key] = _to_dtype(_read_slice(f, n, lay, s, idx), d)
                        return blocks[key]

                    out.append((pth, var.replace(jax.make_array_from_callback(shape, sharding, read))))
                    continue
                host = _to_dtype(to_jax(handles[fname].get_tensor(name)), dtype)
            if sharding is not None:
                arr = jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])
            else:
                arr = jnp.asarray(host)
            out.append((pth, var.replace(arr)))
        extra_host = {}
        for name in extra:
            with safe_open(files[name], framework="numpy") as f:
                extra_host[name] = f.get_tensor(name)
    finally:
        handles.clear()
    return nnx.merge(graphdef, nnx.from_flat_state(out)), extra_host


def host_array(x) -> np.ndarray:
    """Gathers a (possibly sharded, possibly multi-host) array to host numpy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _hf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """HF tensor name -> host array (torch layout) of every parameter of `model`."""
    key_map = hf_key_map(model.config)
    tensors = {}
    for pth, var in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))):
        name, _, to_hf = key_map[pth]
        tensors[name] = np.ascontiguousarray(to_hf(host_array(var.get_value())))
    return tensors


def save_pretrained(model: Transformer, path: str, *, max_shard_bytes: int = 5 * 2**30,
                    extra_config: dict | None = None) -> None:
    """Writes `model` as a Hugging Face directory: config.json plus model.safetensors (or several shards of at
    most `max_shard_bytes` with model.safetensors.index.json). Only process 0 writes."""
    tensors = _hf_tensors(model)
    cfg = to_hf_config(model.config)
    if extra_config:
        cfg.update(extra_config)
    _write(path, cfg, tensors, max_shard_bytes)


def save_reward_model(model: ScalarHeadModel, path: str, *, pad_token_id: int,
                      max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes a reward model (`align_jax.models.heads.ScalarHeadModel`) as the transformers sequence classifier
    of its architecture (`LlamaForSequenceClassification`, `Qwen2ForSequenceClassification`, ...) with
    `num_labels=1`: config.json with that architecture, `num_labels`, `id2label` and `pad_token_id`; the backbone
    tensors under their `model.*` names, the head as `score.weight` [1, hidden_size], no `lm_head`.
    `AutoModelForSequenceClassification.from_pretrained(path)` then gives the same scores, and
    `align_jax.rl.reward_model.load_reward_model(path)` reads it back. Only process 0 writes.

    Pooling. align-jax reads the score at the last position whose attention mask is 1; transformers at the last
    token that is not `pad_token_id`. They agree on right-padded rows whose last real token is not
    `pad_token_id`. When `pad_token_id == eos_token_id` (a common fallback for tokenizers without a pad token)
    and rows end with EOS, as the reward-model trainer's rows do, transformers skips the trailing EOS and scores
    the token before it, which is not where the head was trained: export with a pad id distinct from EOS."""
    if pad_token_id is None:
        raise ValueError("save_reward_model needs pad_token_id (an int): transformers' sequence classifier finds "
                         "the last token of each row as the last one that is not pad_token_id")
    config = model.backbone.config
    if config.model_type not in SEQ_CLS_ARCHITECTURES:
        raise CheckpointError(f"model_type={config.model_type!r} has no known *ForSequenceClassification class")
    eos = (config.hf_config or {}).get("eos_token_id")
    if int(pad_token_id) in (eos if isinstance(eos, (list, tuple)) else [eos]):
        log.warning("%s: the tokenizer has no pad token of its own (pad_token_id=%d is its EOS), so transformers' "
                    "AutoModelForSequenceClassification will NOT reproduce this reward model's scores on sequences "
                    "ending with EOS: it scores the token before the trailing EOS, align-jax the EOS itself. "
                    "align-jax's loader (align_jax.rl.reward_model.load_reward_model) gives the trained scores; for "
                    "transformers, train with a tokenizer that has a distinct pad token", path, pad_token_id)
    tensors = _hf_tensors(model.backbone)
    tensors.pop("lm_head.weight", None)
    tensors[SCORE_NAME] = np.ascontiguousarray(host_array(model.score[...]).reshape(1, -1))
    cfg = to_hf_config(config)
    cfg.update(architectures=[SEQ_CLS_ARCHITECTURES[config.model_type]], num_labels=1, id2label={"0": "LABEL_0"},
               label2id={"LABEL_0": 0}, pad_token_id=int(pad_token_id))
    _write(path, cfg, tensors, max_shard_bytes)


def _write(path: str, cfg: dict, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    """config.json + safetensors (sharded past `max_shard_bytes`, with the index); stale weight files removed."""
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    shards, cur, size = [], {}, 0
    for name in sorted(tensors, key=_natural_key):
        nbytes = tensors[name].nbytes
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = tensors[name], size + nbytes
    shards.append(cur)
    for stale in [f for f in os.listdir(path) if f.endswith(".safetensors") or f == INDEX_NAME]:
        os.remove(os.path.join(path, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(path, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in name.replace(".", " . ").split()]
