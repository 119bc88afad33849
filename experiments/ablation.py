"""What every paper-ablation script in experiments/ shares: one cached run per grid cell, CSV of every run, mean ± std
over seeds, the compile cache, the command line. Plotting and the paper-specific analysis stay in each script.

    import ablation as ab
    res = ab.cached_run(run_dir, signature, lambda: {...})   # skipped when done with the same signature
    ab.write_csv(path, rows, fields)
    agg = ab.aggregate(rows, by=("method", "eps"), keys=("gold_reward",))   # {(m, e): {key: (mean, std, n)}}
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")


def write_json_atomic(path: str, obj) -> None:
    with open(f"{path}.{os.getpid()}.tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(f"{path}.{os.getpid()}.tmp", path)


def write_jsonl_atomic(path: str, records: list[dict]) -> None:
    with open(f"{path}.{os.getpid()}.tmp", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(f"{path}.{os.getpid()}.tmp", path)


def write_csv(path: str, rows: list[dict], fields: list[str]) -> None:
    """Every run as a row (missing fields empty), written atomically: an interrupted experiment never leaves half."""
    with open(f"{path}.{os.getpid()}.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows([{k: r.get(k, "") for k in fields} for r in rows])
    os.replace(f"{path}.{os.getpid()}.tmp", path)


def cached_run(run_dir: str, signature: dict, compute, *, keep_export: bool = True) -> dict:
    """`compute()` once per cell: its result is stored in <run_dir>/result.json with `signature` (what the numbers
    depend on besides the run's name) and read back on a rerun. A finished run with another signature is refused
    (align_jax.errors.UserError): a rerun with other settings must not reuse it. Checkpoints of a finished run are
    deleted (an interrupted one resumes from them); its export is kept unless `keep_export=False`."""
    from align_jax.errors import UserError

    done = os.path.join(run_dir, "result.json")
    sig = json.loads(json.dumps(signature))  # tuples -> lists, as read back
    if os.path.exists(done):
        with open(done) as f:
            res = json.load(f)
        if res.get("signature") != sig:
            raise UserError(f"{run_dir} holds a finished run with other settings ({res.get('signature')}, now "
                            f"{sig}): use another --workdir")
        return res
    os.makedirs(run_dir, exist_ok=True)
    res = dict(compute())
    res["signature"] = sig
    write_json_atomic(done, res)
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    if not keep_export:
        shutil.rmtree(os.path.join(run_dir, "export"), ignore_errors=True)
    return res


def mean_std(values) -> tuple[float, float, int]:
    """(mean, sample std with ddof 1 (0 for one value), n), NaNs excluded."""
    v = np.asarray([float(x) for x in values], np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def fmt(ms: tuple[float, float, int], digits: int = 3) -> str:
    """'mean ± std' (or the mean alone for one seed)."""
    mean, std, n = ms
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def aggregate(rows: list[dict], by: tuple[str, ...], keys: tuple[str, ...], seed_key: str = "seed") -> dict:
    """{cell: {key: (mean, std, n), "seeds": {seed: row}}} with cell = the tuple of `by` values of a row (values
    converted with float() when they parse as numbers, so 0.4 and "0.4" are one cell)."""

    def norm(x):
        try:
            return float(x)
        except (TypeError, ValueError):
            return x

    cells: dict = {}
    for r in rows:
        cells.setdefault(tuple(norm(r[k]) for k in by), []).append(r)
    out = {}
    for cell, rs in cells.items():
        rs = sorted(rs, key=lambda r: int(r[seed_key]))
        d = {"seeds": {int(r[seed_key]): r for r in rs}}
        for k in keys:
            d[k] = mean_std(r[k] for r in rs)
        out[cell] = d
    return out


def use_compile_cache(wd: str) -> None:
    """Many same-shaped runs: compile their steps once (JAX's persistent cache in <wd>/jax_cache) unless the user
    set JAX_COMPILATION_CACHE_DIR."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.join(wd, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def parallel_cells(jobs: int, wd: str) -> None:
    """Runs this script's grid in `jobs` child processes (0: one per CPU this process may use), one CPU each:
    child i runs the same command with `--shard=i/jobs --jobs=1 --threads=0`, pinned to the i-th CPU this machine
    has (ALIGN_JAX_PIN_CPU), and computes the grid's cells i, i + jobs, ... (`in_shard`). The caller has run the
    shared stages (SFT, a shared reward model) first; the children's cells land in the workdir's cache, so the
    caller's own pass afterwards only reads them and writes the report. Each run still computes on one core, so
    the numbers are those of a `--jobs=1` run (XLA:CPU gives the same bits on core 0 and core 1;
    `align_jax.cli.pin_threads`). A failed child stops the experiment, naming its log."""
    import subprocess

    from align_jax.errors import UserError

    if jobs < 0:
        raise UserError(f"--jobs={jobs}: use a number of processes >= 1, or 0 for one per CPU")
    cpus = sorted(_all_cpus())
    jobs = min(jobs, len(cpus)) if jobs > 0 else len(cpus)
    if jobs <= 1:
        return
    argv = [a for a in sys.argv[1:] if not a.startswith(("--shard", "--jobs", "--threads"))]
    procs = []
    for i in range(jobs):
        cmd = [sys.executable, sys.argv[0], *argv, f"--shard={i}/{jobs}", "--jobs=1", "--threads=0"]
        log = open(os.path.join(wd, f"jobs_{i}.log"), "w")
        # pinned by the child itself (`cli.pin_threads` reads ALIGN_JAX_PIN_CPU before jax starts): no code runs
        # between fork and exec in this multithreaded process
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                       env=dict(os.environ, ALIGN_JAX_PIN_CPU=str(cpus[i]))), log))
        print(f"cells {i}::{jobs}: child {i} on CPU {cpus[i]} (log {log.name})", flush=True)
    failed = []
    for proc, log in procs:
        proc.wait()
        log.close()
        if proc.returncode:
            with open(log.name, errors="replace") as f:  # the child's own one-line message, if it gave one
                said = [x.strip() for x in f if x.startswith("error: ")]
            failed.append((said[-1][len("error: "):] + f" (log {log.name})") if said else
                          f"exit {proc.returncode}, log {log.name}")
    if failed:
        raise UserError("a parallel job failed: " + "; ".join(dict.fromkeys(failed)))


