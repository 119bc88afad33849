"""Multi-host checkpoints (issue 12, items 2 and 4): local processes joined by `jax.distributed` on 127.0.0.1
(CPU collectives via gloo), each with its own virtual CPU devices.

1. kill -9: one process of a 2-process x 2-device DPO run is SIGKILLed once the checkpoint of step 2 is
   committed, the other is killed as a launcher would; both restart on the same workdir, resume from step 2
   and log the same losses and end with the same parameters and optimizer state, bit for bit, as an
   uninterrupted 2-process run.
2. A checkpoint saved by 2 processes x 4 devices (fsdp=8) restores on 1 process x 2 devices (fsdp=2), and one
   saved by 1 process x 2 devices restores on 2 processes x 4 devices: identical parameter and optimizer-state
   values in the new mesh's shardings, the data iterator at the same place of the global stream (the resumed
   step's loss equals the saving run's own next step).
3. A Hugging Face directory loads straight into its shardings on a 2-process mesh: each process's devices hold
   their slices of the 1-process load's values, and no more, and reads only those blocks from the file.

The worker jobs start at once (module fixture) and the tests wait for the ones they read."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from util import ROOT, SHARED

HF_DIR = os.path.join(ROOT, "tests", "fixtures", "hf", "llama")

WORKER = r"""
import json, os, shutil, signal, sys, time
n, i, devices, addr, tests, job, tmp = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                                        sys.argv[5], sys.argv[6], sys.argv[7])
os.environ["XLA_FLAGS"] = os.environ.get("TEST_XLA_FLAGS", "") + " --xla_force_host_platform_device_count=%d" % devices
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
if n > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=i)
assert jax.process_count() == n and jax.device_count() == n * devices
if n > 1:
    # Speed only: JAX writes compiled programs to the persistent cache from process 0 alone, and on CPU the other
    # processes' cache keys differ (they hash the local devices), so process 1 would compile every program again in
    # every run (~10 s of CPU per job). It writes its own entries here; best effort, off if JAX's internals change.
    try:
        from jax._src import compilation_cache, compiler
        _cache_write = compiler._cache_write
        def cache_write_any_process(key, seconds, module_name, backend, executable, host_callbacks):
            if i == 0 or host_callbacks or seconds < jax.config.jax_persistent_cache_min_compile_time_secs:
                return _cache_write(key, seconds, module_name, backend, executable, host_callbacks)
            try:
                compilation_cache.put_executable_and_time(key, module_name, executable, backend, int(seconds))
            except Exception:
                pass
        compiler._cache_write = cache_write_any_process
    except (ImportError, AttributeError):
        pass
sys.path.insert(0, tests)
import numpy as np
from jax.experimental import multihost_utils
from util import load_config
from align_jax.train import checkpointing, metrics_io, train


def gathered(tree):
    # {key path: numpy array} of a (multi-host) tree: every process gets the global values
    host = multihost_utils.process_allgather(tree, tiled=True)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(host)[0]}


def dump(name, tree):
    values = gathered(tree)  # collective: every process calls it
    if jax.process_index() == 0:
        np.savez(os.path.join(tmp, name + ".npz"), **values)


logged = []  # (step, loss) of every step this process logged (process 0 alone writes metrics.jsonl)
write = metrics_io.MetricsWriter.write
def record(self, step, m, **kw):
    if "loss" in m:
        logged.append([int(step), float(m["loss"])])
    return write(self, step, m, **kw)
metrics_io.MetricsWriter.write = record

on_save = {}  # step -> [fn(checkpointer, state)], each called once, after that step's save
save = checkpointing.Checkpointer.save
def hooked_save(self, step, state, data_iter, **kw):
    save(self, step, state, data_iter, **kw)
    for fn in on_save.pop(step, []):
        fn(self, state)
checkpointing.Checkpointer.save = hooked_save

restored = []  # (step, whether every restored array has the sharding of the fresh state) per restore
dump_restored = []  # a name: the next restored state is dumped under it
restore_latest = checkpointing.Checkpointer.restore_latest
def hooked_restore(self, state, data_iter):
    out = restore_latest(self, state, data_iter)
    if out is not None:
        same = all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(state)))
        restored.append([int(out[1]), bool(same)])
        if dump_restored:
            dump(dump_restored.pop(), out[0])
    return out
