"""LoRA adapters on the decoder's projections (Hu et al. 2021, eq. 3), with PEFT's conventions and key names.

For a target projection with frozen weight W (ours: inputs x outputs), the adapted output is

    h = x·W + (α / r) · (x·A)·B,        A: [in, r],  B: [r, out]                                   (Hu et al., eq. 3)

PEFT stores `lora_A.weight` = Aᵀ [r, in] and `lora_B.weight` = Bᵀ [out, r] (`nn.Linear` layout), scaling α / r
(`use_rslora=False`). Initialisation (`lora.init`): "default" = PEFT's `init_lora_weights=True`: A ~ kaiming-
uniform(a=√5) over fan_in = in, i.e. U(−1/√in, 1/√in), and B = 0, so the adapted model starts equal to the base
model exactly; "gaussian" = PEFT's "gaussian": A ~ N(0, 1/r), B = 0. (The random draws use JAX's generator, not
torch's: the same distribution, not the same numbers.)

Targets use PEFT's module names: q_proj, k_proj, v_proj, o_proj (attention), gate_proj, up_proj, down_proj (MLP).
Adapters are `nnx.LoRAParam`s (a kind of `nnx.Param`) added to the modules of every decoder in the trainable
module (`add_lora`); `trainable_filter()` selects them and the scalar heads (reward model `score`, PPO's value
head), so only those are differentiated and in the optimizer state. `adapters_off(module)` is a view of the same
weight arrays with the adapters switched off (nothing copied): the base model, used as the frozen reference of
DPO / GRPO / PPO, so no second copy of the model exists.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align_jax.errors import UserError
from align_jax.models.llama import LORA_IN_AXES as IN_AXES, MLP, Attention, Transformer

# PEFT module name -> (our module class name, our weight attribute)
TARGETS = {"q_proj": ("Attention", "q"), "k_proj": ("Attention", "k"), "v_proj": ("Attention", "v"),
           "o_proj": ("Attention", "o"), "gate_proj": ("MLP", "gate"), "up_proj": ("MLP", "up"),
           "down_proj": ("MLP", "down")}
INITS = ("default", "gaussian")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def enabled(config) -> bool:
    """`config.lora.rank > 0` (configs without a `lora` section: False)."""
    lora = config.get("lora") if config is not None else None
    return bool(lora is not None and lora.get("rank", 0))


def target_list(spec) -> list[str]:
    """`lora.target_modules` ("q_proj,v_proj" or a sequence) as a list of PEFT names."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    return list(dict.fromkeys(names))


def validate(lora) -> None:
    """One message per bad `config.lora` value (ConfigValueError names the key)."""
    from align_jax.errors import refuse

    if not isinstance(lora.rank, int) or lora.rank < 0:
        refuse("lora.rank", f"must be an integer >= 0 (0 = no LoRA), got {lora.rank!r}")
    if not lora.rank:
        return
    if not lora.alpha > 0:
        refuse("lora.alpha", f"must be > 0, got {lora.alpha!r}")
    if not isinstance(lora.dropout, (int, float)) or isinstance(lora.dropout, bool) or not 0 <= lora.dropout < 1:
        refuse("lora.dropout", f"{lora.dropout!r}: a probability in [0, 1) (PEFT's lora_dropout; 0 = none)")
    names = target_list(lora.target_modules)
    unknown = [n for n in names if n not in TARGETS]
    if not names or unknown:
        refuse("lora.target_modules", f"{lora.target_modules!r}: choose from {', '.join(TARGETS)} (comma-separated)")
    if lora.init not in INITS:
        refuse("lora.init", f"{lora.init!r}: choose one of {INITS}")
    if lora.dtype not in ("float32", "bfloat16"):
        refuse("lora.dtype", f"{lora.dtype!r}: float32 | bfloat16")
    if lora.init_from and not os.path.isfile(os.path.join(lora.init_from, ADAPTER_CONFIG)):
        refuse("lora.init_from", f"{lora.init_from!r}: no {ADAPTER_CONFIG} there (expected a PEFT adapter directory, "
               "e.g. a run's export_adapter/)")


def _modules(module):
    """(path, decoder submodule) of every Attention / MLP inside `module`."""
    return [(p, m) for p, m in nnx.iter_modules(module) if isinstance(m, (Attention, MLP))]


