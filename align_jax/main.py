"""Entry point: parses flags and calls `train(config, workdir)`.

    python -m align_jax.main --config=configs/dpo.py --workdir=/tmp/run --config.optimizer.learning_rate=5e-7
    python -m align_jax.main --config=configs/dpo.py --print_config     # every key, its value and its comment

A mistake in the data, the config, a path or a checkpoint is reported as one `error: ...` line (exit status 2);
`--verbose` (or ALIGN_JAX_VERBOSE=1) also shows the traceback and the libraries' INFO logs.

Several processes (one per host) train one model when the environment says so (`launch_tpu.sh` sets it):
    ALIGN_JAX_COORDINATOR=host:port ALIGN_JAX_NUM_PROCESSES=N ALIGN_JAX_PROCESS_ID=i [ALIGN_JAX_LOCAL_DEVICES=D]
    ALIGN_JAX_DISTRIBUTED=auto       Cloud TPU slices and SLURM (jax.distributed.initialize() detects the cluster)
    ALIGN_JAX_DISTRIBUTED=torchrun   MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK (ALIGN_JAX_COORDINATOR overrides
                                     the address, e.g. under torchrun itself, whose agent holds MASTER_PORT)
ALIGN_JAX_LOCAL_DEVICES=D gives this process D CPU devices (--xla_force_host_platform_device_count), also alone.
"""

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from align_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:arg]); override any key with --config.<key>=<value>.",
    lock_config=False, accept_new_attributes=True)  # new keys only under loss.kwargs / rewards.kwargs (checked)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the exported model.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config (every key, its value and "
                                  "its comment) and exit.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Tracebacks for user errors, and the libraries' INFO logs.")


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]} (flags are --name=value)", file=sys.stderr)
        sys.exit(2)
    verbose = _VERBOSE.value or cli.verbose_from_env()
    cli.console(verbose)

    def go():
        if _CONFIG.value is None:
            raise cli.UserError("--config is required, e.g. --config=configs/dpo.py (see README.md)")
        config_arg = flags.FLAGS["config"].config_filename
        cli.check_override_keys(config_arg, flags.FLAGS["config"].override_values)
        if _PRINT_CONFIG.value:
            print(cli.describe(_CONFIG.value, config_arg))
            return
        if not _WORKDIR.value:
            raise cli.UserError("--workdir is required: the directory for checkpoints, logs and the export")
        init_distributed(os.environ)
        from align_jax.train import train

        train(_CONFIG.value, _WORKDIR.value)

    cli.run(go, verbose)


def init_distributed(env) -> None:
    """Joins the multi-process run that `env` describes (see the module docstring); nothing when it describes none.
    Runs before anything touches a JAX device: the device count and the collectives are fixed at backend start."""
    mode = env.get("ALIGN_JAX_DISTRIBUTED", "").strip().lower()
    coord = env.get("ALIGN_JAX_COORDINATOR", "").strip()
    n, i = env.get("ALIGN_JAX_NUM_PROCESSES", "").strip(), env.get("ALIGN_JAX_PROCESS_ID", "").strip()
    if mode not in ("", "auto", "torchrun"):
        raise cli.UserError(f"ALIGN_JAX_DISTRIBUTED={mode!r}: expected auto (Cloud TPU, SLURM) or torchrun "
                            "(MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK), or unset with ALIGN_JAX_COORDINATOR, "
                            "ALIGN_JAX_NUM_PROCESSES and ALIGN_JAX_PROCESS_ID")
    local = env.get("ALIGN_JAX_LOCAL_DEVICES", "").strip()
    if local:
        if not local.isdigit() or int(local) < 1:
            raise cli.UserError(f"ALIGN_JAX_LOCAL_DEVICES={local!r}: expected a number of CPU devices >= 1")
        flags_ = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags_.strip()} --xla_force_host_platform_device_count={local}".strip()
    if not mode and not (coord or n or i):
        return
    if mode and (n or i or (coord and mode == "auto")):
        raise cli.UserError(f"ALIGN_JAX_DISTRIBUTED={mode} takes the processes from the "
                            f"{'cluster' if mode == 'auto' else 'torchrun variables'}: unset ALIGN_JAX_NUM_PROCESSES "
                            "and ALIGN_JAX_PROCESS_ID" + (" and ALIGN_JAX_COORDINATOR" if mode == "auto" else ""))
    if mode == "torchrun":
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK") if not env.get(k, "").strip()]
        if missing:
            raise cli.UserError(f"ALIGN_JAX_DISTRIBUTED=torchrun: {', '.join(missing)} not set")
        coord = coord or f"{env['MASTER_ADDR'].strip()}:{env['MASTER_PORT'].strip()}"
        n, i, names = env["WORLD_SIZE"].strip(), env["RANK"].strip(), ("WORLD_SIZE", "RANK")
    else:
        names = ("ALIGN_JAX_NUM_PROCESSES", "ALIGN_JAX_PROCESS_ID")
    kwargs = {}
    if mode != "auto":
        if not (coord and n and i):
            raise cli.UserError("ALIGN_JAX_COORDINATOR (host:port), ALIGN_JAX_NUM_PROCESSES and ALIGN_JAX_PROCESS_ID "
                                "must be set together")
        host, _, port = coord.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise cli.UserError(f"coordinator address {coord!r}: expected host:port (e.g. 10.0.0.2:8476)")
        if not n.isdigit() or int(n) < 1:
            raise cli.UserError(f"{names[0]}={n!r}: expected a number of processes >= 1")
        if not i.isdigit() or int(i) >= int(n):
            raise cli.UserError(f"{names[1]}={i!r}: expected a process index in 0..{int(n) - 1}")
        kwargs = dict(coordinator_address=coord, num_processes=int(n), process_id=int(i))
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk through gloo
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001  (no cluster detected, coordinator unreachable, a timeout)
        where = (f"process {i} of {n}, coordinator {coord}" if kwargs
                 else "ALIGN_JAX_DISTRIBUTED=auto, which detects Cloud TPU slices and SLURM jobs")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise cli.UserError(f"joining the multi-process run ({where}) failed: {first}") from e


def parse_flags(argv):
    """absl's flag parsing, except that `--help` exits 0 and a bad flag is one `error:` line (exit 2)."""
    if any(a in ("--help", "-h", "-?", "--helpshort", "--helpfull") for a in argv[1:]):
        print(__doc__)
        print(flags.FLAGS.main_module_help())
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001  (flag syntax, unknown --config.<key>, a value of the wrong type)
        if "--verbose" in argv or cli.verbose_from_env():
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}".replace("\n", " "), file=sys.stderr)
        print("(python -m align_jax.main --help; --print_config lists every config key)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
