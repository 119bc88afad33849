"""launch_tpu.sh: --help, the commands a pod launch runs (--dry-run, and a fake `gcloud` that plays a slice being
preempted), option errors, and `--local 2`: two processes x two CPU devices training DPO through the real
multi-process path of `python -m align_jax.main` (ALIGN_JAX_* environment -> jax.distributed)."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from util import ROOT, SHARED

SCRIPT = os.path.join(ROOT, "launch_tpu.sh")
JAX_VERSION = re.search(r"^jax==(\S+)", open(os.path.join(ROOT, "requirements.txt")).read(), re.M).group(1)
POD = ["--name", "dpo-8b", "--zone", "us-east5-a", "--accelerator-type", "v5p-64"]
RUN = ["--", "--config=configs/dpo.py", "--workdir=gs://bucket/run", "--config.mesh.fsdp=-1"]

# A gcloud that must not be called (dry runs), and one that plays a slice (describe / create / delete / ssh).
NO_GCLOUD = '#!/bin/sh\necho "$@" >> "$FAKE_DIR/called"\nexit 97\n'
FAKE_GCLOUD = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/calls"
case "$*" in
  *"tpu-vm describe"*) [ -s "$FAKE_DIR/state" ] || exit 1; printf '%s\tv5p-64\n' "$(cat "$FAKE_DIR/state")" ;;
  *"tpu-vm create"*) echo READY > "$FAKE_DIR/state" ;;
  *"tpu-vm delete"*) rm -f "$FAKE_DIR/state" ;;
  *"tpu-vm ssh"*align_jax.main*)
    n=$(( $(cat "$FAKE_DIR/runs" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$FAKE_DIR/runs"
    if [ "$n" -le "${FAKE_PREEMPTIONS:-0}" ]; then echo PREEMPTED > "$FAKE_DIR/state"; exit 255; fi ;;
esac
exit 0
"""


def launch(tmp, *args, gcloud=NO_GCLOUD, cwd=None, env=None, timeout=60):
    """Runs launch_tpu.sh in `tmp` (or `cwd`), with `gcloud` on PATH replaced by the given script (in `tmp`)."""
    tmp = str(tmp)
    fake = os.path.join(tmp, "fakebin")
    os.makedirs(fake, exist_ok=True)
    with open(os.path.join(fake, "gcloud"), "w") as f:
        f.write(gcloud)
    os.chmod(os.path.join(fake, "gcloud"), 0o755)
    e = dict(os.environ, PATH=fake + os.pathsep + os.environ["PATH"], FAKE_DIR=tmp, TMPDIR=tmp)
    e.update(env or {})
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, cwd=cwd or tmp, env=e,
                          timeout=timeout)


def lines_with(out, *words):
    return [ln for ln in out.splitlines() if all(w in ln for w in words)]


def test_help_documents_every_option(tmp_path):
    p = launch(tmp_path, "--help")
    assert p.returncode == 0, p.stderr
    for word in ("--dry-run", "--local", "--delete", f"jax[tpu]=={JAX_VERSION}"):
        assert word in p.stdout
    src = open(SCRIPT).read()
    parser = src[src.index("while (($#)); do"):src.index("is_count()")]  # the option parser
    parsed = set(re.findall(r"(--[a-z][a-z-]+)(?=\)| \|)", parser))  # case patterns
    assert {"--spot", "--queued", "--commit", "--max-restarts", "--local-devices"} <= parsed
    assert [o for o in sorted(parsed) if o not in p.stdout] == []


