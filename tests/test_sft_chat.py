"""The chat CLI end to end with piped stdin: tiny random HF checkpoint + tiny trained tokenizer."""

import os
import subprocess
import sys

import jax

from internlm2_jax import get_preset, init_params, save_hf
from internlm2_jax.data.tokenizer_training import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_chat_cli_piped(tmp_path):
    cfg = get_preset("tiny", dtype="float32")
    save_hf(cfg, jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0)), tmp_path / "ckpt")
    tok = train_tokenizer(["hello there, how are you today? fine thanks."] * 50, str(tmp_path / "t"), vocab_size=384)
    stdin = "hello\nhow are you\n/reset\n/exit\nnever read\n"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.chat", "--hf", str(tmp_path / "ckpt"), "--tokenizer", tok,
         "--dtype", "float32", "--max-new-tokens", "4", "--temperature", "0", "--system", "be brief"],
        input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=240,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("chat ready")
    assert out.count("assistant> ") == 2
    assert "[conversation reset]" in out
    assert "never read" not in out


def test_load_model_from_train_checkpoint(tmp_path):
    import argparse

    import flax.linen as nn
    import numpy as np

    from experiments.chat import load_model
    from internlm2_jax.checkpointing import CheckpointConfig, Checkpointer

    cfg = get_preset("tiny", dtype="float32")
    params = nn.meta.unbox(jax.jit(lambda k: init_params(cfg, k))(jax.random.key(1)))
    ckpt = Checkpointer(str(tmp_path / "run"), CheckpointConfig(async_save=False))
    ckpt.save(3, {"params": params, "step": np.int32(3)})
    ckpt.close()
    args = argparse.Namespace(hf=None, checkpoint=str(tmp_path / "run"), preset="tiny", dtype="float32", step=None)
    got_cfg, got = load_model(args)
    assert got_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, got, params)
