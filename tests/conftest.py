"""Test-session settings shared by every test module.

- One persistent JAX compilation cache for the whole session, in a temporary folder removed at the end:
  the many small training runs (in-process, and the `segjax train` subprocesses, which inherit
  $SEGJAX_COMPILATION_CACHE) compile the same steps at the same shapes, and load them from there after the
  first. Nothing is written under ~/.cache. tests/test_compilation_cache.py points the cache at a folder of
  its own, so its first run really compiles.
- XLA compiles with its cheap LLVM passes (see XLA_FLAGS below), and pytest-xdist runs the files on
  `-n auto` workers (one per core), which share the cache.
- Markers (pyproject.toml): `slow` (a full-width network's compile), `e2e` (a `segjax` subprocess or a whole training
  run), `onnx` (needs the `export` extra). `pytest -m "not slow and not e2e"` is the inner loop.
- The ONNX tests run where jax2onnx and onnxruntime are installed (.ci/test-onnx makes such an
  environment); elsewhere they are deselected, and the header says so: never skipped and counted.
"""
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile

import pytest

# pytest-xdist workers inherit the controller's folder through the environment, so they share one cache.
_WORKER = "PYTEST_XDIST_WORKER" in os.environ
_CACHE = os.environ["SEGJAX_COMPILATION_CACHE"] if _WORKER else tempfile.mkdtemp(prefix="segjax-test-jax-cache-")
os.environ["SEGJAX_COMPILATION_CACHE"] = _CACHE
# Cache every program, not only those over segjax's 0.2 s threshold: a tiny training subprocess compiles ~45
# small helpers (about 1 of its 5 s), the same in every run of the session.
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
# Compile with LLVM's cheap passes only: the same HLO programs, less optimised machine code. At the tests' tiny
# sizes compiling dominates; the model-family tests take about 30% less time. Benchmarks and user runs keep
# XLA's defaults, as does SEGJAX_TEST_XLA_DEFAULTS=1. (Read when the CPU backend starts, in this process and in
# the subprocesses that inherit it.)
_CHEAP_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if _CHEAP_COMPILE not in os.environ.get("XLA_FLAGS", "") and not os.environ.get("SEGJAX_TEST_XLA_DEFAULTS"):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CHEAP_COMPILE}".strip()

if _WORKER:
    # One OpenMP thread per xdist worker (PyTorch's and BLAS's pools): with one worker per core, a pool as wide
    # as the machine in each worker only spins waiting for the other worker's core.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"


def _onnx_runtime_missing() -> list[str]:
    return [m for m in ("jax2onnx", "onnxruntime", "onnx") if importlib.util.find_spec(m) is None]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def pytest_configure(config):
    import jax

    # The pytest process itself: the same cache (segjax's CLI entry points turn it on themselves).
    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_enable_compilation_cache", True)
    # In process, JAX's in-memory caches already serve repeats; only what compiles slowly is worth writing.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 8 (each worker holds its own compiled programs, a few GB)."""
    return max(1, min(os.cpu_count() or 1, 8))


def pytest_unconfigure(config):
    if not _WORKER:
        shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_report_header(config):
    versions = ", ".join(f"{d} {_version(d)}" for d in ("jax", "flax", "orbax-checkpoint", "optax", "grain", "torch"))
    missing = _onnx_runtime_missing()
    onnx = ("ONNX tests: run (export extra installed)" if not missing else
            f"ONNX tests: deselected ({', '.join(missing)} not installed; .ci/test-onnx runs them)")
    return [f"segjax test versions: {versions}", onnx, f"JAX compilation cache for this session: {_CACHE}"]


def pytest_collection_modifyitems(config, items):
    missing = _onnx_runtime_missing()
    if not missing:
        return
    onnx = [item for item in items if item.get_closest_marker("onnx")]
    if not onnx:
        return
    if "onnx" in (config.getoption("markexpr") or "") and "not onnx" not in config.getoption("markexpr"):
        raise pytest.UsageError(f"-m onnx needs the export extra ({', '.join(missing)} not installed): "
                                "pip install -e '.[export]', or run .ci/test-onnx")
    config.hook.pytest_deselected(items=onnx)
    items[:] = [item for item in items if not item.get_closest_marker("onnx")]
