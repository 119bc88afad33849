"""LoRA (align_jax.models.lora): zero adapters = the base model exactly; the update is (α/r)·x·A·B on each target;
only adapters (and heads) are trained and checkpointed; the base weights never change; the implicit reference
(the policy's own weights with the adapters off) gives the same DPO metrics as a separately held base copy; kill -9
resume is bit-identical; the merged export equals the adapted model; the PEFT directory round-trips and continues
training; bad `config.lora` values are refused naming the key."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from util import final_params, load_config, train_and_kill
from align_jax.models import lora
from align_jax.models.config import from_hf_config
from align_jax.models.llama import Transformer
from align_jax.train import train
from align_jax.train.validate import ConfigValueError

ALL = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _lora_cfg(rank=4, alpha=8.0, targets=ALL, init="default"):
    return ml_collections.ConfigDict({"rank": rank, "alpha": alpha, "dropout": 0.0, "target_modules": targets,
                                      "init": init, "dtype": "float32", "init_from": ""})


def _toy_model(seed=0):
    from align_jax.data.toy import toy_model_config

    return Transformer(from_hf_config(toy_model_config()), rngs=nnx.Rngs(seed))


def _ids():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.integers(3, 100, (2, 11)), jnp.int32), jnp.ones((2, 11), jnp.int32)


def _randomize_b(model, seed=1):
    """Non-zero B everywhere (after init B = 0 and the adapters do nothing)."""
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))):
        if path[-1].endswith("_b"):
            var[...] = 0.05 * jax.random.normal(jax.random.key(seed + i), var.shape)


def test_zero_adapters_are_the_base_model_and_the_update_is_scaled_xab():
    model = _toy_model()
    ids, mask = _ids()
    base = np.asarray(model(ids, mask))
    n = lora.add_lora(model, _lora_cfg(), seed=3)
    c = model.config
    D, F, H, K, E, L, r = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                           c.head_dim, c.num_hidden_layers, 4)
    # adapter parameters: r·(in + out) per target and layer
    assert n == L * r * ((D + H * E) + 2 * (D + K * E) + (H * E + D) + 2 * (D + F) + (F + D))
    np.testing.assert_array_equal(np.asarray(model(ids, mask)), base)  # B = 0: exactly the base model
    a = np.asarray(model.layers[0].attn.lora_q_a[...])  # PEFT's default init: U(-1/sqrt(in), 1/sqrt(in))
    assert a.shape == (D, r) and np.abs(a).max() <= 1 / np.sqrt(D) and np.abs(a).max() > 0.5 / np.sqrt(D)
    _randomize_b(model)
    adapted = np.asarray(model(ids, mask))
    assert np.abs(adapted - base).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(lora.adapters_off(model)(ids, mask)), base)  # the view = the base
    # the o projection's update by hand: (alpha / r) * (out [B,T,H,E] . A [H,E,r]) . B [r,D]
    attn = model.layers[0].attn
    x = jax.random.normal(jax.random.key(0), (2, 3, H, E))
    want = np.einsum("bthe,hed->btd", x, attn.o[...]) + 2.0 * np.einsum(
        "bthe,her,rd->btd", x, attn.lora_o_a[...], attn.lora_o_b[...])
    from align_jax.models.llama import _adapted

    got = _adapted(attn, "o", x, jnp.einsum("bthe,hed->btd", x, attn.o[...]))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_merged_copy_equals_the_adapted_model_and_peft_files_round_trip(tmp_path):
    model = _toy_model()
    lora.add_lora(model, _lora_cfg(targets="q_proj,o_proj,down_proj", init="gaussian"), seed=1)
    _randomize_b(model)
    ids, mask = _ids()
    adapted = np.asarray(model(ids, mask))
    merged = lora.merged_copy(model)
    np.testing.assert_allclose(np.asarray(merged(ids, mask)), adapted, rtol=1e-5, atol=1e-5)
    assert not lora.has_adapters(merged) or not merged.layers[0].attn.lora_on
    lora.save_peft_adapter(model, str(tmp_path / "adapter"), _lora_cfg(targets="q_proj,o_proj,down_proj",
                                                                      init="gaussian"))
    cfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (4, 8.0, ["down_proj", "o_proj", "q_proj"])
    from safetensors.numpy import load_file

    t = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    c = model.config
    assert t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, c.hidden_size)
    assert t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (
        c.num_attention_heads * c.head_dim, 4)
    assert t["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, c.intermediate_size)
    assert len(t) == 2 * 3 * c.num_hidden_layers
    fresh = _toy_model()
    lora.add_lora(fresh, _lora_cfg(targets="q_proj,o_proj,down_proj", init="gaussian"), seed=9)
    lora.load_peft_adapter(fresh, str(tmp_path / "adapter"))
    np.testing.assert_array_equal(np.asarray(fresh(ids, mask)), adapted)
    wrong = _toy_model()
    lora.add_lora(wrong, _lora_cfg(rank=2, targets="q_proj,o_proj,down_proj"), seed=9)
    with pytest.raises(Exception, match="lora.rank=4"):
        lora.load_peft_adapter(wrong, str(tmp_path / "adapter"))


def test_dropout_masks_the_adapter_input_inside_the_train_scope_only():
    """PEFT's lora_dropout: inside `lora_dropout(key, p)` each adapter sees x·mask/(1 − p); the same key gives the
    same masks, another key others; scanned layers draw the masks of the unrolled ones (same layer indices);
    outside the scope, and with the adapters off, nothing changes; B = 0 (a fresh adapter): the output is the
    base model's either way, but B's gradient differs."""
    from align_jax.models.llama import _dropped, lora_dropout

    x = jnp.ones((64, 128))
    with lora_dropout(jax.random.key(0), 0.25):
        d = np.asarray(_dropped(x, "q"))
        assert set(np.unique(d).tolist()) == {0.0, float(np.float32(1) / np.float32(0.75))}  # dropped, or x/(1 − p)
        assert abs((d == 0).mean() - 0.25) < 0.02
        np.testing.assert_array_equal(np.asarray(_dropped(x, "q")), d)
        assert (np.asarray(_dropped(x, "k")) != d).any()  # another weight: another mask
    np.testing.assert_array_equal(np.asarray(_dropped(x, "q")), np.asarray(x))  # outside the scope

    model = _toy_model()
    ids, mask = _ids()
    base = np.asarray(model(ids, mask))
    lora.add_lora(model, _lora_cfg(), seed=3)

    def loss_and_grad(m, key, rate):
        graphdef, adapters, rest = nnx.split(m, nnx.LoRAParam, ...)

        def f(a):
            with lora_dropout(key, rate):
                return jnp.sum(jnp.sin(nnx.merge(graphdef, a, rest)(ids, mask)))

        return jax.value_and_grad(f)(adapters)

    (l0, g0), (l1, g1) = (loss_and_grad(model, jax.random.key(1), r) for r in (0.0, 0.5))
    assert float(l0) == float(l1)  # B = 0: the adapters add nothing, dropped or not
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    _randomize_b(model)
    with lora_dropout(jax.random.key(1), 0.5):
        a = np.asarray(model(ids, mask))
        np.testing.assert_array_equal(np.asarray(model(ids, mask)), a)
        np.testing.assert_array_equal(np.asarray(lora.adapters_off(model)(ids, mask)), base)
    with lora_dropout(jax.random.key(2), 0.5):
        assert np.abs(np.asarray(model(ids, mask)) - a).max() > 1e-4
    assert np.abs(np.asarray(model(ids, mask)) - a).max() > 1e-4  # no dropout outside the scope
    scanned = _toy_model()
    scanned.config = scanned.config.replace(scan_layers=True)
    lora.add_lora(scanned, _lora_cfg(), seed=3)
    nnx.update(scanned, nnx.state(model))
    with lora_dropout(jax.random.key(1), 0.5):
        np.testing.assert_allclose(np.asarray(scanned(ids, mask)), a, rtol=1e-5, atol=1e-5)


def _dpo(**kw):
    """LoRA DPO with adapter dropout 0.1 (so the kill -9 resume below covers the per-step dropout masks)."""
    return load_config("dpo", **{"lora.rank": 4, "lora.alpha": 8.0, "lora.dropout": 0.1, "data.eval": "",
                                 "data.length_buckets": (64,), "total_steps": 4, "checkpoint.every_steps": 2,
                                 "optimizer.schedule": "constant",  # total_steps not in the step: shared compiles
                                 "reference.precompute": False, "optimizer.learning_rate": 1e-3, **kw})


def _steps(wd):
    return {m["step"]: m for m in map(json.loads, open(os.path.join(wd, "metrics.jsonl"))) if "loss" in m}


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("lora_dpo"))
    train(_dpo(), wd)
    return wd


def test_only_adapters_are_trained_checkpointed_and_the_base_is_untouched(dpo_run):
    from align_jax.models import load_pretrained

    c = load_pretrained(os.path.join(dpo_run, "export")).config
    leaves = final_params(dpo_run, 4)  # the checkpoint's params: the adapters only
    assert len(leaves) == 2 * 7 * c.num_hidden_layers
    assert sum(x.size for x in leaves) < 0.1 * 0.86e6
    # the base weights: rebuilt as the run built them (toy init, seed 0, its mesh); the export is merged:
    # W + (α/r)·A·B with the saved adapter
    from align_jax.models.build import build_policy
    from align_jax.parallel import make_mesh

    cfg = _dpo()
    base = build_policy(cfg, make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    merged = load_pretrained(os.path.join(dpo_run, "export"))
    np.testing.assert_array_equal(np.asarray(merged.embed[...]), np.asarray(base.embed[...]))
    np.testing.assert_array_equal(np.asarray(merged.layers[1].input_norm.weight[...]),
                                  np.asarray(base.layers[1].input_norm.weight[...]))
    from safetensors.numpy import load_file

    t = load_file(os.path.join(dpo_run, "export_adapter", "adapter_model.safetensors"))
    p = "base_model.model.model.layers.1.mlp.up_proj."
    delta = (t[p + "lora_A.weight"].T @ t[p + "lora_B.weight"].T) * (8.0 / 4)
    assert np.abs(delta).max() > 1e-5  # trained
    np.testing.assert_allclose(np.asarray(merged.layers[1].mlp.up[...]),
                               np.asarray(base.layers[1].mlp.up[...]) + delta, rtol=1e-5, atol=1e-6)


def test_implicit_reference_equals_a_separately_held_base_copy(dpo_run, tmp_path, monkeypatch):
    from align_jax.models.build import copy_module
    from align_jax.train import loop

    def copied_reference(config, model, algorithm):  # a second full copy of the weights, adapters off
        ref = lora.adapters_off(copy_module(loop.policy_of(model)))
        ref.config = ref.config.replace(remat_policy="none")
        return ref

    monkeypatch.setattr(loop, "build_reference", copied_reference)
    wd = str(tmp_path / "copy")
    train(_dpo(), wd)
    a, b = _steps(dpo_run), _steps(wd)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert abs(a[4]["rewards/margins"]) > 1e-4  # the policy moved away from the reference
    for s in a:
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "grad_norm"):
            assert abs(a[s][k] - b[s][k]) <= 1e-5 * max(1.0, abs(a[s][k])), (s, k, a[s][k], b[s][k])


def test_lora_resume_after_kill9_is_bit_identical(dpo_run, tmp_path):
    killed = str(tmp_path / "killed")
    train_and_kill("from test_lora import _dpo", "_dpo()", killed)
    train(_dpo(), killed)
    a, b = _steps(dpo_run), _steps(killed)
    for s in (3, 4):
        for k in ("loss", "rewards/margins", "grad_norm"):
            assert a[s][k] == b[s][k], (s, k)
    for x, y in zip(final_params(dpo_run, 4), final_params(killed, 4)):
        np.testing.assert_array_equal(x, y)


def test_continue_from_the_peft_adapter(dpo_run, tmp_path):
    """lora.init_from = the run's export_adapter: the new run starts from the trained adapters (its first-step
    policy log-probs are the trained policy's, not the base model's)."""
    wd = str(tmp_path / "cont")
    train(_dpo(**{"lora.init_from": os.path.join(dpo_run, "export_adapter"), "total_steps": 1}), wd)
    first = _steps(wd)[1]
    fresh = _steps(dpo_run)[1]
    assert abs(first["rewards/margins"]) > 1e-4  # already away from the reference (the base model) at step 1
    assert abs(fresh["rewards/margins"]) < 1e-7  # the fresh run starts at the base model


def test_grpo_with_lora_trains_and_its_reference_is_the_base(tmp_path):
    wd = str(tmp_path / "grpo")
    c = load_config("grpo", **{"lora.rank": 4, "lora.alpha": 8.0, "total_steps": 2, "optimizer.learning_rate": 3e-3,
                                "loss.kwargs.beta": 0.04, "export": False})
    train(c, wd)
    s = _steps(wd)
    assert sorted(s) == [1, 2]
    assert s[1]["kl"] == 0.0  # at step 1 the policy is the base model (B = 0): KL to the reference exactly 0
    assert s[2]["kl"] > 0.0
    from align_jax.data.toy import toy_model_config

    assert len(final_params(wd, 2)) == 2 * 7 * toy_model_config()["num_hidden_layers"]  # adapters only


@pytest.mark.parametrize("override,key", [({"lora.rank": -1}, "lora.rank"), ({"lora.target_modules": "qproj"},
                                                                               "lora.target_modules"),
                                          ({"lora.dropout": 1.0}, "lora.dropout"), ({"lora.init": "pissa"}, "lora.init"),
                                          ({"lora.init_from": "/nonexistent"}, "lora.init_from")])
def test_bad_lora_config_is_refused_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigValueError, match=key.replace(".", r"\.")):
        train(_dpo(**override), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_peft_loads_the_exported_adapter_with_the_same_logits(dpo_run, tmp_path):
    """transformers + peft (not in the suite's requirements: skipped without torch / peft) load the base model and
    the run's export_adapter and give the adapted model's logits; the merged export gives them too."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align_jax.models import load_pretrained, save_pretrained
    from align_jax.models.build import build_policy
    from align_jax.parallel import make_mesh

    cfg = _dpo()
    base = build_policy(cfg, make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    save_pretrained(base, str(tmp_path / "base"))
    ids, mask = _ids()
    ours = np.asarray(load_pretrained(os.path.join(dpo_run, "export"))(ids, mask))  # merged = adapted
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(hf, os.path.join(dpo_run, "export_adapter")).eval()
    with torch.no_grad():
        got = peft_model(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()
        plain = hf.get_base_model()(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.numpy() \
            if hasattr(hf, "get_base_model") else None
    assert np.abs(got - ours).max() < 1e-4
    base_logits = np.asarray(base(ids, mask))
    assert np.abs(ours - base_logits).max() > 1e-3  # the adapters matter: the comparison above is not vacuous
    del plain
