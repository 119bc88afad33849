"""Faults a user meets in the training loop: an unwritable checkpoint directory or a full disk, a learning rate
that overflows the parameters, a restart with another config or model, a damaged checkpoint, a torn
metrics.jsonl, re-running a finished workdir, dead reward functions, gradients that stay exactly zero; and the
console lines of a run."""

import contextlib
import errno
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from util import ROOT, final_params, interrupt_and_check, load_config
from align_jax.errors import UserError
from align_jax.train import NonFiniteLossError, train


def _cfg(**kw):
    """Tiny DPO, one compiled step per run, constant learning rate (resuming with another total_steps changes
    nothing else), a checkpoint every step."""
    return load_config("dpo", **{"data.eval": "", "data.length_buckets": (64,), "export": False, "total_steps": 3,
                                 "checkpoint.every_steps": 1, "optimizer.schedule": "constant", **kw})


@contextlib.contextmanager
def _logs():
    """The messages of align_jax's loggers at INFO and above, as a list filled while the block runs."""
    logger, out = logging.getLogger("align_jax"), []

    class H(logging.Handler):
        def emit(self, record):
            out.append(record.levelname + " " + record.getMessage())

    handler, level = H(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _files(workdir):
    """{path: (mtime_ns, size, bytes)} of every file under `workdir` (the checkpoints' too)."""
    out = {}
    for path in glob.glob(os.path.join(workdir, "**"), recursive=True):
        if os.path.isfile(path):
            st = os.stat(path)
            out[path] = (st.st_mtime_ns, st.st_size, open(path, "rb").read())
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-step run with a final evaluation: (workdir, returned metrics, its log messages)."""
    wd = str(tmp_path_factory.mktemp("faults") / "finished")
    with _logs() as logs:
        out = train(_cfg(**{"data.eval": "toy:eval_pairs", "eval_batches": 1, "log_every": 1}), wd)
    return wd, out, logs


@pytest.fixture(scope="module")
def extended(finished, tmp_path_factory):
    """The finished run restarted with total_steps=4 (a key that may change on resume): (workdir, logs)."""
    wd = str(tmp_path_factory.mktemp("faults") / "extended")
    shutil.copytree(finished[0], wd)
    with _logs() as logs:
        train(_cfg(**{"data.eval": "toy:eval_pairs", "eval_batches": 1, "log_every": 1, "total_steps": 4}), wd)
    return wd, logs


# ------------------------------------------------------------------------------------------------ 1. disk


def test_checkpoints_path_that_is_a_file_fails_fast(tmp_path):
    wd = tmp_path / "w"
    wd.mkdir()
    (wd / "checkpoints").write_text("not a directory")
    t0 = time.time()
    with pytest.raises(UserError, match=r"checkpoints cannot be written to .*/w/checkpoints: File exists"):
        train(_cfg(), str(wd))
    assert time.time() - t0 < 10  # before: Orbax waited ~5 minutes, then a TimeoutError


def test_full_disk_at_a_save_is_one_clear_error(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    wd = str(tmp_path / "w")
    with pytest.raises(UserError, match=f"no space left on {wd}/checkpoints"):
        train(_cfg(), wd)


def test_full_disk_in_an_async_save_ends_with_the_message_and_exits_cleanly(tmp_path):
    """As TensorStore reports ENOSPC from Orbax's background thread, re-raised by `wait_until_finished`: the last
    line of the output names the directory, and the interpreter exits without a late error (nothing hangs)."""
    wd = str(tmp_path / "w")
    code = ("import sys; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
            "import conftest\n"
            "import orbax.checkpoint as ocp\n"
            "def full(self, *a, **k):\n"
            "    raise ValueError('RESOURCE_EXHAUSTED: Error writing \"params.embed.value/0\" in OCDBT database: '\n"
            "                     'Failed to write 323661 bytes to file 9: No space left on device '\n"
            "                     \"[os_error_code='28']\")\n"
            "ocp.CheckpointManager.wait_until_finished = full\n"
            "from test_faults import _cfg\n"
            "from align_jax.train import train\n"
            "train(_cfg(total_steps=2), %r)\n") % (ROOT, os.path.join(ROOT, "tests"), wd)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and f"no space left on {wd}/checkpoints" in last, proc.stderr[-3000:]
    assert "ImportError" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ 2. non-finite


def test_all_finite_by_hand():
    """The step's finiteness check (`step.all_finite`, a sum of x * 0): the largest finite floats pass (a sum of the
    values themselves would overflow), any inf, -inf or NaN in any leaf fails, integer leaves are not checked."""
    import jax.numpy as jnp

    from align_jax.train.step import all_finite

    big = {"w": jnp.full((3, 5), 3.4e38, jnp.float32), "b": jnp.full((7,), -3.4e38, jnp.float32),
           "h": jnp.full((4,), 3.3e38, jnp.bfloat16), "n": jnp.array([2**31 - 1], jnp.int32)}
    assert bool(jax.jit(all_finite)(big)) and bool(all_finite({})) and bool(all_finite({"n": big["n"]}))
    for leaf, bad in (("w", jnp.inf), ("b", -jnp.inf), ("h", jnp.nan), ("w", jnp.nan)):
        tree = dict(big, **{leaf: big[leaf].ravel().at[2].set(bad).reshape(big[leaf].shape)})
        assert not bool(jax.jit(all_finite)(tree)), (leaf, bad)


def test_update_that_overflows_the_params_is_skipped_and_never_saved(tmp_path):
    """SGD at lr 1e38: step 1 (warmup lr 0) is good; step 2's loss and gradient are finite but its update
    overflows the parameters to inf. The step is skipped and the saved state is step 1's, finite."""
    kw = {"optimizer.name": "sgd", "optimizer.max_grad_norm": 0.0, "optimizer.warmup_steps": 2,
          "loss.kwargs.beta": 1000.0, "total_steps": 4, "checkpoint.every_steps": 4}
    with pytest.raises(NonFiniteLossError, match="step 2"):
        train(_cfg(**kw, **{"optimizer.learning_rate": 1e38}), str(tmp_path / "huge"))
    assert os.listdir(tmp_path / "huge" / "checkpoints") == ["1"]
    m = {r["step"]: r for r in _metrics(str(tmp_path / "huge"))}
    assert np.isfinite(m[2]["loss"]) and np.isfinite(m[2]["grad_norm"]) and m[2]["nonfinite"] == 1.0
    saved = final_params(str(tmp_path / "huge"), 1)
    assert all(np.isfinite(p).all() for p in saved)
    # the last good step's parameters: step 1 of the same run at a normal learning rate (lr 0 in warmup)
    train(_cfg(**{**kw, "optimizer.learning_rate": 1e-3, "checkpoint.every_steps": 1, "checkpoint.keep": 4}),
          str(tmp_path / "ok"))
    for x, y in zip(saved, final_params(str(tmp_path / "ok"), 1)):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------------------------ 3. config.json


