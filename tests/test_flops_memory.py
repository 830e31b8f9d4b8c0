"""FLOPs/MFU and the memory planner against hand-computed numbers (no devices needed)."""

import os
import subprocess
import sys

import pytest

from internlm2_jax.config import get_preset
from internlm2_jax.train import flops, memory

GIB = 1024**3
# InternLM2-7B by hand: embedding = head = 92544*4096; per layer wqkv 4096*(32+2*8)*128,
# wo 4096*4096, w1/w2/w3 3*4096*14336, two norms 2*4096; final norm 4096.
EMB = 92544 * 4096
LAYER = 4096 * 48 * 128 + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096
TOTAL_7B = 2 * EMB + 32 * LAYER + 4096
NORMS_7B = 32 * 2 * 4096 + 4096


def test_7b_param_count_by_hand():
    assert TOTAL_7B == 7_737_708_544
    assert flops.non_embedding_params(get_preset("internlm2_7b")) == TOTAL_7B - EMB


def test_flops_per_token_by_hand():
    cfg = get_preset("internlm2_7b")
    s = 4096
    attention = 12 * 32 * s * 32 * 128 / 2  # 12·L·S·H·hd, causal half
    assert flops.attention_flops_per_token(cfg, s) == attention
    assert flops.attention_flops_per_token(cfg, s, causal=False) == 2 * attention
    assert flops.flops_per_token(cfg, s) == pytest.approx(6 * (TOTAL_7B - EMB) + attention, rel=1e-12)
    # tiny: 512 vocab, D 64, F 176, 2 layers, H 4, KV 2, hd 16
    tiny = get_preset("tiny")
    n = 64 * 512 + 2 * (64 * 8 * 16 + 64 * 64 + 3 * 64 * 176 + 2 * 64) + 64
    assert flops.flops_per_token(tiny, 32) == 6 * n + 6 * 2 * 32 * 4 * 16


def test_mfu_and_peaks():
    cfg = get_preset("internlm2_7b")
    fpt = flops.flops_per_token(cfg, 4096)
    assert flops.mfu(3000.0, cfg, 4096, 8, 989e12) == pytest.approx(3000 * fpt / (8 * 989e12))
    assert flops.peak_flops_per_device() is None  # CPU

    class Dev:
        platform = "gpu"
        def __init__(self, kind):
            self.device_kind = kind

    expected = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
                "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
                "Some New Chip": None}
    for kind, peak in expected.items():
        assert flops.peak_flops_per_device(Dev(kind)) == peak, kind


def test_param_bytes_7b_fsdp8_by_hand():
    plan = memory.plan_memory(get_preset("internlm2_7b"), {"fsdp": 8}, 1, 4096, "full")
    # Every matrix has an `embed` dim (4096, divisible by 8) sharded over fsdp; norm scales are
    # replicated. (TOTAL_7B * 4 / 8 exactly would hold if norms were sharded too.)
    assert plan.params == (TOTAL_7B - NORMS_7B) * 4 / 8 + NORMS_7B * 4
    assert abs(plan.params - TOTAL_7B * 4 / 8) < 1e6
    assert plan.grads == plan.params and plan.opt_state == 2 * plan.params


def test_tensor_parallel_sharding_of_params():
    cfg = get_preset("internlm2_7b")
    tp = memory.plan_memory(cfg, {"tensor": 8}, 1, 4096, "full")
    # every matrix has a tensor-sharded dim (kv_heads 8, heads, mlp, vocab); norms replicated
    assert tp.params == (TOTAL_7B - NORMS_7B) * 4 / 8 + NORMS_7B * 4