def _init_arrays(shape_a, shape_b, fan_in: int, r: int, init: str, key, dtype, sh_a, sh_b):
    def make(key):
        if init == "default":  # kaiming_uniform(a=sqrt(5)) over fan_in: bound = 1/sqrt(fan_in)
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(key, shape_a, jnp.float32, -bound, bound)
        else:  # "gaussian": N(0, 1/r)
            a = jax.random.normal(key, shape_a, jnp.float32) / r
        return a.astype(dtype), jnp.zeros(shape_b, dtype)

    return jax.jit(make, out_shardings=(sh_a, sh_b))(key)


def add_lora(module, lora, mesh=None, seed: int = 0) -> int:
    """Adds rank-`lora.rank` adapters (LoRAParam A, B; logical axes: A = the weight's input axes + None, B = None +
    its output axes) to every targeted projection of every decoder in `module`, created in their shardings.
    Returns the number of adapter parameters."""
    from jax.sharding import NamedSharding

    from align_jax.parallel.mesh import logical_to_spec

    r, names = lora.rank, target_list(lora.target_modules)
    dtype = jnp.dtype(lora.dtype)
    wanted = {TARGETS[n] for n in names}
    total, i = 0, 0
    for _, m in _modules(module):
        kind = type(m).__name__
        m.lora_on = True
        m.lora_scale = float(lora.alpha) / r
        for _, w in sorted(t for t in wanted if t[0] == kind):
            base = getattr(m, w)
            axes = base.get_metadata().get("logical_axes") or (None,) * base.ndim
            k = IN_AXES[w]
            shape_a, shape_b = tuple(base.shape[:k]) + (r,), (r,) + tuple(base.shape[k:])
            axes_a, axes_b = tuple(axes[:k]) + (None,), (None,) + tuple(axes[k:])
            if mesh is None:
                sh_a = sh_b = None
            else:
                sh_a = NamedSharding(mesh, logical_to_spec(axes_a, shape_a, mesh))
                sh_b = NamedSharding(mesh, logical_to_spec(axes_b, shape_b, mesh))
            key = jax.random.fold_in(jax.random.key(seed), i)
            a, b = _init_arrays(shape_a, shape_b, int(np.prod(shape_a[:-1])), r, lora.init, key, dtype, sh_a, sh_b)
            setattr(m, f"lora_{w}_a", nnx.LoRAParam(a, logical_axes=axes_a))
            setattr(m, f"lora_{w}_b", nnx.LoRAParam(b, logical_axes=axes_b))
            total += a.size + b.size
            i += 1
    if lora.init_from:
        load_peft_adapter(module, lora.init_from)
    return total


def trainable_filter():
    """What a LoRA run differentiates and optimizes: the adapters and the scalar heads (a reward model's `score`,
    PPO's `value_head`); every other Param is frozen."""
    return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, nnx.PathContains("score")),
                   nnx.All(nnx.Param, nnx.PathContains("value_head")))


def base_filter():
    """The base model's own parameters (everything but the adapters)."""
    return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def adapters_off(module):
    """A view of `module` (the same weight arrays, nothing copied) with every adapter switched off: the base model."""
    graphdef, state = nnx.split(module)
    view = nnx.merge(graphdef, state)
    for _, m in _modules(view):
        m.lora_on = False
    return view


def has_adapters(module) -> bool:
    return any(getattr(m, "lora_on", None) is not None for _, m in _modules(module))


def merged_copy(module):
    """A copy of `module` with W ← W + (α/r)·A·B (in fp32, cast back to W's dtype) and the adapters switched off:
    the plain model the adapters define (what `export` writes as a Hugging Face directory)."""
    from align_jax.models.build import copy_module

    out = copy_module(module)
    for _, m in _modules(out):
        if not getattr(m, "lora_on", False):
            continue
        for w in IN_AXES:
            a = getattr(m, f"lora_{w}_a", None)
            if a is None:
                continue
            base = getattr(m, w)
            b = getattr(m, f"lora_{w}_b")[...].astype(jnp.float32)
            d = m.lora_scale * jnp.tensordot(a[...].astype(jnp.float32), b, axes=1)
            base[...] = (base[...].astype(jnp.float32) + d).astype(base.dtype)
        m.lora_on = False
    return out


# --------------------------------------------------------------------------------------------- PEFT format


def _peft_modules(model):
    """(PEFT module prefix, module, our weight, PEFT target name) of every adapter of a `Transformer`."""
    inv = {v: k for k, v in TARGETS.items()}
    out = []
    for i, block in enumerate(model.layers):
        for mod, sub, kind in ((block.attn, "self_attn", "Attention"), (block.mlp, "mlp", "MLP")):
            for w in IN_AXES:
                if getattr(mod, f"lora_{w}_a", None) is not None:
                    name = inv[(kind, w)]
                    out.append((f"base_model.model.model.layers.{i}.{sub}.{name}", mod, w, name))
    return out


