"""Model parity with transformers (fixtures from tests/fixtures/make_fixtures.py), checkpoint round trips,
config refusal, and sharded forward passes on an 8-device CPU mesh."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from align_jax.models import (CheckpointError, ConfigError, from_hf_config, init_model, load_hf_config,
                              load_pretrained, save_pretrained)
from align_jax.parallel import make_mesh

HF = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
MODELS = ["llama", "llama3_rope", "llama_linear_rope", "qwen2", "qwen3", "tied", "sharded", "mistral"]


def _real(mask):
    return mask.astype(bool)


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers(name):
    d = os.path.join(HF, name)
    model = load_pretrained(d)
    inputs, expected = np.load(os.path.join(d, "inputs.npz")), np.load(os.path.join(d, "expected.npz"))
    fwd = nnx.jit(lambda m, i, a, p: m(i, attention_mask=a, positions=p))
    worst = 0.0
    for case in ("nopad", "right", "left"):
        ids, mask = jnp.asarray(inputs[f"input_ids_{case}"]), inputs[f"attention_mask_{case}"]
        got = np.asarray(fwd(model, ids, jnp.asarray(mask), jnp.asarray(inputs[f"position_ids_{case}"])))
        err = np.abs(got - expected[f"logits_{case}"])[_real(mask)].max()
        worst = max(worst, err)
        assert err < 1e-4, (name, case, err)
    print(f"{name}: max |logits - transformers| = {worst:.2e}")
    # Default positions (cumsum of the mask) equal the explicit ones for left and right padding.
    ids, mask = jnp.asarray(inputs["input_ids_left"]), inputs["attention_mask_left"]
    left = np.asarray(nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, ids, jnp.asarray(mask)))
    assert np.abs(left - expected["logits_left"])[_real(mask)].max() < 1e-4
    hidden = np.asarray(nnx.jit(lambda m, i: m(i, return_hidden=True))(model, jnp.asarray(inputs["input_ids_nopad"])))
    assert np.abs(hidden - expected["hidden_nopad"]).max() < 1e-4


def test_llama3_rope_scaling_changes_frequencies():
    from align_jax.models.config import rope_inv_freq

    c = load_hf_config(os.path.join(HF, "llama3_rope"))
    assert c.rope_scaling["rope_type"] == "llama3"
    scaled, plain = rope_inv_freq(c), rope_inv_freq(c.replace(rope_scaling=None))
    assert not np.allclose(scaled, plain)
    # Highest frequency is untouched, the lowest is divided by `factor` (Llama 3.1 recipe).
    np.testing.assert_allclose(scaled[0], plain[0])
    np.testing.assert_allclose(scaled[-1], plain[-1] / c.rope_scaling["factor"], rtol=1e-6)


def test_save_load_roundtrip_bit_exact(tmp_path):
    for name in ("qwen3", "tied", "sharded"):
        src = os.path.join(HF, name)
        a = load_pretrained(src)
        out = str(tmp_path / name)
        save_pretrained(a, out, max_shard_bytes=40_000 if name == "sharded" else 5 * 2**30)
        b = load_pretrained(out)
        for (pa, va), (pb, vb) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))):
            assert pa == pb
            np.testing.assert_array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()))
        if name == "sharded":
            assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
        if name == "tied":  # transformers omits the tied lm_head; so do we
            from safetensors import safe_open
            with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
                assert "lm_head.weight" not in f.keys()
        cfg = json.load(open(os.path.join(out, "config.json")))
        assert cfg["model_type"] == json.load(open(os.path.join(src, "config.json")))["model_type"]


def test_bf16_params_and_compute():
    d = os.path.join(HF, "llama")
    model = load_pretrained(d, dtype=jnp.bfloat16)
    assert model.embed[...].dtype == jnp.bfloat16
    inputs, expected = np.load(os.path.join(d, "inputs.npz")), np.load(os.path.join(d, "expected.npz"))
    got = np.asarray(nnx.jit(lambda m, i: m(i))(model, jnp.asarray(inputs["input_ids_nopad"])))
    assert got.dtype == np.float32
    # bf16 is close but not exact; the fp32 path above is the exactness check.
    assert np.abs(got - expected["logits_nopad"]).max() < 0.1
    mixed = load_pretrained(d, dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    assert mixed.embed[...].dtype == jnp.float32


@pytest.mark.parametrize("bad,msg", [
    ({"sliding_window": 16}, "sliding_window"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "gpt2"}, "model_type"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_config_refusals_name_the_key(bad, msg):
    cfg = dict(model_type="mistral", vocab_size=64, hidden_size=32, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    cfg.update(bad)
    with pytest.raises(ConfigError, match=msg):
        from_hf_config(cfg)


def test_refusal_names_the_file(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(os.path.join(HF, "llama"), d)
    cfg = json.load(open(d / "config.json"))
    cfg["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    cfg.pop("rope_parameters", None)
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(ConfigError, match=r"config\.json.*dynamic"):
        load_pretrained(str(d))


def test_packed_segments_do_not_attend_across_examples():
    c = from_hf_config(dict(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    m = init_model(c, seed=1)
    a, b = np.arange(1, 6), np.arange(10, 14)
    packed = jnp.asarray(np.concatenate([a, b, [0, 0, 0]])[None], jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3], jnp.int32)
    fwd = nnx.jit(lambda m, i, s: m(i, segment_ids=s))
    out = np.asarray(fwd(m, packed, seg))
    alone_a = np.asarray(fwd(m, jnp.asarray(a[None], jnp.int32), jnp.ones((1, 5), jnp.int32)))
    alone_b = np.asarray(fwd(m, jnp.asarray(b[None], jnp.int32), jnp.ones((1, 4), jnp.int32)))
    np.testing.assert_allclose(out[0, :5], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:9], alone_b[0], atol=1e-5)


def test_remat_policies_and_scanned_layers_same_values_and_grads():
    """Every remat policy, with the layers unrolled or as one lax.scan, gives the same loss and gradients."""
    c = from_hf_config(dict(model_type="qwen3", vocab_size=40, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 7)), jnp.int32)

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(ids)) ** 2)

    ref = None
    for policy, scan in [("none", False), ("full", False), ("dots", False), ("none", True), ("full", True),
                         ("dots", True)]:
        m = init_model(c.replace(remat_policy=policy, scan_layers=scan), seed=3)
        v, g = nnx.jit(nnx.value_and_grad(loss))(m)
        flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(nnx.state(g, nnx.Param))])
        if ref is None:
            ref = (v, flat)
        else:
            np.testing.assert_allclose(v, ref[0], rtol=1e-6)
            np.testing.assert_allclose(flat, ref[1], atol=1e-6)


def test_dot_product_attention_equals_einsum_path():
    """config.model.attention='dot_product' (jax.nn.dot_product_attention, the function whose cuDNN kernel is
    'cudnn' on GPU) gives the einsum path's logits on every real token and the same gradients, with padding
    (one row all real, one right-padded) and packed segments (one row with a trailing pad segment), in fp32 and
    with bf16 activations; a cache-less 'cudnn' on a machine without a GPU is refused by name."""
    base = dict(model_type="qwen2", vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 50, (2, 12)), jnp.int32)
    mask = jnp.asarray([[1] * 12, [1] * 7 + [0] * 5], jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 3 + [2] * 6 + [0] * 3], jnp.int32)
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 2e-2)):
        out = {}
        for impl in ("xla", "dot_product"):
            m = init_model(from_hf_config(base, compute_dtype=dtype, attention=impl), seed=2)
            assert m.config.attention == impl

            def loss(m, kw, real):
                return jnp.sum(jnp.where(real[..., None], jax.nn.log_softmax(m(ids, **kw)), 0.0) ** 2)

            out[impl] = []
            for kw, real in ((dict(attention_mask=mask), mask != 0), (dict(segment_ids=seg), seg != 0)):
                logits = nnx.jit(lambda m, kw=kw: m(ids, **kw))(m)
                _, g = nnx.jit(nnx.value_and_grad(lambda m, kw=kw, real=real: loss(m, kw, real)))(m)
                flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(nnx.state(g, nnx.Param))])
                out[impl].append((np.where(np.asarray(real)[..., None], np.asarray(logits), 0.0), flat))
        for (la, ga), (lb, gb) in zip(out["xla"], out["dot_product"]):
            assert np.abs(la).max() > 0.1
            np.testing.assert_allclose(lb, la, atol=tol)
            np.testing.assert_allclose(gb, ga, atol=tol * max(1.0, float(np.abs(ga).max())))
    with pytest.raises(ConfigError, match="attention"):
        from_hf_config(base, attention="flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(ConfigError, match="needs a GPU"):
            from_hf_config(base, attention="cudnn")


@pytest.mark.parametrize("shape,scan", [((8, 1, 1), False), ((1, 8, 1), False), ((1, 4, 2), False),
                                        ((2, 2, 2), False), ((1, 4, 2), True)],
                         ids=["dp", "fsdp", "fsdp+tp", "dp+fsdp+tp", "fsdp+tp-scan"])
def test_sharded_forward_equals_single_device(shape, scan):
    d = os.path.join(HF, "qwen2")
    inputs = np.load(os.path.join(d, "inputs.npz"))
    ids = np.tile(inputs["input_ids_left"], (3, 1))[:8]
    mask = np.tile(inputs["attention_mask_left"], (3, 1))[:8]
    fwd = nnx.jit(lambda m, i, a: m(i, attention_mask=a))
    ref = np.asarray(fwd(load_pretrained(d), jnp.asarray(ids), jnp.asarray(mask)))
    mesh = make_mesh(*shape)
    model = load_pretrained(d, mesh=mesh, scan_layers=scan)
    assert model.config.scan_layers == scan
    q = model.layers[0].attn.q[...]
    if shape[1] > 1:  # FSDP: the embed axis is split, so no device holds the whole matrix
        assert q.addressable_shards[0].data.shape[0] == q.shape[0] // shape[1]
    if shape[2] > 1:
        assert q.addressable_shards[0].data.shape[1] == q.shape[1] // shape[2]
    from jax.sharding import NamedSharding, PartitionSpec as P
    bs = NamedSharding(mesh, P(("data", "fsdp")))
    got = np.asarray(fwd(model, jax.device_put(ids, bs), jax.device_put(mask, bs)))
    assert np.abs(got - ref).max() < 1e-5


def test_sharded_init_never_unsharded():
    c = from_hf_config(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    mesh = make_mesh(1, 4, 2)
    m = init_model(c, seed=0, mesh=mesh)
    assert m.embed[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert m.layers[0].mlp.down[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    single = init_model(c, seed=0)
    np.testing.assert_allclose(np.asarray(m.embed[...]), np.asarray(single.embed[...]), rtol=1e-6)


def test_export_loads_in_transformers(tmp_path):
    """Our save_pretrained output is read by transformers' own loader and gives our logits (needs torch,
    which the suite does not install: this one comparison is skipped without it)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    src = os.path.join(HF, "qwen3")
    ours = load_pretrained(src)
    save_pretrained(ours, str(tmp_path / "out"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
    ids = np.load(os.path.join(src, "inputs.npz"))["input_ids_nopad"]
    with torch.no_grad():
        want = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    got = np.asarray(nnx.jit(lambda m, i: m(i))(ours, jnp.asarray(ids)))
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("name", ["llama3_rope", "llama_linear_rope"])
def test_rope_scaled_config_is_hashable_and_saved_unchanged(name, tmp_path):
    """The config is part of the NNX graph definition, a static (hashed) jit argument: rope_scaling is stored
    hashable, still reads as a dict, and save_pretrained writes the original config.json back."""
    src = os.path.join(HF, name)
    c = load_hf_config(src)
    assert hash(c) == hash(load_hf_config(src)) and c == load_hf_config(src)
    assert c.rope_scaling["rope_type"] == name.split("_")[-2] and dict(c.rope_scaling)["factor"] > 1
    assert c.replace(rope_scaling={**c.rope_scaling}) == c  # a plain dict is converted, compares equal
    assert hash(c.replace(rope_scaling={**c.rope_scaling, "factor": 2.0})) != hash(c)
    jax.jit(lambda x, cfg: x * cfg.rope_scaling["factor"], static_argnums=1)(1.0, c)
    save_pretrained(load_pretrained(src), str(tmp_path))
    assert json.load(open(tmp_path / "config.json")) == json.load(open(os.path.join(src, "config.json")))
    # A transformers 4.x config (top-level rope_scaling) is written back in that form.
    cfg = json.load(open(os.path.join(src, "config.json")))
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    assert from_hf_config(cfg) == c and hash(from_hf_config(cfg)) == hash(c)
    v4 = _damaged(tmp_path, name)
    json.dump(cfg, open(v4 / "config.json", "w"))
    save_pretrained(load_pretrained(str(v4)), str(tmp_path / "v4_out"))
    assert json.load(open(tmp_path / "v4_out" / "config.json")) == cfg


def _damaged(tmp_path, name="llama"):
    d = tmp_path / name
    shutil.copytree(os.path.join(HF, name), d)
    return d


@pytest.mark.parametrize("how,msg", [
    ("half", r"truncated: header says 429408 bytes, file has 214704"),
    ("in_header", r"truncated: header says more than \d+ bytes, file has 100;"),
    ("garbage", r"not a safetensors file"),
    ("empty", r"not a safetensors file \(0 bytes"),
    ("trailing", r"corrupted \(trailing bytes\): header says 429408 bytes, file has 429411"),
], ids=["half", "in_header", "garbage", "empty", "trailing"])
def test_damaged_safetensors_is_named(tmp_path, how, msg):
    d = _damaged(tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"half": data[:len(data) // 2], "in_header": data[:100], "garbage": b"<html>404 Not Found</html>" * 9,
                   "empty": b"", "trailing": data + b"abc"}[how])
    with pytest.raises(CheckpointError, match=re.escape(str(f)) + ": " + msg + r".*re-download"):
        load_pretrained(str(d))


def test_damaged_or_missing_shard_is_named(tmp_path):
    d = _damaged(tmp_path, "sharded")
    shard = d / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=re.escape(str(shard)) + ": truncated: header says 181800 bytes, "
                       r"file has 180800; re-download"):
        load_pretrained(str(d))
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(shard)) + r": shard listed in .*index\.json is missing"):
        load_pretrained(str(d))
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"index\.json: not a valid safetensors index"):
        load_pretrained(str(d))