def test_dry_run_prints_the_pod_launch_and_runs_nothing(tmp_path):
    p = launch(tmp_path, "--dry-run", *POD, *RUN)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert not os.path.exists(tmp_path / "called"), "gcloud was run"
    assert sorted(os.listdir(tmp_path)) == ["fakebin"]  # no tarball, no log directory
    cmds = [shlex.split(ln) for ln in out.splitlines()]  # every line is a shell command, quoted
    assert lines_with(out, "gcloud compute tpus tpu-vm describe dpo-8b --zone us-east5-a")
    assert lines_with(out, "gcloud compute tpus tpu-vm create dpo-8b --zone us-east5-a --accelerator-type v5p-64 "
                           "--version v2-alpha-tpuv5")
    assert not lines_with(out, "--spot") and not lines_with(out, "--preemptible")
    assert lines_with(out, "git ls-files", "tar")  # the working tree, packed
    assert lines_with(out, "tpu-vm scp", "align_jax_code.tgz", "dpo-8b:", "--worker=all")
    ssh = {c[c.index("--command") + 1]: c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]}
    assert all("--worker=all" in c for c in ssh.values()) and len(ssh) == 3  # unpack, install, run
    install = [r for r in ssh if "pip install" in r]
    assert len(install) == 1 and "requirements.txt" in install[0] and f"'jax[tpu]=={JAX_VERSION}'" in install[0]
    (remote,) = [r for r in ssh if "align_jax.main" in r]
    words = shlex.split(remote.replace(";", " ; "))
    assert "ALIGN_JAX_DISTRIBUTED=auto" in words and words[words.index("-m") + 1] == "align_jax.main"
    # gs:// paths are the workers' gcsfuse mount; --no-gcsfuse passes them as given.
    assert {"--config=configs/dpo.py", "--config.mesh.fsdp=-1", "--workdir=/tmp/align_jax_gcs/bucket/run"} <= set(words)
    assert "gcsfuse --implicit-dirs" in remote
    p = launch(tmp_path, "--dry-run", "--no-gcsfuse", *POD, *RUN)
    (remote,) = [ln for ln in p.stdout.splitlines() if "align_jax.main" in ln]
    assert "--workdir=gs://bucket/run" in remote and "gcsfuse" not in remote
    assert lines_with(p.stdout, "tpu-vm scp", "dpo-8b:align-jax-logs/*", "--worker=all")  # the logs come back


@pytest.mark.parametrize("flags,expect,absent", [
    (["--spot"], ["tpu-vm create dpo-8b", "--spot"], ["queued-resources"]),
    (["--preemptible", "--project", "p1"], ["tpu-vm create dpo-8b", "--preemptible", "--project p1"], ["--spot"]),
    (["--queued", "--spot"], ["gcloud compute tpus queued-resources create dpo-8b --node-id dpo-8b --zone "
                              "us-east5-a --accelerator-type v5p-64 --runtime-version v2-alpha-tpuv5 --spot"],
     ["tpu-vm create"]),
    (["--version", "v2-alpha-tpuv5-custom", "--commit", "HEAD"], ["--version v2-alpha-tpuv5-custom",
                                                                  f"git -C {ROOT} archive --format=tar.gz"],
     ["ls-files"]),
])
def test_options_change_the_commands(tmp_path, flags, expect, absent):
    p = launch(tmp_path, "--dry-run", *POD, *flags, *RUN)
    assert p.returncode == 0, p.stderr
    for e in expect:
        assert e in p.stdout, (e, p.stdout)
    for a in absent:
        assert a not in p.stdout, (a, p.stdout)


def test_delete_tears_down_and_does_nothing_else(tmp_path):
    p = launch(tmp_path, "--dry-run", "--name", "dpo-8b", "--zone", "us-east5-a", "--delete")
    assert p.returncode == 0 and p.stdout == "gcloud compute tpus tpu-vm delete dpo-8b --zone us-east5-a --quiet\n"
    p = launch(tmp_path, "--dry-run", "--name", "dpo-8b", "--zone", "us-east5-a", "--delete", "--queued")
    assert p.stdout == "gcloud compute tpus queued-resources delete dpo-8b --zone us-east5-a --force --quiet\n"


@pytest.mark.parametrize("args,message", [
    (["--dry-run", "--frobnicate", *POD, *RUN], "unknown option --frobnicate"),
    (["--local", "0", *RUN], "--local 0: expected a number of processes >= 1"),
    (["--local=two", *RUN], "--local two: expected a number of processes >= 1"),
    (["--dry-run", "--spot", "--preemptible", *POD, *RUN], "--spot and --preemptible exclude each other"),
    (["--dry-run", "--zone", "z", "--accelerator-type", "v5p-64", *RUN], "--name is required"),
    (["--dry-run", *POD, "--", "--config=configs/dpo.py"], "no workdir"),
    (["--dry-run", *POD, "--", "--workdir=gs://b/r"], "no --config"),
    (["--dry-run", *POD, "--commit", "no-such-rev", *RUN], "--commit no-such-rev: not a commit"),
    (["--dry-run", "--name"], "--name needs a value"),
])
def test_bad_options_are_one_message(tmp_path, args, message):
    p = launch(tmp_path, *args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], p.stderr
    assert not os.path.exists(tmp_path / "called")


