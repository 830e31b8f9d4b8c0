"""Logit parity of load_hf'd params against transformers' LlamaForCausalLM (PyTorch, fp32)."""


import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import internlm2_jax as ij  # noqa: E402
from hf_fixtures import TINY_HF, random_hf_tensors, torch_llama, write_hf_checkpoint  # noqa: E402


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.numpy()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_transformers_llama(tmp_path, scan_layers):
    tensors = random_hf_tensors(TINY_HF, seed=1)
    write_hf_checkpoint(str(tmp_path), TINY_HF, tensors, shards=2)
    config, params = ij.load_hf(tmp_path, dtype="float32", scan_layers=scan_layers)
    assert config.num_groups == 4
    tokens = np.random.default_rng(0).integers(0, TINY_HF["vocab_size"], (2, 24))
    ours = np.asarray(ij.forward(config, params, jnp.asarray(tokens)))
    ref = _torch_logits(torch_llama(TINY_HF, tensors), tokens)
    assert np.abs(ours - ref).max() <= 1e-4


def test_dynamic_ntk_beyond_max_position(tmp_path):
    cfg = {**TINY_HF, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    tensors = random_hf_tensors(cfg, seed=2)
    write_hf_checkpoint(str(tmp_path), cfg, tensors)
    config, params = ij.load_hf(tmp_path, dtype="float32")
    model = torch_llama(cfg, tensors, rope_scaling=cfg["rope_scaling"])
    rng = np.random.default_rng(1)
    for length in (20, 57):  # below and above max_position_embeddings (32)
        tokens = rng.integers(0, cfg["vocab_size"], (1, length))
        ours = np.asarray(ij.forward(config, params, jnp.asarray(tokens)))
        ref = _torch_logits(model, tokens)
        assert np.abs(ours - ref).max() <= 1e-4, length
    # Scaling must matter above max_pos: without it the logits differ.
    plain = ij.forward(ij.ModelConfig.from_hf(TINY_HF, dtype="float32", param_dtype="float32"), params,
                       jnp.asarray(tokens))
    assert np.abs(np.asarray(plain) - ref).max() > 1e-3


def test_linear_rope_scaling(tmp_path):
    cfg = {**TINY_HF, "rope_scaling": {"type": "linear", "factor": 4.0}}
    tensors = random_hf_tensors(cfg, seed=3)
    write_hf_checkpoint(str(tmp_path), cfg, tensors)
    config, params = ij.load_hf(tmp_path, dtype="float32")
    tokens = np.random.default_rng(2).integers(0, cfg["vocab_size"], (1, 40))
    ref = _torch_logits(torch_llama(cfg, tensors, rope_scaling=cfg["rope_scaling"]), tokens)
    assert np.abs(np.asarray(ij.forward(config, params, jnp.asarray(tokens))) - ref).max() <= 1e-4


def test_llama_export_loads_in_transformers(tmp_path):
    from transformers import LlamaForCausalLM

    tensors = random_hf_tensors(TINY_HF, seed=4)
    write_hf_checkpoint(str(tmp_path / "src"), TINY_HF, tensors)
    config, params = ij.load_hf(tmp_path / "src", dtype="float32")
    ij.save_hf_llama(config, params, tmp_path / "llama")
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "llama"), torch_dtype=torch.float32,
                                             attn_implementation="eager").eval()
    tokens = np.random.default_rng(3).integers(0, TINY_HF["vocab_size"], (2, 16))
    ours = np.asarray(ij.forward(config, params, jnp.asarray(tokens)))
    assert np.abs(ours - _torch_logits(model, tokens)).max() <= 1e-4
