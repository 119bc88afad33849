"""A trained reward model as a reward: export -> load round trip, token-id scoring with any padding, and the
text reward function against the reward-model trainer's own pipeline tokenization."""

import importlib.util
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from align_jax.data import make_loader
from align_jax.data.toy import load_tokenizer, toy_model_config
from align_jax.models import (CheckpointError, Transformer, from_hf_config, load_pretrained, save_pretrained,
                              save_reward_model)
from align_jax.models.config import rope_inv_freq
from align_jax.models.heads import ScalarHeadModel, sequence_scores
from align_jax.parallel import make_mesh
from align_jax.rl import reward_model as RM
from align_jax.rl.rewards import get_reward_function
from align_jax.train.model import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_CLS = os.path.join(ROOT, "tests", "fixtures", "hf", "llama_seqcls")  # tests/fixtures/make_fixtures.py
TOK = load_tokenizer()

TEXT = [("What is 2 + 3 ?", " 5"), ("What is 12 + 7 ?", " The answer is 19"),
        ("Name a cold thing .", " snow<eos>"),  # EOS text already there: not appended twice
        ("Say hello", " hello"), ("Put the answer in brackets : 4 + 4", " [8]")]
USER = [{"role": "user", "content": "What is 2 + 3 ?"}]
CONV = [(USER, [{"role": "assistant", "content": "5"}]), (USER, "The answer is 5"),  # str completion: wrapped
        ([{"role": "user", "content": "Name a cold thing ."}], [{"role": "assistant", "content": "snow"}])]