def test_preempted_slice_is_recreated_and_the_run_restarted(tmp_path):
    args = [*POD, "--spot", "--logs-dir", str(tmp_path / "logs"), *RUN]
    p = launch(tmp_path, "--max-restarts", "1", *args, gcloud=FAKE_GCLOUD, env={"FAKE_PREEMPTIONS": "1"})
    assert p.returncode == 0, p.stderr
    calls = open(tmp_path / "calls").read().splitlines()
    kinds = [c.split()[3] if c.split()[2] == "tpu-vm" else c for c in calls]
    runs = [i for i, c in enumerate(calls) if "align_jax.main" in c]
    assert len(runs) == 2 and kinds.count("create") == 2 and kinds.count("delete") == 1
    first, second = runs
    assert calls.index(next(c for c in calls if " delete " in c)) in range(first, second)
    assert "recreating it and resuming (restart 1 of 1)" in p.stderr
    # Without restarts left, the run's failure is the launcher's.
    os.remove(tmp_path / "calls"), os.remove(tmp_path / "runs"), os.remove(tmp_path / "state")
    p = launch(tmp_path, *args, gcloud=FAKE_GCLOUD, env={"FAKE_PREEMPTIONS": "1"})
    assert p.returncode == 255 and "--max-restarts 0 is used up" in p.stderr
    assert sum(" delete " in c for c in open(tmp_path / "calls")) == 0