checkpointing.Checkpointer.restore_latest = hooked_restore


def cfg(fsdp, total_steps):
    # tiny DPO, one compiled step (one length bucket), no eval / export; asynchronous checkpoints (the default)
    return load_config("dpo", "tiny", **{"total_steps": total_steps, "checkpoint.every_steps": 2, "export": False,
                                         "data.eval": "", "eval_generation": 0, "data.length_buckets": (64,),
                                         "mesh.data": 1, "mesh.fsdp": fsdp, "mesh.tensor": 1})


out = {}
if job in ("straight", "killed", "resume"):  # test 1: 2 processes x 2 devices, 4 steps, checkpoints at 2 and 4
    wd = os.path.join(tmp, "straight" if job == "straight" else "killed")
    if job == "killed":
        def die(ckpt, state):
            ckpt.wait()  # both processes have written their part of the checkpoint of step 2
            if jax.process_index() == 1:
                deadline = time.time() + 120
                while not os.path.isdir(os.path.join(ckpt.directory, "2")) and time.time() < deadline:
                    time.sleep(0.05)  # process 0 has committed it (renamed from its temporary name)
                os.kill(os.getpid(), signal.SIGKILL)
        on_save[2] = [die]
    else:
        on_save[4] = [lambda ckpt, state: dump(job, state)]
    train(cfg(4, 4), wd)
    out.update(logged=logged, restored=restored)

if job == "straight":  # test 3: the Hugging Face fixture on the 2-process mesh (after the run: compiles cached)
    import align_jax.models.checkpoint as hf
    from flax import nnx
    from align_jax.parallel import make_mesh

    read = {"bytes": 0, "tensors": 0, "slices": 0}
    real_open = hf.safe_open
    class CountingOpen:  # counts what the loader reads from the safetensors files
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)
        def __enter__(self):
            self.f.__enter__()
            return self
        def __exit__(self, *e):
            return self.f.__exit__(*e)
        def get_tensor(self, name):
            t = self.f.get_tensor(name)
            read["bytes"] += t.nbytes
            read["tensors"] += 1
            return t
        def get_slice(self, name):
            sl = self.f.get_slice(name)
            class Counted:
                def get_shape(self):
                    return sl.get_shape()
                def __getitem__(self, idx):
                    t = sl[idx]
                    read["bytes"] += t.nbytes
                    read["slices"] += 1
                    return t
            return Counted()
        def __getattr__(self, a):
            return getattr(self.f, a)
    hf.safe_open = CountingOpen
    model = hf.load_pretrained(sys.argv[8], mesh=make_mesh(1, -1, 1))
    hf.safe_open = real_open
    shards, specs = {}, {}
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, x = "/".join(map(str, path)), v.get_value()
        specs[name] = [str(x.sharding.spec), sorted(d.process_index for d in x.sharding.mesh.devices.flat)]
        for s in x.addressable_shards:
            idx = ",".join("%d:%d" % sl.indices(dim)[:2] for sl, dim in zip(s.index, x.shape))
            shards[name + "|" + idx] = np.asarray(s.data)
    np.savez(os.path.join(tmp, "hf_%d.npz" % i), **shards)
    out.update(hf_read=read, hf_specs=specs)

if job == "cross":  # test 2: save on this topology, hand a copy over, restore the other topology's copy
    me, other = ("2x4", "1x2") if n == 2 else ("1x2", "2x4")
    wd = os.path.join(tmp, "cross_" + me)
    def hand_over(ckpt, state):
        ckpt.wait()
        dump("saved_" + me, state)  # the state of step 2 as saved
        if jax.process_index() == 0:  # the whole workdir as it is now (checkpoint 2, metrics of steps 1-2)
            shutil.copytree(wd, os.path.join(tmp, "handoff_" + me + ".tmp"))
            os.rename(os.path.join(tmp, "handoff_" + me + ".tmp"), os.path.join(tmp, "handoff_" + me))
    on_save[2] = [hand_over]
    train(cfg(n * devices, 3), wd)  # steps 1-3: step 3 is what a resumed run must log next
    out.update(own=list(logged))
    src = os.path.join(tmp, "handoff_" + other)
    deadline = time.time() + 600
    while not os.path.isdir(src):
        assert time.time() < deadline, "no hand-over from " + other
        time.sleep(0.2)
    del logged[:]
    dump_restored.append("restored_%s_on_%s" % (other, me))
    train(cfg(n * devices, 3), src)  # resumes the other topology's run on this mesh: step 3
    out.update(resumed=list(logged), restored=restored)