def rm_config():
    spec = importlib.util.spec_from_file_location("rm_cfg", os.path.join(ROOT, "configs", "reward_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("tiny")


@jax.jit
def _ref_jit(state, ids, mask):
    return sequence_scores(nnx.merge(_GRAPHDEF, state), ids, mask)


def ref_scores(model, ids, mask):
    """`sequence_scores` (the reward-model trainer's scores), jitted on [4, 64] chunks (one compile)."""
    n = ids.shape[0]
    pad = -n % 4
    ids = np.pad(ids, ((0, pad), (0, 64 - ids.shape[1])))
    mask = np.pad(mask, ((0, pad), (0, 64 - mask.shape[1])))
    mask[n:, 0] = 1
    state = nnx.state(model)
    return np.concatenate([np.asarray(_ref_jit(state, ids[i:i + 4], mask[i:i + 4]))
                           for i in range(0, len(ids), 4)])[:n]


def random_model(make, seed=3):
    """`make()`'s module with random weights drawn on the host (std 0.02; norms 1 + noise; head std 0.5): much
    faster than running the initialisers op by op or compiling them."""
    rng = np.random.default_rng(seed)
    abstract = nnx.eval_shape(make)
    graphdef, state = nnx.split(abstract)
    out = []
    for path, var in nnx.to_flat_state(state):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if path[-1] == "inv_freq":
            value = rope_inv_freq(abstract.config)
        elif path[-1] == "score":
            value = 0.5 * rng.standard_normal(shape)
        elif path[-1] == "weight":  # RMSNorm scales
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.02 * rng.standard_normal(shape)
        out.append((path, var.replace(jax.numpy.asarray(np.asarray(value, dtype)))))
    return graphdef, nnx.merge(graphdef, nnx.from_flat_state(out))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(in-memory random reward model, its export directory)."""
    global _GRAPHDEF
    _GRAPHDEF, model = random_model(lambda: ScalarHeadModel(from_hf_config(toy_model_config()), rngs=nnx.Rngs(0)))
    path = str(tmp_path_factory.mktemp("rm") / "export")
    export(rm_config(), model, TOK, path)
    return model, path


def pipeline_rows(pairs, **kw):
    """The reward-model trainer's pipeline (make_loader, kind='pairwise') on (prompt, completion) as the chosen
    side: right-padded [N, L] ids and attention mask."""
    enc = lambda x: x if isinstance(x, str) else json.dumps(x)  # noqa: E731
    records = []
    for p, c in pairs:
        conv = not isinstance(p, str)
        if conv and isinstance(c, str):
            c = [{"role": "assistant", "content": c}]
        other = " no" if isinstance(c, str) else [{"role": "assistant", "content": "no"}]  # any other rejected
        records.append({"prompt": enc(p), "chosen": enc(c), "rejected": enc(other), "chosen_prob": 1.0,
                        "conversational": int(conv), "source": "test"})
    ds, _ = make_loader(records, TOK, kind="pairwise", batch_size=len(records), shuffle=False, num_epochs=1,
                        drop_remainder=False, shard_by_process=False, length_buckets=(64,), **kw)
    (batch,) = list(ds)
    return batch["chosen_input_ids"], batch["chosen_attention_mask"]


def test_score_token_ids_left_padding_equals_right_padding(exported):
    model, _ = exported
    rng = np.random.default_rng(0)
    B, T = 4, 64
    prompt_lens, comp_lens = [3, 7, 1, 5], [6, 2, 9, 4]
    right_ids = np.zeros((B, T), np.int32)
    right_mask = np.zeros((B, T), np.int32)
    left_ids = np.zeros((B, T), np.int32)
    left_mask = np.zeros((B, T), np.int32)
    P = max(prompt_lens)  # PPO layout: [pad.. prompt | completion ..pad]
    for b, (lp, lc) in enumerate(zip(prompt_lens, comp_lens)):
        toks = rng.integers(3, 256, lp + lc)
        right_ids[b, :lp + lc], right_mask[b, :lp + lc] = toks, 1
        left_ids[b, P - lp:P + lc], left_mask[b, P - lp:P + lc] = toks, 1
    want = ref_scores(model, right_ids, right_mask)
    got = RM.score_token_ids(model, left_ids, left_mask)
    assert got.dtype == np.float32 and got.shape == (B,)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
    assert np.ptp(want) > 1e-3  # the rows really differ
    # Compiled once per shape: a second call with new values of the same shape reuses the executable.
    n = RM._score_jit._cache_size()
    RM.score_token_ids(model, right_ids, right_mask)
    assert RM._score_jit._cache_size() == n


def check_loads(model, path, ids, mask, want):
    """`load_reward_model(path)` has `model`'s head and scores `want`, unsharded and on a data x FSDP mesh."""
    loaded = RM.load_reward_model(path)
    np.testing.assert_array_equal(np.asarray(loaded.score[...]), np.asarray(model.score[...]))
    np.testing.assert_allclose(np.asarray(RM.score_token_ids(loaded, ids, mask)), want, atol=1e-5, rtol=0)
    mesh = make_mesh(data=2, fsdp=4)
    sharded = RM.load_reward_model(path, mesh=mesh)
    assert sharded.score[...].sharding.spec == jax.sharding.PartitionSpec("fsdp")
    assert sharded.backbone.embed[...].sharding.mesh == mesh
    np.testing.assert_allclose(np.asarray(RM.score_token_ids(sharded, ids, mask)), want, atol=1e-5, rtol=0)


def test_load_reward_model_round_trip_and_mesh(exported):
    model, path = exported
    ids, mask = pipeline_rows(TEXT[:4])
    check_loads(model, path, ids, mask, ref_scores(model, ids, mask))


def test_reward_function_matches_pipeline_tokenization(exported):
    model, path = exported
    fn = get_reward_function(f"rm:{path}")
    assert isinstance(fn, RM.RewardModelReward) and fn.batch_size == 32
    fn.batch_size = 4  # 5 text rows: a full batch and a padded one; 3 conversational rows: one padded batch
    pairs = TEXT + CONV
    ids, mask = pipeline_rows(pairs)
    want = ref_scores(model, ids, mask)
    for i, (p, c) in enumerate(pairs):  # same ids as the trainer's pipeline (EOS / end-of-turn last)
        np.testing.assert_array_equal(fn.tokenize(p, c), ids[i, :mask[i].sum()])
        assert ids[i, mask[i].sum() - 1] == TOK.eos_token_id
    for sub in (slice(0, 5), slice(5, 8), slice(0, 8)):  # text, conversational, mixed
        prompts, completions = zip(*pairs[sub])
        got = fn(prompts=list(prompts), completions=list(completions), answer=["x"] * len(prompts))
        assert isinstance(got, list) and all(isinstance(x, float) for x in got)
        np.testing.assert_allclose(got, want[sub], atol=1e-5, rtol=0)
    assert np.ptp(want) > 1e-3


def test_truncation_as_pipeline_and_unscorable_rows(exported):
    model, path = exported
    fn = RM.RewardModelReward(path, batch_size=4, max_length=14)
    pairs = [TEXT[1], TEXT[0]]  # 11 + 6 + EOS tokens cut to 14 (no EOS left); 10 + 2 + EOS fit
    ids, mask = pipeline_rows(pairs, max_length=14)
    assert mask.sum(axis=1).tolist() == [14, 13]
    want = ref_scores(model, ids, mask)
    long_prompt = ("What is 12 + 7 ? " * 3, " 19")  # >= max_length prompt tokens: the pipeline refuses it
    got = fn(prompts=[pairs[0][0], long_prompt[0], pairs[1][0]], completions=[pairs[0][1], long_prompt[1],
                                                                               pairs[1][1]])
    assert got[1] is None
    np.testing.assert_allclose([got[0], got[2]], want, atol=1e-5, rtol=0)


def test_policy_export_is_refused_with_the_path(tmp_path):
    path = str(tmp_path / "policy")
    save_pretrained(random_model(lambda: Transformer(from_hf_config(toy_model_config()), rngs=nnx.Rngs(0)))[1], path)
    TOK.save_pretrained(path)
    with pytest.raises(ValueError, match=f"{path}.*score_head.npy is missing"):
        get_reward_function(f"rm:{path}")
    with pytest.raises(ValueError, match="config.json is missing"):
        RM.load_reward_model(str(tmp_path))


def test_bfloat16_head_file_is_read_back(tmp_path):
    head = np.asarray([1.5, -0.25, 3.0], ml_dtypes.bfloat16)
    np.save(tmp_path / RM.HEAD_FILE, head)  # numpy stores bfloat16 as raw '|V2' records
    got = RM._read_head(str(tmp_path))
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), [1.5, -0.25, 3.0])


