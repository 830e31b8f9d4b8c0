"""Shared pytest setup: CPU only, and one persistent XLA compilation cache per test session.

The cache lets the many tests (and their subprocesses) that compile the same tiny models reuse
each other's executables; it lives in a fresh temporary folder, so runs never share it.
"""

import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="internlm2_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
sys.path.insert(0, os.path.dirname(__file__))
