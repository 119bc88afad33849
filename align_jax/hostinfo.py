"""Where a result was computed: the host's CPU (model, the instruction-set extensions that decide which XLA:CPU
kernels run and so the last bits of a float result), the CPUs usable and the jax backend. Recorded with every run
(`config.json`'s `_provenance`), experiment result and benchmark, because the same code and packages give other
numbers on another CPU (README, "Rechecked on 2026-12-01"). No heavy imports: jax only inside `host_record`."""

from __future__ import annotations

import os
import platform
import re


# Instruction-set extensions that change which XLA:CPU kernels run, and so the last bits of a float result (the
# toy pipeline's numbers differ between an AVX-512 host and one without: README, "Rechecked on 2026-12-01").
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_summary(cpuinfo: str) -> dict:
    """The CPU's model name and which of `_ISA_FLAGS` it has, parsed from the text of /proc/cpuinfo."""
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    have = set(flags.group(1).split()) if flags else set()
    return {"cpu": model.group(1).strip() if model else platform.processor() or None,
            "cpu_isa": [f for f in _ISA_FLAGS if f in have]}


def host_record(with_jax: bool = True) -> dict:
    """Where a result was computed: CPU model and instruction-set extensions, CPUs usable, and (`with_jax`: this
    imports jax and starts its backend) the jax backend and devices."""
    try:
        with open("/proc/cpuinfo") as f:
            info = cpu_summary(f.read())
    except OSError:  # not Linux
        info = {"cpu": platform.processor() or None, "cpu_isa": None}
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {**info, "cpus_usable": usable}
    if with_jax:
        import jax

        out.update(backend=jax.default_backend(), devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}")
    return out


def describe(h: dict) -> str:
    """A `host_record` as one line: "host: <cpu>, <n> usable CPUs, <extensions>[; jax: <devices>]"."""
    n = h["cpus_usable"]
    devices = f"; jax: {h['devices']}" if "devices" in h else ""
    isa = h["cpu_isa"]
    isa = ", ".join(isa) if isa else "instruction sets unknown" if isa is None else "no AVX2/FMA/AVX-512/AMX"
    return f"host: {h['cpu']}, {n} usable CPU{'s' if n != 1 else ''}, {isa}{devices}"


def host_line(with_jax: bool = False) -> str:
    """One line for a benchmark's output: `describe(host_record(with_jax))` and the load average (1, 5, 15 min)."""
    return describe(host_record(with_jax)) + "; load " + " ".join(f"{x:.1f}" for x in os.getloadavg())