# ---------------------------------------------------------------------------- transformers' sequence classifier


def test_transformers_sequence_classifier_scores():
    """A tiny `LlamaForSequenceClassification` (num_labels=1, pad 0) loads as a reward model and gives
    transformers' scores (fixture: tests/fixtures/make_fixtures.py), no padding and right padding."""
    g = np.load(os.path.join(SEQ_CLS, "scores.npz"))
    model = RM.load_reward_model(SEQ_CLS)
    assert model.backbone.config.tie_word_embeddings  # the classifier has no LM head: none is allocated
    for case in ("nopad", "right"):
        got = RM.score_token_ids(model, g[f"input_ids_{case}"], g[f"attention_mask_{case}"])
        np.testing.assert_allclose(np.asarray(got), g[f"scores_{case}"], atol=1e-5, rtol=0)
    per_token = nnx.jit(lambda m, i: m(i))(model, jax.numpy.asarray(g["input_ids_nopad"]))
    np.testing.assert_allclose(np.asarray(per_token), g["token_scores_nopad"], atol=1e-5, rtol=0)
    assert np.ptp(g["scores_right"]) > 0.1


def _exported_model():
    """A random toy reward model (untied embeddings: the exported classifier must drop its LM head)."""
    cfg = {**toy_model_config(), "tie_word_embeddings": False}
    return random_model(lambda: ScalarHeadModel(from_hf_config(cfg), rngs=nnx.Rngs(0)), seed=5)


