"""Presets, parameter counts (shapes only), HF config parsing and validation."""

import dataclasses

import pytest

import internlm2_jax as ij
from hf_fixtures import TINY_HF


def _count_by_hand(layers, d, f, h, kv, v=92544, hd=128):
    per_layer = d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f + 2 * d
    return layers * per_layer + 2 * v * d + d


@pytest.mark.parametrize("name,expected,shape", [
    ("internlm2_1_8b", 1_889_110_016, (24, 2048, 8192, 16, 8)),
    ("internlm2_7b", 7_737_708_544, (32, 4096, 14336, 32, 8)),
    ("internlm2_20b", 19_861_149_696, (48, 6144, 16384, 48, 8)),
    ("internlm2_5_7b", 7_737_708_544, (32, 4096, 14336, 32, 8)),
])
def test_preset_parameter_counts(name, expected, shape):
    assert _count_by_hand(*shape) == expected
    assert ij.param_count(ij.PRESETS[name]) == expected


def test_release_fields():
    for name in ("internlm2_1_8b", "internlm2_7b", "internlm2_20b", "internlm2_5_7b", "internlm2_5_20b"):
        c = ij.PRESETS[name]
        assert (c.vocab_size, c.dim_per_head, c.rms_norm_eps, c.bias, c.tie_word_embeddings) == (
            92544, 128, 1e-5, False, False)
    assert ij.PRESETS["internlm2_5_20b"].rope_theta == 5e7
    assert ij.PRESETS["internlm2_5_20b"].max_position_embeddings == 262144
    assert ij.PRESETS["internlm2_7b"].max_position_embeddings == 32768


def test_from_hf_reads_and_roundtrips():
    c = ij.ModelConfig.from_hf({**TINY_HF, "rope_scaling": {"type": "dynamic", "factor": 2.5}})
    assert c.rope_scaling_dict == {"type": "dynamic", "factor": 2.5}
    assert (c.num_groups, c.dim_per_head) == (4, 8)
    assert ij.ModelConfig.from_hf(c.to_hf()) == c


def test_from_hf_rejects_unsupported():
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        ij.ModelConfig.from_hf({**TINY_HF, "rope_scaling": {"type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="bias=True"):
        ij.ModelConfig.from_hf({**TINY_HF, "bias": True})
    with pytest.raises(ValueError, match="model_type"):
        ij.ModelConfig.from_hf({**TINY_HF, "model_type": "qwen2"})
    with pytest.raises(FileNotFoundError):
        ij.ModelConfig.from_hf("/nonexistent/config.json")


def test_validation_messages():
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        ij.get_preset("tiny", num_key_value_heads=3)
    with pytest.raises(ValueError, match="remat_policy 'bogus'"):
        ij.get_preset("tiny", remat_policy="bogus")
    with pytest.raises(KeyError, match="unknown model preset"):
        ij.get_preset("internlm9")
    assert dataclasses.replace(ij.PRESETS["tiny"], dtype="float32").compute_dtype == "float32"


@pytest.mark.parametrize("rope", [
    {"rope_theta": 5e4, "rope_scaling": {"type": "dynamic", "factor": 2.0}},                    # transformers 4
    {"rope_theta": 5e4, "rope_scaling": {"rope_type": "dynamic", "factor": 2}},                 # 4, newer key
    {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e4}},               # θ inside
    {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e4}},            # transformers 5
    {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}, "rope_theta": 5e4},            # θ outside
    {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e4},
     "rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 5e4},                    # what save_hf writes
])
def test_from_hf_reads_every_rope_spelling(rope):
    base = {k: v for k, v in TINY_HF.items() if k not in ("rope_theta", "rope_scaling")}
    c = ij.ModelConfig.from_hf({**base, **rope})
    assert (c.rope_theta, c.rope_scaling_dict) == (5e4, {"type": "dynamic", "factor": 2.0})


@pytest.mark.parametrize("rope,plain", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e4}}, (5e4, None)),
    ({"rope_scaling": None, "rope_theta": 5e4}, (5e4, None)),
    ({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e4}}, (5e4, {"type": "linear",
                                                                                         "factor": 4.0})),
    ({}, (10000.0, None)),  # InternLM2Config's own default base when the key is absent
])
def test_from_hf_default_and_linear(rope, plain):
    base = {k: v for k, v in TINY_HF.items() if k not in ("rope_theta", "rope_scaling")}
    c = ij.ModelConfig.from_hf({**base, **rope})
    assert (c.rope_theta, c.rope_scaling_dict) == plain


@pytest.mark.parametrize("bad,match", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_parameters type 'yarn'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}}, "type 'llama3'"),
    ({"rope_scaling": {"type": "dynamic"}}, "factor must be a number >= 1"),
    ({"rope_scaling": {"type": "dynamic", "factor": 0.5}}, "factor must be a number >= 1"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}, "rope_scaling": {"type": "linear", "factor": 2.0}},
     "disagree"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "rope_theta": 1e4}, "RoPE bases disagree"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "per-layer-type"),
    ({"hidden_size": "64"}, "hidden_size must be a non-negative integer"),
    ({"vocab_size": None}, "missing required key 'vocab_size'"),
])
def test_from_hf_rejects_bad_rope_and_fields(bad, match):
    with pytest.raises(ij.HFConfigError, match=match):
        ij.ModelConfig.from_hf({**TINY_HF, **bad})


def test_from_hf_names_the_broken_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "internlm2", "vocab_size": ')
    with pytest.raises(ij.HFConfigError, match=r"config\.json: not valid JSON"):
        ij.ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "internlm2"}')
    with pytest.raises(ij.HFConfigError, match=r"config\.json: missing required key 'vocab_size'"):
        ij.ModelConfig.from_hf(tmp_path)