def test_config_json_records_the_resolved_config_and_versions(finished):
    wd = finished[0]
    saved = json.load(open(os.path.join(wd, "config.json")))
    assert saved["batch_size"] == 8 and saved["total_steps"] == 3 and saved["loss"]["name"] == "dpo:sigmoid"
    assert {"jax", "flax", "optax", "orbax-checkpoint", "transformers", "grain"} <= set(
        saved["_provenance"]["versions"])
    assert "align_jax_commit" in saved["_provenance"]
    host = saved["_provenance"]["host"]
    assert host["backend"] == "cpu" and host["devices"].startswith(f"{jax.device_count()} x ")
    assert host["cpus_usable"] >= 1
    assert list(saved) == sorted(saved)


def test_cpu_summary_reads_model_and_instruction_sets():
    from align_jax.hostinfo import cpu_summary

    text = ("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512_bf16\n"
            "\nprocessor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512_bf16\n")
    assert cpu_summary(text) == {"cpu": "AMD EPYC", "cpu_isa": ["avx2", "fma", "avx512f", "avx512_bf16"]}
    no512 = text.replace(" avx512f avx512dq avx512_bf16", "")
    assert cpu_summary(no512)["cpu_isa"] == ["avx2", "fma"]
    from align_jax.hostinfo import describe

    assert describe({**cpu_summary(no512), "cpus_usable": 1, "devices": "1 x cpu"}) == \
        "host: AMD EPYC, 1 usable CPU, avx2, fma; jax: 1 x cpu"
    assert describe({"cpu": "X", "cpu_isa": [], "cpus_usable": 2}) == "host: X, 2 usable CPUs, no AVX2/FMA/AVX-512/AMX"
    assert describe({"cpu": None, "cpu_isa": None, "cpus_usable": 4}).endswith("4 usable CPUs, instruction sets unknown")


