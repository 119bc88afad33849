"""The command line as a user meets it: --help, --print_config, every documented option settable, user errors as
one message without a traceback (exit 2), and the config values that cannot work refused naming the key."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from util import ROOT, load_config
from align_jax.train import train
from align_jax.errors import SetupError
from align_jax.train.validate import ConfigValueError, validate_config


def cli(*args, timeout=300):
    env = dict(os.environ, XLA_FLAGS=os.environ.get("TEST_XLA_FLAGS", ""), JAX_PLATFORMS="cpu")
    env.pop("ALIGN_JAX_VERBOSE", None)
    return subprocess.run([sys.executable, "-m", "align_jax.main", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_help_exits_zero():
    p = cli("--help")
    assert p.returncode == 0, p.stderr
    assert "--print_config" in p.stdout and "--workdir" in p.stdout


def test_print_config_shows_values_comments_and_settable_none_and_new_loss_options():
    p = cli("--config=configs/ppo.py", "--config.ppo.missing_eos_penalty=1.0", "--print_config")
    assert p.returncode == 0, p.stderr
    lines = {ln.split(":")[0]: ln for ln in p.stdout.splitlines() if not ln.startswith("#")}
    assert lines["ppo.missing_eos_penalty"].startswith("ppo.missing_eos_penalty: 1.0")
    assert "subtracted from the score of a completion without EOS" in lines["ppo.missing_eos_penalty"]
    assert "Where the weights come from" in lines["model.init_from"]
    p = cli("--config=configs/ppo.py", "--print_config")
    assert "ppo.missing_eos_penalty: None" in p.stdout
    p = cli("--config=configs/grpo.py", "--config.loss.kwargs.epsilon_high=0.28", "--print_config")
    assert p.returncode == 0, p.stderr
    assert "loss.kwargs.epsilon_high: 0.28" in p.stdout
    assert "# loss.kwargs options of grpo:" in p.stdout and "epsilon_high=None" in p.stdout


@pytest.mark.parametrize("args,expect", [
    (("--config=configs/dpo.py", "--config.optimizer.lr=1", "--print_config"),
     "the config has no key 'optimizer.lr'"),
    (("--config=configs/dpo.py", "--config.optimzer.learning_rate=1", "--print_config"), 'Did you mean "optimizer"'),
    (("--config=configs/dpo.py", "--config.optimizer.learning_rate=abc", "--print_config"), "could not convert"),
    (("--config=configs/dpo.py",), "--workdir is required"),
    (("--config=configs/dpo.py:tiny", "--workdir=/tmp/align_jax_cli_x", "--config.loss.kwargs.bta=0.5"),
     "config.loss.kwargs.bta: is not an option of loss 'dpo:sigmoid'"),
    (("--config=configs/dpo.py:tiny", "--workdir=/tmp/align_jax_cli_x", "--config.data.train=/nonexistent/x.jsonl",
      "--config.data.eval="), "config.data.train: no file matches '/nonexistent/x.jsonl'"),
])
def test_user_errors_are_one_message_without_traceback(args, expect):
    p = cli(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    assert expect in p.stderr, p.stderr
    assert [ln for ln in p.stderr.splitlines() if ln.startswith("error:")], p.stderr
    assert "PyTorch was not found" not in p.stderr + p.stdout  # transformers' advice is noise here


def test_verbose_shows_the_traceback():
    p = cli("--config=configs/dpo.py:tiny", "--workdir=/tmp/align_jax_cli_x", "--config.loss.kwargs.bta=0.5",
            "--verbose")
    assert p.returncode != 0 and "Traceback" in p.stderr and "ConfigValueError" in p.stderr


@pytest.mark.parametrize("override,key,words", [
    ({"loss.name": "dpo:ipo", "loss.kwargs.beta": 0.0}, "loss.kwargs.beta", "divides by beta"),
    ({"loss.kwargs.beta": 0.0}, "loss.kwargs.beta", "no gradient"),
    ({"loss.kwargs.beta": -0.1}, "loss.kwargs.beta", "> 0"),
    ({"checkpoint.keep": 0}, "checkpoint.keep", ">= 1"),
    ({"optimizer.learning_rate": float("nan")}, "optimizer.learning_rate", "finite number > 0"),
    ({"optimizer.learning_rate": float("inf")}, "optimizer.learning_rate", "finite number > 0"),
    ({"optimizer.learning_rate": 0.0}, "optimizer.learning_rate", "finite number > 0"),
    ({"optimizer.learning_rate": -1e-5}, "optimizer.learning_rate", "finite number > 0"),
    ({"optimizer.b2": 1.0}, "optimizer.b2", "[0.0, 1.0)"),
    ({"num_epochs": -1.0}, "num_epochs", ">= 0"),
    ({"data.train": "/some/where.jsonl"}, "data.eval", "toy task's held-out set"),
])
def test_config_values_that_cannot_work_are_refused(override, key, words):
    c = load_config("dpo", **override)
    with pytest.raises(ConfigValueError) as e:
        validate_config(c)
    assert str(e.value).startswith(f"config.{key}") and words in str(e.value)


def test_toy_reward_on_user_prompts_is_refused():
    c = load_config("grpo", **{"data.train": "/some/prompts.jsonl"})
    with pytest.raises(ConfigValueError, match=r"config\.rewards\.functions: \['toy_gold'\] score the toy task"):
        validate_config(c)


def test_missing_init_from_directory_is_named(tmp_path):
    c = load_config("dpo", **{"model.init_from": str(tmp_path / "no_such_model")})
    with pytest.raises(SetupError, match=r"config\.model\.init_from=.*no_such_model.*no such directory"):
        train(c, str(tmp_path / "w"))


def test_dpo_eval_loss_is_the_configured_loss():
    """With the policy as its own reference every log-ratio is 0: sigmoid's loss is log 2 per pair, IPO's
    (0 - 1/(2 beta))^2 = 25 at beta 0.1, hinge's relu(1 - 0) = 1."""
    import jax
    from flax import nnx
    from transformers import AutoTokenizer

    from align_jax.data import make_loader
    from align_jax.data.toy import TOKENIZER_DIR, generate, toy_model_config
    from align_jax.models import from_hf_config
    from align_jax.models.llama import Transformer
    from align_jax.algorithms.dpo import dpo_eval

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    records = [json.loads(line) for line in open(generate(os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                                       "align_jax_cli_toy"))["eval_pairs"])][:4]
    rows = [{"prompt": json.dumps(r["prompt"]), "chosen": json.dumps(r["chosen"]), "rejected": json.dumps(r["rejected"]),
             "chosen_prob": 1.0, "conversational": 1, "source": f"t:{i}"} for i, r in enumerate(records)]
    (batch,) = list(make_loader(rows, tok, kind="pairwise", batch_size=4, shuffle=False, num_epochs=1,
                                drop_remainder=False, shard_by_process=False, length_buckets=(64,))[0])
    batch = {k: v for k, v in batch.items() if k not in ("record_index",)}
    model = Transformer(from_hf_config(toy_model_config()), rngs=nnx.Rngs(0))
    for name, want in (("dpo:sigmoid", np.log(2.0)), ("dpo:ipo", 25.0), ("dpo:hinge", 1.0)):
        cfg = load_config("dpo", **{"loss.name": name})
        out = jax.device_get(dpo_eval(model, batch, model, cfg))
        np.testing.assert_allclose(out["loss"], np.full(4, want), rtol=1e-6, err_msg=name)