print("RESULT", json.dumps(out), flush=True)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """The processes of one multi-process job, each in its own process group, output in files."""

    def __init__(self, tmp, job, n, devices):
        self.name, self.tmp = job, str(tmp)
        addr = f"127.0.0.1:{_free_port()}"
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        self.procs, self.logs = [], []
        for i in range(n):
            log = os.path.join(self.tmp, f"{job}_{n}x{devices}_{i}.log")
            self.logs.append(log)
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-c", WORKER, str(n), str(i), str(devices), addr, os.path.join(ROOT, "tests"),
                     job, self.tmp, HF_DIR], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                    start_new_session=True))

    def log(self, i, chars=4000):
        with open(self.logs[i]) as f:
            return f.read()[-chars:]

    def wait(self, i, timeout=600):
        """Process i's exit status (its whole group is SIGKILLed when it runs past `timeout`)."""
        try:
            return self.procs[i].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} process {i} still running after {timeout} s:\n{self.log(i)}")

    def kill(self, i=None):
        for p in self.procs if i is None else [self.procs[i]]:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=60)

    def results(self, timeout=600):
        """Each process's RESULT (a dict), in process order, once all have exited with status 0."""
        out = []
        for i in range(len(self.procs)):
            rc = self.wait(i, timeout)
            assert rc == 0, f"{self.name} process {i} exited with {rc}:\n{self.log(i)}"
            lines = [x for x in self.log(i, 10**7).splitlines() if x.startswith("RESULT ")]
            assert lines, f"{self.name} process {i} printed no RESULT:\n{self.log(i)}"
            out.append(json.loads(lines[-1][7:]))
        return out


def _results_together(*jobs, timeout=600):
    """`Job.results` of jobs that wait for each other: when any of their processes fails (or they run past
    `timeout`), all are killed at once rather than left waiting for a peer that is gone."""
    deadline = time.time() + timeout
    procs = [(job, i) for job in jobs for i in range(len(job.procs))]
    while any(job.procs[i].poll() is None for job, i in procs):
        failed = [(job, i) for job, i in procs if job.procs[i].poll() not in (None, 0)]
        if failed or time.time() > deadline:
            for job in jobs:
                job.kill()
            job, i = (failed or procs)[0]
            raise AssertionError(f"{job.name} process {i}: exit status {job.procs[i].returncode}:\n{job.log(i)}")
        time.sleep(0.5)
    return [job.results() for job in jobs]


# name -> (worker job, processes, devices per process)
JOBS = {"killed": ("killed", 2, 2), "straight": ("straight", 2, 2), "resume": ("resume", 2, 2),
        "cross_2x4": ("cross", 2, 4), "cross_1x2": ("cross", 1, 2)}


class Jobs(dict):
    """The jobs started so far, by name; a job starts when it is first asked for."""

    def __init__(self, tmp):
        super().__init__()
        self.tmp = tmp

    def __missing__(self, name):
        self[name] = Job(self.tmp, *JOBS[name])
        return self[name]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """(tmp, Jobs). In one pytest process every job but the restart starts at once, the kill -9 run first (its
    restart waits for it); under pytest-xdist, whose workers share out this module's tests, each test starts the
    jobs it reads (no worker runs all of them)."""
    from align_jax.data import build_dataset
    from align_jax.data.toy import generate

    # the shared toy files and their TFDS build exist before several jobs read them at once
    generate(os.path.join(SHARED, "toy"), seed=0)
    build_dataset(os.path.join(SHARED, "toy", "pairs.jsonl"), kind="pairwise", data_dir=os.path.join(SHARED, "tfds"))
    tmp = tmp_path_factory.mktemp("multihost_resume")
    started = Jobs(tmp)
    try:
        if not os.environ.get("PYTEST_XDIST_WORKER"):
            for name in ("killed", "straight", "cross_2x4", "cross_1x2"):
                started[name]
        yield tmp, started
    finally:
        for job in started.values():
            job.kill()