def test_restart_with_another_batch_size_is_refused(finished, tmp_path):
    wd = str(tmp_path / "w")
    shutil.copytree(finished[0], wd)
    before = _files(wd)
    with pytest.raises(UserError, match="batch_size: 8 -> 16") as e:
        train(_cfg(batch_size=16, **{"data.eval": "toy:eval_pairs", "eval_batches": 1, "log_every": 1}), wd)
    assert "new --workdir" in str(e.value) and "log_every" not in str(e.value).split("(Keys")[0]
    assert _files(wd) == before


def test_restart_with_another_total_steps_resumes(extended):
    wd, logs = extended
    assert [m["step"] for m in _metrics(wd) if "loss" in m] == [1, 2, 3, 4]
    assert any("changed settings" in line and "total_steps: 3 -> 4" in line for line in logs), logs
    assert json.load(open(os.path.join(wd, "config.json")))["total_steps"] == 4  # rewritten


def test_restart_with_another_model_names_the_parameter(finished, tmp_path):
    from align_jax.data.toy import MODEL_CONFIG_PATH

    wd = str(tmp_path / "w")
    shutil.copytree(finished[0], wd)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(wd, "config.json"))  # the record is gone: the checkpoint's shapes still tell
    cfg = json.load(open(MODEL_CONFIG_PATH))
    cfg["intermediate_size"] = 256
    json.dump(cfg, open(tmp_path / "bigger.json", "w"))
    with pytest.raises(UserError, match=r"checkpoint .*/checkpoints/3 was written by a different model: params/"
                                        r"layers/0/mlp/\w+ has shape \(.*384.*\) float32 there but shape \(.*256"):
        train(_cfg(total_steps=4, **{"model.init_from": f"random:{tmp_path / 'bigger.json'}"}), wd)