def save_peft_adapter(model, path: str, lora, *, base_model_name_or_path: str = "") -> None:
    """Writes the adapters of a policy (`Transformer`) as a PEFT directory: adapter_config.json and
    adapter_model.safetensors with PEFT's key names (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.
    weight` [r, in], `...lora_B.weight` [out, r]), which `peft.PeftModel.from_pretrained(base, path)` loads onto
    the transformers base model. Only process 0 writes."""
    from safetensors.numpy import save_file

    from align_jax.models.checkpoint import host_array

    tensors, targets = {}, set()
    for prefix, mod, w, name in _peft_modules(model):
        a = host_array(getattr(mod, f"lora_{w}_a")[...])
        b = host_array(getattr(mod, f"lora_{w}_b")[...])
        r = a.shape[-1]
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
        targets.add(name)
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(lora.rank), "lora_alpha": float(lora.alpha),
           "lora_dropout": float(lora.dropout), "target_modules": sorted(targets), "bias": "none",
           "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
           "init_lora_weights": True if lora.init == "default" else lora.init, "inference_mode": True,
           "base_model_name_or_path": base_model_name_or_path or None, "layers_to_transform": None,
           "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None}
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS + ".tmp"), metadata={"format": "pt"})
    os.replace(os.path.join(path, ADAPTER_WEIGHTS + ".tmp"), os.path.join(path, ADAPTER_WEIGHTS))
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(cfg, f, indent=2)


def read_peft_config(path: str) -> dict:
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        return json.load(f)


def load_peft_adapter(module, path: str) -> None:
    """Fills the adapters of every decoder in `module` (created by `add_lora` with the same rank and targets)
    from a PEFT directory (ours or peft's `save_pretrained`), keeping each adapter's sharding; a rank, target or
    shape that differs is one message naming the file and key."""
    from safetensors.numpy import load_file

    cfg = read_peft_config(path)
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("use_rslora"):
        raise UserError(f"{path}/{ADAPTER_CONFIG}: only plain LoRA adapters (peft_type LORA, no DoRA / rsLoRA) load")
    tensors = load_file(os.path.join(path, ADAPTER_WEIGHTS))
    decoders = [m for _, m in nnx.iter_modules(module) if isinstance(m, Transformer)]
    if len(decoders) != 1:
        raise UserError(f"lora.init_from={path!r}: loading a PEFT adapter needs exactly one decoder in the trained "
                        f"module, found {len(decoders)}")
    seen = set()
    for prefix, mod, w, _ in _peft_modules(decoders[0]):
        for part, attr in (("lora_A", f"lora_{w}_a"), ("lora_B", f"lora_{w}_b")):
            key = f"{prefix}.{part}.weight"
            var = getattr(mod, attr)
            if key not in tensors:
                raise UserError(f"{path}/{ADAPTER_WEIGHTS}: no tensor {key!r}; the adapter's target_modules "
                                f"{cfg.get('target_modules')} / rank {cfg.get('r')} must match config.lora")
            t = tensors[key]
            r = var.shape[-1] if part == "lora_A" else var.shape[0]
            want = (r, int(np.prod(var.shape[:-1]))) if part == "lora_A" else (int(np.prod(var.shape[1:])), r)
            if t.shape != want:
                raise UserError(f"{path}/{ADAPTER_WEIGHTS}: {key} has shape {t.shape}, this model needs {want} "
                                f"(set lora.rank={cfg.get('r')} and the same model)")
            value = t.T.reshape(var.shape) if part == "lora_A" else t.T.reshape(var.shape)
            sh = getattr(var[...], "sharding", None)
            arr = jnp.asarray(value, var.dtype)
            var[...] = jax.device_put(arr, sh) if sh is not None else arr
            seen.add(key)
    extra = sorted(k for k in tensors if k not in seen and ".lora_" in k)
    if extra:
        raise UserError(f"{path}/{ADAPTER_WEIGHTS}: adapters {extra[:3]}... are not in config.lora.target_modules "
                        f"{cfg.get('target_modules')}: set lora.target_modules to the adapter's")
    scale = float(cfg["lora_alpha"]) / int(cfg["r"])
    for _, m in _modules(decoders[0]):
        if getattr(m, "lora_on", None) is not None and abs(m.lora_scale - scale) > 1e-12:
            raise UserError(f"{path}/{ADAPTER_CONFIG}: lora_alpha / r = {scale:g} but config.lora gives "
                            f"{m.lora_scale:g}: set lora.alpha={cfg['lora_alpha']} and lora.rank={cfg['r']}")