def test_num_epochs_sets_total_steps(tmp_path):
    """40 usable pairs, batch 8, 1.5 epochs -> ceil(1.5 * 40 / 8) = 8 steps (written to the run's metrics)."""
    from align_jax.data.toy import generate

    rows = open(generate(tmp_path / "toy")["pairs"]).readlines()[:40]
    (tmp_path / "pairs.jsonl").write_text("".join(rows))
    c = load_config("dpo", **{"data.train": str(tmp_path / "pairs.jsonl"), "data.eval": "", "num_epochs": 1.5,
                              "total_steps": 1000, "export": False, "checkpoint.every_steps": 100,
                              "data.length_buckets": (64,), "optimizer.schedule": "constant"})
    train(c, str(tmp_path / "w"))
    steps = [json.loads(line)["step"] for line in open(tmp_path / "w" / "metrics.jsonl") if '"loss"' in line]
    assert max(steps) == 8


def test_chat_template_missing_is_named_and_chatml_can_be_set(tmp_path):
    import shutil

    from align_jax.data.formats import DataError
    from align_jax.data.toy import TOKENIZER_DIR
    from align_jax.data.tokenize import tokenize_chat
    from align_jax.train.tokenizer import load_tokenizer

    tok_dir = tmp_path / "tok"
    shutil.copytree(TOKENIZER_DIR, tok_dir)
    cfg_path = tok_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    messages = [{"role": "user", "content": "hello"}]
    c = load_config("dpo", **{"model.tokenizer": str(tok_dir)})
    with pytest.raises(DataError, match=r"needs a chat template.*--config\.model\.chat_template=chatml"):
        tokenize_chat(load_tokenizer(c), messages)
    c.model.chat_template = "chatml"
    tok = load_tokenizer(c)
    assert tok.decode(tokenize_chat(tok, messages, add_generation_prompt=True)) == \
        tok.decode(tok("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])


def test_online_runs_end_on_a_rollout_boundary():
    c = load_config("grpo", **{"grpo.num_iterations": 2, "total_steps": 5, "checkpoint.every_steps": 2})
    with pytest.raises(ConfigValueError, match=r"config\.total_steps: 5 is not a multiple of grpo\.num_iterations=2"):
        validate_config(c)
    c = load_config("ppo", **{"total_steps": 5, "ppo.reward_model": ROOT})  # tiny: 2 epochs x 1 minibatch
    with pytest.raises(ConfigValueError, match=r"config\.total_steps: 5 is not a multiple of num_ppo_epochs"):
        validate_config(c)


def test_reward_weights_default_to_one_each_and_signatures_are_checked(tmp_path):
    from align_jax.rl.rewards import RewardConfigError, get_reward_function

    validate_config(load_config("grpo", **{"rewards.functions": ("toy_gold", "toy_format")}))  # no weights given
    (tmp_path / "myrewards_sig.py").write_text("def no_kwargs(prompts, completions):\n    return [0.0] * len(prompts)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(RewardConfigError, match=r"'myrewards_sig:no_kwargs' must have TRL's signature .*\*\*kwargs"):
            get_reward_function("myrewards_sig:no_kwargs")
        with pytest.raises(RewardConfigError, match="cannot load 'myrewards_sig:nope'"):
            get_reward_function("myrewards_sig:nope")
    finally:
        sys.path.remove(str(tmp_path))


def test_damaged_init_from_is_named_before_the_data_is_built(tmp_path):
    import shutil

    from align_jax.models.checkpoint import CheckpointError

    model = tmp_path / "model"
    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "hf", "llama"), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    c = load_config("dpo", **{"model.init_from": str(model), "data.data_dir": ""})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: header says \d+ bytes, file has \d+"):
        train(c, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "tfds")  # refused before any data was built


def test_pin_threads_first_cpus_or_the_parallel_childs_own():
    """`cli.pin_threads(n)`: the first n CPUs; ALIGN_JAX_PIN_CPU=k (a child of experiments/ablation.parallel_cells,
    which no longer pins between fork and exec): CPU k alone, whatever n."""
    cpus = sorted(os.sched_getaffinity(0))
    code = "import os; from align_jax import cli; cli.pin_threads(%d); print(sorted(os.sched_getaffinity(0)))"
    env = {k: v for k, v in os.environ.items() if k != "ALIGN_JAX_PIN_CPU"}
    run = lambda n, **e: subprocess.run([sys.executable, "-c", code % n], capture_output=True, text=True,  # noqa: E731
                                        env={**env, **e}, cwd=ROOT, check=True).stdout.strip()
    assert run(1) == str(cpus[:1]) and run(0) == str(cpus)
    assert run(0, ALIGN_JAX_PIN_CPU=str(cpus[-1])) == run(1, ALIGN_JAX_PIN_CPU=str(cpus[-1])) == str([cpus[-1]])
