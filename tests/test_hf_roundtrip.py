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


def test_load_keeps_the_checkpoint_dtype(tmp_path):
    """The README's round trip: an fp32 checkpoint computes in fp32 after save_hf → load_hf (identical logits)."""
    import jax
    import jax.numpy as jnp

    config = ij.get_preset("tiny", dtype="float32")
    params = ij.init_params(config, jax.random.key(0))
    ij.save_hf(config, params, tmp_path / "fp32")
    config2, params2 = ij.load_hf(tmp_path / "fp32")
    assert (config2.compute_dtype, config2.weight_dtype) == (np.float32, np.float32)
    tokens = jnp.array([[1, 17, 42, 99, 7, 300]])
    assert np.array_equal(np.asarray(ij.forward(config, params, tokens)),
                          np.asarray(ij.forward(config2, params2, tokens)))
    assert ij.load_hf(tmp_path / "fp32", dtype="bfloat16")[0].compute_dtype == jnp.bfloat16
    bf16 = random_hf_tensors(TINY_HF, dtype=ml_dtypes.bfloat16)
    write_hf_checkpoint(str(tmp_path / "bf16"), {**TINY_HF, "torch_dtype": "bfloat16"}, bf16)
    assert ij.load_hf(tmp_path / "bf16")[0].compute_dtype == jnp.bfloat16
    write_hf_checkpoint(str(tmp_path / "v5"), {**TINY_HF, "dtype": "float32"}, bf16)  # transformers 5's key
    assert ij.load_hf(tmp_path / "v5")[0].compute_dtype == jnp.float32


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_are_named(tmp_path, value):
    tensors = random_hf_tensors(TINY_HF)
    tensors["model.layers.1.feed_forward.w2.weight"][3, 5] = value
    write_hf_checkpoint(str(tmp_path), TINY_HF, tensors, shards=2)
    with pytest.raises(ij.CheckpointCorruptError,
                       match=r"model-0000\d-of-00002\.safetensors: tensor model\.layers\.1\.feed_forward\.w2\.weight "
                             r"has 1 non-finite"):
        ij.load_hf(tmp_path)
    ij.load_hf(tmp_path, check_finite=False)  # an explicit opt-out loads it


def test_truncated_and_garbage_files_are_named(tmp_path):
    write_hf_checkpoint(str(tmp_path / "t"), TINY_HF, random_hf_tensors(TINY_HF))
    st = tmp_path / "t" / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ij.CheckpointCorruptError, match=r"model\.safetensors: not a readable safetensors file"):
        ij.load_hf(tmp_path / "t")
    st.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ij.CheckpointCorruptError, match=r"model\.safetensors: not a readable safetensors file"):
        ij.load_hf(tmp_path / "t")
    write_hf_checkpoint(str(tmp_path / "i"), TINY_HF, random_hf_tensors(TINY_HF), shards=2)
    (tmp_path / "i" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ij.CheckpointCorruptError, match=r"model\.safetensors\.index\.json: not a safetensors index"):
        ij.load_hf(tmp_path / "i")
    (tmp_path / "i" / "config.json").write_text("{")
    with pytest.raises(ij.HFConfigError, match=r"config\.json: not valid JSON"):
        ij.load_hf(tmp_path / "i")


def test_garbage_torch_bin_is_named(tmp_path):
    pytest.importorskip("torch")
    json.dump(TINY_HF, open(tmp_path / "config.json", "w"))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a torch file" * 10)
    with pytest.raises(ij.CheckpointCorruptError, match=r"pytorch_model\.bin: not a readable torch checkpoint"):
        ij.load_hf(tmp_path)
