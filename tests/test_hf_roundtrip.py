"""save_hf(load_hf(x)) is bit-exact; bad checkpoints fail with one clear error."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

import internlm2_jax as ij
from hf_fixtures import TINY_HF, random_hf_tensors, write_hf_checkpoint


def _read_all(path) -> dict:
    out = {}
    for fn in os.listdir(path):
        if fn.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, fn)))
    return out


@pytest.mark.parametrize("dtype,scan", [(np.float32, True), (ml_dtypes.bfloat16, False)])
def test_roundtrip_bit_exact(tmp_path, dtype, scan):
    tensors = random_hf_tensors(TINY_HF, seed=5, dtype=dtype)
    write_hf_checkpoint(str(tmp_path / "a"), TINY_HF, tensors, shards=3)
    config, params = ij.load_hf(tmp_path / "a", scan_layers=scan)
    ij.save_hf(config, params, tmp_path / "b", max_shard_bytes=20_000)  # forces several shards
    assert os.path.exists(tmp_path / "b" / "model.safetensors.index.json")
    back = _read_all(tmp_path / "b")
    assert set(back) == set(tensors)
    for name, arr in tensors.items():
        assert back[name].dtype == arr.dtype, name
        assert back[name].tobytes() == arr.tobytes(), name
    cfg = json.load(open(tmp_path / "b" / "config.json"))
    assert ij.ModelConfig.from_hf(cfg) == ij.ModelConfig.from_hf(TINY_HF)


def test_fp32_master_upcast_is_exact(tmp_path):
    tensors = random_hf_tensors(TINY_HF, seed=6, dtype=ml_dtypes.bfloat16)
    write_hf_checkpoint(str(tmp_path / "a"), TINY_HF, tensors)
    config, params = ij.load_hf(tmp_path / "a", param_dtype="float32")
    assert config.weight_dtype == np.float32
    back = ij.hf_io.params_to_hf(config, params)
    for name, arr in tensors.items():
        assert back[name].astype(ml_dtypes.bfloat16).tobytes() == arr.tobytes(), name


def test_missing_tensor_is_named(tmp_path):
    tensors = random_hf_tensors(TINY_HF)
    del tensors["model.layers.1.feed_forward.w3.weight"]
    write_hf_checkpoint(str(tmp_path), TINY_HF, tensors)
    with pytest.raises(ij.CheckpointMismatchError, match=r"model\.layers\.1\.feed_forward\.w3\.weight.*\(112, 64\)"):
        ij.load_hf(tmp_path)


def test_misshaped_and_extra_tensors_are_named(tmp_path):
    tensors = random_hf_tensors(TINY_HF)
    tensors["model.layers.0.attention.wo.weight"] = tensors["model.layers.0.attention.wo.weight"][:, :32]
    tensors["model.layers.0.attention.bias"] = np.zeros(3, np.float32)
    write_hf_checkpoint(str(tmp_path), TINY_HF, tensors)
    with pytest.raises(ij.CheckpointMismatchError) as e:
        ij.load_hf(tmp_path)
    assert "model.layers.0.attention.wo.weight has shape (64, 32), expected (64, 64)" in str(e.value)
    assert "model.layers.0.attention.bias" in str(e.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ij.load_hf(tmp_path / "nope")
    write_hf_checkpoint(str(tmp_path / "c"), TINY_HF, random_hf_tensors(TINY_HF), shards=2)
    os.remove(tmp_path / "c" / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        ij.load_hf(tmp_path / "c")


def test_pytorch_bin_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    tensors = random_hf_tensors(TINY_HF, seed=7)
    os.makedirs(tmp_path, exist_ok=True)
    json.dump(TINY_HF, open(tmp_path / "config.json", "w"))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp_path / "pytorch_model.bin")
    config, params = ij.load_hf(tmp_path)
    back = ij.hf_io.params_to_hf(config, params)
    assert all(np.array_equal(back[k], v) for k, v in tensors.items())