# ------------------------------------------------------------------------------------------------ 4. damaged


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(finished, extended, tmp_path):
    wd = str(tmp_path / "w")
    shutil.copytree(finished[0], wd)  # checkpoints 1, 2, 3
    biggest = max(glob.glob(os.path.join(wd, "checkpoints", "3", "state", "**", "d", "*"), recursive=True),
                  key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(100)
    with _logs() as logs:
        train(_cfg(**{"data.eval": "toy:eval_pairs", "eval_batches": 1, "log_every": 1, "total_steps": 4}), wd)
    assert any("WARNING" in line and f"{wd}/checkpoints/3 cannot be read" in line for line in logs), logs
    assert os.path.isdir(os.path.join(wd, "checkpoints", "3.damaged"))
    a = {m["step"]: m for m in _metrics(wd) if "loss" in m}
    b = {m["step"]: m for m in _metrics(extended[0]) if "loss" in m}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and a[3]["loss"] == b[3]["loss"]
    for x, y in zip(final_params(wd, 4), final_params(extended[0], 4)):
        np.testing.assert_array_equal(x, y)


def test_no_readable_checkpoint_says_how_to_start_over(finished, tmp_path):
    wd = str(tmp_path / "w")
    shutil.copytree(finished[0], wd)
    for path in glob.glob(os.path.join(wd, "checkpoints", "*", "state", "_METADATA")):
        open(path, "w").write("garbage")
    with pytest.raises(UserError, match=f"no checkpoint in {wd}/checkpoints can be read .*delete {wd}/checkpoints"):
        train(_cfg(**{"data.eval": "toy:eval_pairs", "eval_batches": 1, "log_every": 1, "total_steps": 4}), wd)


# ------------------------------------------------------------------------------------------------ 5. metrics.jsonl


def test_torn_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    from align_jax.train.metrics_io import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')  # killed mid-write
    writer = MetricsWriter(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="align_jax"):
        writer.truncate_after(2)
    writer.write(3, {"loss": 0.3}, tensorboard=False)
    writer.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert "torn line" in caplog.text and "metrics.jsonl:3" in caplog.text


# ------------------------------------------------------------------------------------------------ 6. finished


def test_rerunning_a_finished_workdir_changes_nothing(finished):
    wd, out, _ = finished
    before = _files(wd)
    with _logs() as logs:
        again = train(_cfg(**{"data.eval": "toy:eval_pairs", "eval_batches": 1, "log_every": 1}), wd)
    assert again == out and "eval/loss" in again and "loss" in again
    assert any(f"run in {wd} is complete (step 3 of 3); nothing to do" in line for line in logs), logs
    assert _files(wd) == before


# ------------------------------------------------------------------------------------------------ 7. dead signals


def none_reward(prompts, completions, **kwargs):
    return [None] * len(completions)


def test_grpo_stops_when_every_reward_fails(tmp_path):
    c = load_config("grpo", **{"rewards.functions": ("test_faults:none_reward",), "rewards.weights": (1.0,),
                               "total_steps": 6, "checkpoint.every_steps": 2})
    with pytest.raises(UserError, match=r"reward functions test_faults:none_reward failed for every completion in 3 "
                                        r"consecutive rollouts \(for steps 1 to 3\); first failure: .*returned None"):
        train(c, str(tmp_path / "w"))


def test_zero_gradient_for_n_steps_warns_once(caplog):
    from align_jax.train.loop import ZERO_GRAD_STEPS
    from align_jax.train.metrics_io import ZeroGradWatch

    watch = ZeroGradWatch(ZERO_GRAD_STEPS)
    with caplog.at_level(logging.WARNING, logger="align_jax"):
        fired = [watch.update(step, g) for step, g in enumerate([0.5, 0.0, 0.0, 1e-30, 0.0, 0.0, 0.0, 0.0, 0.0], 1)]
    assert ZERO_GRAD_STEPS == 3 and fired == [False] * 6 + [True, False, False]
    assert caplog.text.count("exactly 0 for 3 consecutive steps (steps 5-7)") == 1


# ------------------------------------------------------------------------------------------------ 8. console


def test_console_lines(finished):
    logs = finished[2]
    text = "\n".join(logs)
    assert "mesh: data=1 fsdp=8 tensor=1 over 8 cpu devices" in text
    assert "model: Transformer from toy, 0.82 M parameters, float32" in text
    assert "data: train toy:pairs (" in text and "eval toy:eval_pairs" in text
    assert "training: dpo (dpo:sigmoid), steps 0 -> 3 of batch 8" in text
    assert [line.split(":")[0] for line in logs if line.startswith("INFO step ")] == \
        ["INFO step 1/3", "INFO step 2/3", "INFO step 3/3"]  # no terminal: a plain line every log_every steps
    assert any(line.startswith("INFO eval at step 3: eval/logps/chosen") for line in logs)
    done = [line for line in logs if line.startswith("INFO done: step 3 of 3")]
    assert len(done) == 1 and "final loss" in done[0] and "metrics.jsonl" in done[0] and "tensorboard" in done[0]


# ------------------------------------------------------------------------------------------------ follow-ups


def test_restart_on_changed_data_contents_is_refused(tmp_path):
    """Same path, other contents: the run would mix two datasets. config.json records the data's fingerprint."""
    from align_jax.data.toy import generate

    rows = open(generate(tmp_path / "toy")["pairs"]).readlines()
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(rows[:40]))
    cfg = lambda n: _cfg(total_steps=n, **{"data.train": str(path)})  # noqa: E731
    wd = str(tmp_path / "w")
    train(cfg(2), wd)
    path.write_text("".join(rows[:30]))
    with pytest.raises(UserError, match=r"data_fingerprint: .* -> .*\n.*the data file\(s\) changed, or moved"):
        train(cfg(3), wd)
    path.write_text("".join(rows[:40]))
    train(cfg(3), wd)  # the original data again: resumes
    assert [m["step"] for m in _metrics(wd) if "loss" in m] == [1, 2, 3]


def test_rerun_of_a_finished_run_without_its_export_writes_it(tmp_path):
    wd = str(tmp_path / "w")
    train(_cfg(total_steps=2), wd)
    assert not os.path.exists(os.path.join(wd, "export"))
    train(_cfg(total_steps=2, export=True), wd)
    assert os.path.exists(os.path.join(wd, "export", "model.safetensors"))


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    import signal

    wd = str(tmp_path / "int")
    env = dict(os.environ, XLA_FLAGS=os.environ.get("TEST_XLA_FLAGS", ""), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-m", "align_jax.main", "--config=configs/dpo.py:tiny", f"--workdir={wd}",
         "--config.total_steps=100000", "--config.checkpoint.every_steps=100000", "--config.data.eval=",
         "--config.data.length_buckets=(64,)", "--config.progress_bar=False"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = interrupt_and_check(proc, wd, signal.SIGINT, 130)
    assert "SIGINT: checkpoint saved at step" in err and "Traceback" not in err
