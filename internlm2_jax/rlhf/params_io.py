"""Save / load plain param trees as msgpack (small RLHF artifacts: RM and actor params)."""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import serialization


def save_params(path: str, params: Any) -> None:
    """Writes `params` (boxed or plain) to `path` (msgpack)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, nn.meta.unbox(params))))


def load_params(path: str) -> Any:
    """Reads a param tree written by `save_params` (numpy leaves)."""
    with open(path, "rb") as f:
        return serialization.msgpack_restore(f.read())