def test_distributed_environment_errors_are_one_message(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALIGN_JAX_COORDINATOR="127.0.0.1:1234", ALIGN_JAX_NUM_PROCESSES="2",
               ALIGN_JAX_PROCESS_ID="2")
    p = subprocess.run([sys.executable, "-m", "align_jax.main", "--config=configs/dpo.py:tiny",
                        f"--workdir={tmp_path}/w"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1] == "error: ALIGN_JAX_PROCESS_ID='2': expected a process index in 0..1"
    cases = {  # env -> the message
        "ALIGN_JAX_DISTRIBUTED=slurm": "ALIGN_JAX_DISTRIBUTED='slurm': expected auto",
        "ALIGN_JAX_COORDINATOR=h:1": "must be set together",
        "ALIGN_JAX_COORDINATOR=h ALIGN_JAX_NUM_PROCESSES=2 ALIGN_JAX_PROCESS_ID=0": "coordinator address 'h': expected",
        "ALIGN_JAX_COORDINATOR=h:1 ALIGN_JAX_NUM_PROCESSES=0 ALIGN_JAX_PROCESS_ID=0": "ALIGN_JAX_NUM_PROCESSES='0'",
        "ALIGN_JAX_COORDINATOR=h:1 ALIGN_JAX_NUM_PROCESSES=1 ALIGN_JAX_PROCESS_ID=0 ALIGN_JAX_LOCAL_DEVICES=x":
            "ALIGN_JAX_LOCAL_DEVICES='x'",
        "ALIGN_JAX_DISTRIBUTED=auto ALIGN_JAX_PROCESS_ID=0": "unset ALIGN_JAX_NUM_PROCESSES",
        "ALIGN_JAX_DISTRIBUTED=torchrun MASTER_ADDR=h": "MASTER_PORT, WORLD_SIZE, RANK not set",
        "ALIGN_JAX_DISTRIBUTED=torchrun MASTER_ADDR=h MASTER_PORT=1 WORLD_SIZE=2 RANK=2": "RANK='2'",
    }
    # In a subprocess: importing align_jax.main defines absl flags, which other tests' modules define too.
    code = """if True:
        import json, sys
        from align_jax.main import init_distributed
        from align_jax.errors import UserError
        out = {}
        for k in json.loads(sys.argv[1]):
            try:
                init_distributed(dict(x.split("=", 1) for x in k.split()))
                out[k] = "no error"
            except UserError as e:
                out[k] = str(e)
        print(json.dumps(out))
    """
    p = subprocess.run([sys.executable, "-c", code, json.dumps(list(cases))], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    got = json.loads(p.stdout)
    for k, msg in cases.items():
        assert msg in got[k], (k, got[k])
    assert "no error" not in got.values()


def test_local_failure_stops_the_other_processes(tmp_path):
    """Process 0 fails at once, process 1 would run for minutes: the launcher stops it and exits with 0's status."""
    py = tmp_path / "py"
    py.write_text(f'#!/bin/sh\n[ "$1" = -c ] && exec {sys.executable} "$@"\n'
                  f'echo "process $ALIGN_JAX_PROCESS_ID of $ALIGN_JAX_NUM_PROCESSES at $ALIGN_JAX_COORDINATOR"\n'
                  '[ "$ALIGN_JAX_PROCESS_ID" = 0 ] && sleep 1 && exit 3\necho $$ > "$FAKE_DIR/pid1"\nexec sleep 300\n')
    py.chmod(0o755)
    p = launch(tmp_path, "--local", "2", "--python", str(py), "--", "--config=configs/dpo.py",
               f"--workdir={tmp_path}/w")
    assert p.returncode == 3, p.stderr
    assert "process 0 exited with status 3: stopping the others" in p.stderr
    assert open(tmp_path / "w/logs/process_0.log").read().startswith("process 0 of 2 at 127.0.0.1:")
    with pytest.raises(ProcessLookupError):
        os.kill(int(open(tmp_path / "pid1").read()), 0)


def test_local_two_processes_train_dpo(tmp_path):
    """`--local 2`: 2 processes x 2 CPU devices, one 4-device mesh; metrics of steps 1-2 and one checkpoint with
    each process's data position. (The multi-process tests of the trainer itself: test_multihost*.py.)"""
    from align_jax.data import build_dataset
    from align_jax.data.toy import generate

    toy = os.path.join(SHARED, "toy")
    if not os.path.exists(os.path.join(toy, "eval_pairs.jsonl")):
        generate(toy, seed=0)
    # Built here, once: processes sharing a data_dir would race on building it.
    build_dataset([os.path.join(toy, "pairs.jsonl")], kind="pairwise", data_dir=str(tmp_path / "tfds"))
    work, tmpdir = tmp_path / "run", os.environ.get("TMPDIR", "/tmp")
    # No eval and no export, one length bucket: one compiled step (the whole test is the 2-process start-up).
    p = launch(tmp_path, "--local", "2", "--local-devices", "2", "--python", sys.executable, "--",
               "--config=configs/dpo.py:tiny", f"--workdir={work}", "--config.total_steps=2",
               "--config.checkpoint.every_steps=2", f"--config.data.toy_dir={toy}",
               f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.data.eval=", "--config.export=False",
               "--config.data.length_buckets=(64,)", cwd=ROOT, timeout=600,
               env={"TMPDIR": tmpdir, "JAX_COMPILATION_CACHE_DIR": os.path.join(tmpdir, "align_jax_jit_cache"),
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    logs = {i: (work / "logs" / f"process_{i}.log") for i in (0, 1)}
    assert p.returncode == 0, p.stderr + "".join(f.read_text()[-3000:] for f in logs.values() if f.exists())
    assert all(f.exists() for f in logs.values())
    assert "over 4 cpu devices (2 processes)" in logs[0].read_text()
    assert "building dataset" not in logs[0].read_text() + logs[1].read_text()
    metrics = [json.loads(x) for x in open(work / "metrics.jsonl")]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]  # process 0 alone writes the log
    assert sorted(os.listdir(work / "checkpoints")) == ["2"]  # one checkpoint holds the global state
    # each process saved its own data-iterator position next to it, the same place of its own shard
    data = sorted(os.listdir(work / "checkpoints" / "2" / "data"))
    assert [f for f in data if f.startswith("process_")] == ["process_0-of-2.json", "process_1-of-2.json"]
    states = [json.load(open(work / "checkpoints" / "2" / "data" / f)) for f in data if f.startswith("process_")]
    assert states[0] == states[1] and states[0]
