"""Shared pytest setup: CPU only, and one persistent XLA compilation cache per test session.

The cache lets the many tests (and their subprocesses) that compile the same tiny models reuse
each other's executables; it lives in a fresh temporary folder, so runs never share it.
"""

import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="internlm2_jax_xla_cache_"))
if os.environ.get("PYTEST_XDIST_WORKER"):  # one cache per xdist worker: jax writes an entry in place (no temp
    # name + rename), so one worker could read a program the other is still writing.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["JAX_COMPILATION_CACHE_DIR"],
                                                           os.environ["PYTEST_XDIST_WORKER"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
sys.path.insert(0, os.path.dirname(__file__))

import gc  # noqa: E402

import pytest  # noqa: E402


def _release_compiled_programs() -> None:
    import jax
    jax.clear_caches()
    gc.collect()


def _memory_mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no per-process mapping limit to watch
        return 0


@pytest.fixture(scope="module", autouse=True)
def _release_programs_after_module():
    """Drop every compiled program after each test module.

    XLA:CPU maps each executable's code into memory regions of its own, and a worker that keeps the
    programs of hundreds of tests alive crosses Linux's 65530 mappings per process (`vm.max_map_count`);
    the next compile then aborts or segfaults inside LLVM (the CI crashes of 2026-12-01/02). Measured: the
    serving tests alone leave ~16k mappings; with this, a CI worker peaked at 43k.
    """
    yield
    _release_compiled_programs()


@pytest.fixture(autouse=True)
def _release_programs_when_mappings_pile_up():
    """Within a module too, once a test leaves more than 20k mappings (a module of whole training runs)."""
    yield
    if _memory_mappings() > 20_000:
        _release_compiled_programs()


# The released InternLM2 tokenizer files (third-party data, never committed): `.ci/run` points this at
# ../shared/internlm2 when that folder exists; tests that need them skip with this reason otherwise.
ASSETS_ENV = "INTERNLM2_ASSETS"


@pytest.fixture(scope="session")
def released_assets() -> str:
    """Folder with InternLM2's released `tokenizer.model` and the internlm2-chat `tokenizer_config.json`."""
    path = os.environ.get(ASSETS_ENV)
    if not path:
        pytest.skip(f"{ASSETS_ENV} is not set: no released InternLM2 tokenizer files to test against")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        if not os.path.exists(os.path.join(path, name)):
            pytest.skip(f"{ASSETS_ENV}={path} has no {name}")
    return path

# Tests that assert a training outcome (accuracy, reward, loss thresholds) take their seeds from this
# fixture and carry the `outcome` marker, so their margin can be checked across seeds and CPU code paths:
#   for s in 0 1 2; do INTERNLM2_JAX_TEST_SEED=$s XLA_FLAGS=--xla_cpu_max_isa=AVX2 pytest -m outcome; done
SEED_ENV = "INTERNLM2_JAX_TEST_SEED"


@pytest.fixture(scope="session")
def seed() -> int:
    """Base seed of an outcome test (0 unless `INTERNLM2_JAX_TEST_SEED` is set)."""
    return int(os.environ.get(SEED_ENV, "0"))


@pytest.fixture(autouse=True)
def _restore_logging():
    """Entry points called in-process (`main([...])`) configure the root logger (`experiments.cli.setup_logging`);
    put it back so one test's handlers do not print into another's captured stderr."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
