"""Test setup: 8 virtual CPU devices, set before jax is imported anywhere."""
import os

# The suite's programs are tiny and most of its time is compiling them. LLVM's cheapest optimisation level and XLA's
# older (non-MLIR) CPU fusion emitters compile them ~4x faster (30.0 s -> 6.6 s of compilation for
# test_model.py::test_dot_product_attention_equals_einsum_path). Values agree with XLA's default flags to float32
# rounding (element-wise functions such as exp may round differently; the runs a test compares are all compiled with
# these flags). Tests only: `train()` keeps XLA's defaults. Subprocesses that set their own device count read these
# from TEST_XLA_FLAGS.
os.environ.setdefault("TEST_XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                                        "--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " " + os.environ["TEST_XLA_FLAGS"] + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs are cached on disk (also for the subprocesses the tests start: they inherit the environment), so
# that the suite's many small train() runs, in this process, the other xdist worker and the subprocesses, compile
# each identical step once. Every compile is cached (most of the suite's are well under a second, but there are
# thousands): about 60 % of the suite's time is compilation.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.environ.get("TMPDIR", "/tmp"), "align_jax_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The paper ablations' end-to-end `--size=tiny` runs (the `out` fixture of tests/test_<experiment>.py) take 1-2
# minutes each: together they would double the suite's 10-minute budget. They run with `--ablations`
# (README: "Paper ablations"); their pure-function tests always run.
ABLATION_MODULES = {"test_compare_techniques", "test_group_size", "test_length_bias", "test_overoptimization",
                    "test_reward_kl_frontier", "test_label_noise", "test_ipo_vs_dpo"}


def pytest_addoption(parser):
    parser.addoption("--ablations", action="store_true", help="also run the paper ablations' tiny end-to-end runs")


# The longest tests (each 1-4 minutes on 2 cores: several processes, many compiled steps) run first, so that
# pytest-xdist's two workers share them instead of one worker finishing them alone at the end.
FIRST = ("test_parallelism", "test_multihost", "test_multihost_equality", "test_multihost_resume", "test_lora",
         "test_faults", "test_train", "test_packing")


def _module(item) -> str:
    module = getattr(item, "module", None)
    return module.__name__.rsplit(".", 1)[-1] if module is not None else ""


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: FIRST.index(_module(item)) if _module(item) in FIRST else len(FIRST))
    if config.getoption("--ablations"):
        return
    keep, drop = [], []
    for item in items:
        name = _module(item)
        (drop if name in ABLATION_MODULES and "out" in getattr(item, "fixturenames", ()) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