def _npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _assert_same_state(a, b, what):
    assert sorted(a) == sorted(b), what
    assert any("opt_state" in k for k in a) and any("params" in k for k in a), sorted(a)[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (what, k)
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}: {k}")


def test_kill9_of_one_process_then_restart_of_both_resumes_exactly(jobs):
    tmp, started = jobs
    killed, _ = started["killed"], started["straight"]
    # process 1 SIGKILLs itself once both processes have written the checkpoint of step 2
    assert killed.wait(1, timeout=600) == -signal.SIGKILL, killed.log(1)
    ckpts = tmp / "killed" / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts / "2" / "state").is_dir() or any("tmp" in d for d in os.listdir(ckpts)):
        assert time.time() < deadline and killed.procs[0].poll() in (None, 0), \
            f"checkpoint 2 never committed: {os.listdir(ckpts)}\n{killed.log(0)}"
        time.sleep(0.2)
    killed.kill(0)  # process 0 cannot go on without its peer: the launcher kills the rest of the job
    assert sorted(os.listdir(ckpts)) == ["2"]
    logged = [json.loads(x)["step"] for x in open(tmp / "killed" / "metrics.jsonl")]
    assert logged == [1, 2]

    resumed = started["resume"]  # the whole job again, same command, same workdir
    straight, resumed = started["straight"].results(), resumed.results()
    for r in resumed:  # both processes restored step 2 into the run's shardings and logged steps 3 and 4 only
        assert r["restored"] == [[2, True]], r["restored"]
        assert [s for s, _ in r["logged"]] == [3, 4], r["logged"]
    assert straight[0]["restored"] == [] and [s for s, _ in straight[0]["logged"]] == [1, 2, 3, 4]

    def losses(wd):
        rows = [json.loads(x) for x in open(tmp / wd / "metrics.jsonl")]
        assert rows[-1] == {"step": 4, "final": True}, rows[-1]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    want = losses("straight")
    assert [s for s, _ in want] == [1, 2, 3, 4] and want[3][1] != want[2][1]
    assert losses("killed") == want  # steps 1-2 of the killed run, then 3-4 of the restart: exactly equal
    assert [tuple(x) for x in resumed[0]["logged"]] == want[2:]
    _assert_same_state(_npz(tmp / "resume.npz"), _npz(tmp / "straight.npz"), "final state after kill -9")
    assert sorted(os.listdir(tmp / "killed" / "checkpoints")) == ["2", "4"]


def test_checkpoint_restores_onto_another_process_count_and_mesh(jobs):
    tmp, started = jobs
    two, (one,) = _results_together(started["cross_2x4"], started["cross_1x2"])  # each waits for the other's
    for me, other, results in (("2x4", "1x2", two), ("1x2", "2x4", [one])):
        saved = _npz(tmp / f"saved_{other}.npz")
        # the values restored on this topology are the other topology's saved values, exactly
        _assert_same_state(_npz(tmp / f"restored_{other}_on_{me}.npz"), saved, f"{other} -> {me}")
        assert int(saved["['step']"]) == 2
        ref = (two if other == "2x4" else [one])[0]["own"]  # the saving run's own steps 1-3
        assert [s for s, _ in ref] == [1, 2, 3]
        for r in results:
            assert r["restored"] == [[2, True]], (me, r["restored"])  # into this mesh's shardings
            # the resumed step reads the global batch the saving run read at step 3 (the data iterator's place
            # in the global stream carries over to the other process count); other collectives: to 2e-5
            assert [s for s, _ in r["resumed"]] == [3], r["resumed"]
            np.testing.assert_allclose(r["resumed"][0][1], ref[2][1], rtol=2e-5, err_msg=f"{other} -> {me}")
        rows = [json.loads(x) for x in open(tmp / f"handoff_{other}" / "metrics.jsonl")]
        assert [r["step"] for r in rows] == [1, 2, 3, 3] and rows[-1].get("final")
    # the two topologies trained the same run (steps 1-3 to float rounding), but not to identical bits: the
    # comparison above could tell the saved states apart
    np.testing.assert_allclose([x for _, x in two[0]["own"]], [x for _, x in one["own"]], rtol=2e-5)
    a, b = _npz(tmp / "saved_2x4.npz"), _npz(tmp / "saved_1x2.npz")
    assert any(not np.array_equal(a[k], b[k]) for k in a)