def test_save_reward_model_is_a_sequence_classifier_and_round_trips(tmp_path, caplog):
    from safetensors import safe_open

    graphdef, model = _exported_model()
    path = str(tmp_path / "rm")
    save_reward_model(model, path, pad_token_id=TOK.pad_token_id)
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    assert cfg["id2label"] == {"0": "LABEL_0"} and cfg["pad_token_id"] == TOK.pad_token_id == 0
    with safe_open(os.path.join(path, "model.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
        head = f.get_tensor("score.weight")
    assert "lm_head.weight" not in keys and all(k.startswith("model.") for k in keys - {"score.weight"})
    np.testing.assert_array_equal(head, np.asarray(model.score[...])[None])
    ids, mask = pipeline_rows(TEXT[:4])
    global _GRAPHDEF
    _GRAPHDEF = graphdef
    want = ref_scores(model, ids, mask)
    check_loads(model, path, ids, mask, want)
    # The old form (causal-LM backbone + score_head.npy) still loads, to the same scores.
    old = str(tmp_path / "old")
    save_pretrained(model.backbone, old)
    np.save(os.path.join(old, RM.HEAD_FILE), np.asarray(model.score[...]))
    np.testing.assert_allclose(np.asarray(RM.score_token_ids(RM.load_reward_model(old), ids, mask)), want,
                               atol=1e-5, rtol=0)
    # A classifier is not a causal LM; one with several labels is not a reward model.
    with pytest.raises(CheckpointError, match="score.weight.*load_reward_model"):
        load_pretrained(path)
    with pytest.raises(ValueError, match="pad_token_id"):
        save_reward_model(model, path, pad_token_id=None)
    save_reward_model(model, str(tmp_path / "pad_eos"), pad_token_id=TOK.eos_token_id)  # allowed, with a warning
    assert "pad_token_id=2 is its EOS" in caplog.text and "will NOT reproduce" in caplog.text


def test_multi_label_classifier_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "two"
    shutil.copytree(SEQ_CLS, path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["score.weight"] = np.concatenate([tensors["score.weight"]] * 2)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"score\.weight has shape \(2, 64\), expected \(1, 64\).*num_labels=1"):
        RM.load_reward_model(str(path))


def test_reward_model_export_loads_in_transformers(tmp_path):
    """`save_reward_model` output read by `AutoModelForSequenceClassification` gives align-jax's scores on
    right-padded rows (needs torch, which the suite does not install: skipped without it)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForSequenceClassification

    graphdef, model = _exported_model()
    path = str(tmp_path / "rm")
    save_reward_model(model, path, pad_token_id=TOK.pad_token_id)
    ids, mask = pipeline_rows(TEXT[:4])
    assert (ids[mask == 1] != TOK.pad_token_id).all()
    global _GRAPHDEF
    _GRAPHDEF = graphdef
    want = ref_scores(model, ids, mask)
    hf = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        got = hf(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long),
                 attention_mask=torch.as_tensor(np.asarray(mask), dtype=torch.long)).logits[:, 0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_groupwise_eval_top1_ignores_padded_slots():
    """A group of 3 in slots of 4 (the padded slot's rank is the collator's -1): when the top-scored valid response
    has the best valid rank, top-1 is 1 (it compared with min over all slots, -1, and was always 0 for such
    groups)."""
    from align_jax.algorithms.reward_model import group_scores, reward_eval

    _, model = random_model(lambda: ScalarHeadModel(from_hf_config(toy_model_config()), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(3, 100, (2, 4, 10)).astype(np.int32),
             "attention_mask": np.ones((2, 4, 10), np.int32), "group_mask": np.array([[1, 1, 1, 0], [1, 1, 1, 1]])}
    s = np.asarray(group_scores(model, batch))
    ranks = np.zeros((2, 4), np.int32)
    for b, n in ((0, 3), (1, 4)):
        order = np.argsort(-s[b, :n])
        ranks[b, order] = np.arange(n)  # the scores' own order: top-1 right
    ranks[0, 3] = -1
    got = reward_eval(model, dict(batch, ranks=ranks), None, None)["top1_accuracy"]
    np.testing.assert_array_equal(np.asarray(got), [1.0, 1.0])
    ranks[1] = 3 - ranks[1]  # reversed: the top-scored response is the worst
    np.testing.assert_array_equal(np.asarray(reward_eval(model, dict(batch, ranks=ranks), None, None)["top1_accuracy"]),
                                  [1.0, 0.0])
