"""Shared pytest setup: CPU-only, deterministic, fp32 matmuls exact."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