def test_fits_and_does_not_fit():
    cfg = get_preset("internlm2_7b")
    ok = memory.plan_memory(cfg, {"fsdp": 8}, 2, 4096, "save_qkv_attn", hbm_gib=80)
    assert ok.fits and ok.total < 40 * GIB
    # one 80 GiB GPU cannot hold 7B fp32 params + grads + AdamW (16 bytes/param = 115 GiB)
    single = memory.plan_memory(cfg, {}, 1, 4096, "full", hbm_gib=80)
    assert not single.fits and single.params + single.grads + single.opt_state == TOTAL_7B * 16
    # XLA attention keeps fp32 [H, S, S] probabilities per layer without remat
    xla = memory.plan_memory(cfg, {"fsdp": 8}, 1, 4096, "none", hbm_gib=80, attention="xla")
    assert not xla.fits


def test_lora_and_qlora():
    cfg = get_preset("internlm2_7b")
    r = 16
    adapters = 32 * r * ((4096 + 6144) + (4096 + 4096) + 2 * (4096 + 14336) + (14336 + 4096))
    lora = memory.plan_memory(cfg, {}, 1, 2048, "full", mode="lora", lora_rank=r)
    assert lora.grads == adapters * 4 and lora.opt_state == adapters * 8
    assert lora.params == TOTAL_7B * 2 + adapters * 4
    q = memory.plan_memory(cfg, {}, 1, 2048, "full", hbm_gib=8, mode="qlora", lora_rank=r)
    blocks = 32 * (LAYER - 2 * 4096)
    assert q.params == pytest.approx(blocks * (0.5 + 2 / 64) + (TOTAL_7B - blocks) * 2 + adapters * 4)
    assert q.fits  # XTuner: 7B QLoRA in 8 GB
    with pytest.raises(ValueError, match="mode"):
        memory.plan_memory(cfg, {}, 1, 2048, mode="half")


def test_remat_policies_order():
    cfg = get_preset("internlm2_7b")
    act = {p: memory.activation_bytes(cfg, memory.MESH_DEFAULT, 1, 4096, p)["saved"]
           for p in ("none", "save_qkv_attn_mlp", "minimal", "save_qkv_attn", "full")}
    vals = list(act.values())
    assert vals == sorted(vals, reverse=True), act
    assert act["full"] == 2 * 4096 * 4096 * 32  # bf16 block inputs only


def test_sequence_axis_splits_activations_and_is_limited_by_the_heads():
    cfg = get_preset("internlm2_7b")  # 32 query heads
    one = memory.activation_bytes(cfg, memory.MESH_DEFAULT, 1, 32768, "save_qkv_attn")["saved"]
    four = memory.activation_bytes(cfg, {**memory.MESH_DEFAULT, "sequence": 4}, 1, 32768, "save_qkv_attn")["saved"]
    assert four == one / 4
    with pytest.raises(ValueError, match="query heads over 'sequence'"):
        memory.plan_memory(cfg, {"sequence": 64}, 1, 65536)
    out = _plan_cli("--gin", "experiments/configs/plan/7b_32k_8xh100.gin", "--gin_param", "plan.sequence=64")
    assert out.returncode == 2 and "query heads over 'sequence'" in out.stderr, out.stderr


def _plan_cli(*args):
    root = os.path.dirname(os.path.dirname(__file__))
    return subprocess.run([sys.executable, "-m", "experiments.plan", *args], check=False, capture_output=True, text=True,
                          cwd=root, timeout=120)


def test_plan_cli_gin_configs():
    for name in ("7b_v5p8", "7b_8xh100", "20b_16xh100", "7b_qlora_8gb", "7b_32k_8xh100", "7b_1m_v5p256"):
        out = _plan_cli("--gin", f"experiments/configs/plan/{name}.gin")
        assert out.returncode == 0 and "fits: YES" in out.stdout, out.stdout + out.stderr
    out = _plan_cli("--gin", "experiments/configs/plan/7b_8xh100.gin", "--gin_param", "plan.fsdp=1")
    assert out.returncode == 1 and "fits: NO" in out.stdout
    out = _plan_cli("--gin", "experiments/configs/plan/7b_8xh100.gin", "--gin_param", "plan.fsdpp=2")
    assert out.returncode == 2 and "fsdpp" in out.stderr
