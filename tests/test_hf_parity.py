"""Logit parity of load_hf'd params against transformers' LlamaForCausalLM (PyTorch, fp32)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import internlm2_jax as ij  # noqa: E402
from hf_fixtures import (  # noqa: E402
    TINY_HF,
    random_hf_tensors,
    torch_llama,
    torch_llama_from_config,
    write_hf_checkpoint,
)


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


@pytest.mark.parametrize("kind,factor", [("dynamic", 2.0), ("linear", 3.0)])
def test_transformers5_written_config(tmp_path, kind, factor):
    """A config.json as transformers 5 writes it (`rope_parameters`, no `rope_scaling`, no top-level θ)."""
    from transformers import LlamaConfig

    lc = LlamaConfig(**{k: TINY_HF[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "num_key_value_heads",
                                                "max_position_embeddings", "rms_norm_eps")},
                     rope_parameters={"rope_type": kind, "factor": factor, "rope_theta": 5000.0})
    lc.save_pretrained(tmp_path / "written")
    written = json.load(open(tmp_path / "written" / "config.json"))
    assert "rope_scaling" not in written and "rope_theta" not in written  # transformers 5's spelling
    cfg = {**written, "model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"], "bias": False}
    tensors = random_hf_tensors(TINY_HF, seed=8)
    write_hf_checkpoint(str(tmp_path / "ckpt"), cfg, tensors)
    config, params = ij.load_hf(tmp_path / "ckpt", dtype="float32")
    assert (config.rope_theta, config.rope_scaling_dict) == (5000.0, {"type": kind, "factor": factor})
    model = torch_llama_from_config(lc, TINY_HF, tensors)
    tokens = np.random.default_rng(4).integers(0, TINY_HF["vocab_size"], (1, 57))  # > max_position_embeddings
    ours = np.asarray(ij.forward(config, params, jnp.asarray(tokens)))
    assert np.abs(ours - _torch_logits(model, tokens)).max() <= 1e-4


def test_saved_config_reads_the_same_in_transformers5(tmp_path):
    """save_hf / save_hf_llama write θ and scaling in both spellings; transformers 5 reads the meaning back."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {**TINY_HF, "rope_theta": 5000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    tensors = random_hf_tensors(cfg, seed=9)
    write_hf_checkpoint(str(tmp_path / "src"), cfg, tensors)
    config, params = ij.load_hf(tmp_path / "src")
    ij.save_hf(config, params, tmp_path / "internlm2")
    saved = json.load(open(tmp_path / "internlm2" / "config.json"))
    assert saved["rope_scaling"] == {"type": "dynamic", "factor": 2.0}  # InternLM2Config validates two fields
    assert saved["rope_parameters"] == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5000.0}
    assert saved["rope_theta"] == 5000.0 and saved["torch_dtype"] == saved["dtype"] == "float32"
    assert ij.ModelConfig.from_hf(saved) == ij.ModelConfig.from_hf(cfg)
    ij.save_hf_llama(config, params, tmp_path / "llama")
    read = LlamaConfig.from_pretrained(str(tmp_path / "llama"))
    assert {k: read.rope_parameters[k] for k in ("rope_type", "factor", "rope_theta")} == {
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 5000.0}
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "llama"), attn_implementation="eager").eval()
    tokens = np.random.default_rng(5).integers(0, TINY_HF["vocab_size"], (1, 50))
    ours = np.asarray(ij.forward(config, params, jnp.asarray(tokens)))
    assert np.abs(ours - _torch_logits(model, tokens)).max() <= 1e-4