def test_hf_checkpoint_loads_into_its_shardings_on_two_processes(jobs):
    from flax import nnx
    from safetensors import safe_open

    from align_jax.models.checkpoint import load_pretrained

    tmp, started = jobs
    results = started["straight"].results()
    ref = {"/".join(map(str, p)): np.asarray(v.get_value())
           for p, v in nnx.to_flat_state(nnx.state(load_pretrained(HF_DIR), nnx.Param))}
    assert len(ref) > 10
    split = 0
    for i in range(2):
        shards = _npz(tmp / f"hf_{i}.npz")
        held = {}
        for key, data in shards.items():
            name, idx = key.split("|")
            index = tuple(slice(*map(int, s.split(":"))) for s in idx.split(",")) if idx else ()
            np.testing.assert_array_equal(data, ref[name][index], err_msg=f"process {i}: {key}")
            held.setdefault(name, np.zeros(ref[name].shape, bool))[index] = True
        assert sorted(held) == sorted(ref)
        for name, mask in held.items():  # each process holds only its half of every FSDP-sharded weight
            spec, devices = results[i]["hf_specs"][name]
            assert devices == [0, 0, 1, 1], devices  # the one global mesh: 2 devices of each process
            if "fsdp" in spec:
                assert mask.mean() == 0.5, (i, name, spec)
                split += 1
            else:
                assert mask.all(), (i, name, spec)
    assert split >= len(ref) // 2
    # What each process reads from disk: only its devices' blocks of each tensor (`_read_slice`), never a whole
    # tensor: half of every FSDP-split weight, plus the small replicated norms once per device.
    with safe_open(os.path.join(HF_DIR, "model.safetensors"), framework="numpy") as f:
        total = sum(f.get_tensor(k).nbytes for k in f.keys())
        count = len(list(f.keys()))
    for r in results:
        assert r["hf_read"]["tensors"] == 0 and r["hf_read"]["slices"] >= count, (r["hf_read"], count)
        assert 0.45 * total < r["hf_read"]["bytes"] < 0.6 * total, (r["hf_read"], total)


def test_data_position_moves_to_another_process_count_or_is_refused(tmp_path):
    """The checkpoint's data-iterator files, read in this (1-process) pytest process: a position saved by 2
    processes is the same place of the global stream at twice the local index; states that are not such a
    position (unequal, or more than an index: e.g. packed SFT rows) are refused instead of resuming elsewhere."""
    from align_jax.train.checkpointing import CheckpointError, Checkpointer

    ckpt = Checkpointer.__new__(Checkpointer)  # the directory is all the helper reads
    ckpt.directory = str(tmp_path)
    data = tmp_path / "2" / "data"
    data.mkdir(parents=True)

    def saved(*states):
        for f in data.iterdir():
            f.unlink()
        for i, s in enumerate(states):
            (data / f"process_{i}-of-{len(states)}.json").write_text(json.dumps(s))
        return ckpt._data_state_from_other_process_count(2)

    assert saved({"next_index": 8}, {"next_index": 8}) == {"next_index": 16}
    assert saved(*[{"next_index": 6}] * 3) == {"next_index": 18}
    assert saved({"next_index": 8}) is None  # this process count's own file: Grain restores it
    for states in (({"next_index": 8}, {"next_index": 4}), ({"next_index": 8, "bins": [1]},) * 2, ({"pos": 1},) * 2):
        with pytest.raises(CheckpointError, match=r"saved by 2 processes .* resume this run with 2 processes"):
            saved(*states)