def in_shard(index: int, shard: str) -> bool:
    """Whether cell `index` of the grid (in the script's loop order) is this process's: shard "i/n" takes
    i, i + n, ...; "" takes every cell."""
    if not shard:
        return True
    i, n = (int(x) for x in shard.split("/"))
    return index % n == i


def _all_cpus() -> set:
    """Every CPU this process may be moved to (its cgroup's, not only its current affinity, which --threads may
    have narrowed)."""
    try:
        with open("/sys/fs/cgroup/cpuset.cpus.effective") as f:
            text = f.read().strip()
    except OSError:
        text = ""
    if not text:
        return set(range(os.cpu_count() or 1))
    cpus = set()
    for part in text.split(","):
        a, _, b = part.partition("-")
        cpus.update(range(int(a), int(b or a) + 1))
    return cpus


def command_line() -> str:
    """The command that produced the results (for results.json / results.md)."""
    return " ".join(["python"] + sys.argv)


def load_config(name: str, wd: str, seed: int):
    """configs/<name>.py's default config reading the toy task from <wd>/toy_data and building its TFDS datasets in
    <wd>/tfds (shared by every run of an experiment), with config.seed = seed."""
    from align_jax.cli import load_config_file

    c = load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))
    c.seed = seed
    c.data.toy_dir, c.data.data_dir = os.path.join(wd, "toy_data"), os.path.join(wd, "tfds")
    return c
