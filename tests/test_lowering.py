"""Lowering for the accelerators this CPU machine lacks: `jax.export` for `cuda` and `tpu`.

Every model path is lowered for each platform and the module must hold the real kernels' custom calls: the
Triton kernels as `__gpu$xla.gpu.triton`, the Mosaic kernels as `tpu_custom_call`. Pallas' interpreter lowers
to plain HLO loops, so a path that fell back to it (e.g. by reading the host's backend at trace time) fails
here. Shapes are abstract (`ShapeDtypeStruct`): nothing is allocated or run; the meshes are `AbstractMesh`es,
so a 2 x 2 mesh needs no devices.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import optax
import pytest
from jax import export
from jax.sharding import AbstractMesh

import internlm2_jax
from internlm2_jax.config import ModelConfig
from internlm2_jax.model import abstract_params, init_cache
from internlm2_jax.sharding import MESH_AXES
from internlm2_jax.train.causal_lm import StepConfig, causal_lm_trainer
from internlm2_jax.train.trainer import batch_shardings, mesh_context

KERNEL_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
PLATFORMS = tuple(KERNEL_CALL)
ALLOW_KERNELS = [export.DisabledSafetyCheck.custom_call(name) for name in KERNEL_CALL.values()]

# Small, but with the released head width (128: the TPU decode kernel's lane-aligned heads) and GQA.
CONFIG = ModelConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                     dtype="bfloat16", attention_impl="auto")
B, S, MAX_LEN = 2, 256, 512


def lowered(fn, *args, platform: str) -> str:
    """The StableHLO text of `fn` exported for `platform`."""
    return export.export(fn if hasattr(fn, "trace") else jax.jit(fn), platforms=[platform],
                         disabled_checks=ALLOW_KERNELS)(*args).mlir_module()


def kernel_calls(text: str, platform: str) -> int:
    return text.count(KERNEL_CALL[platform])


def sds(shape, dtype=jnp.int32, sharding=None):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


PARAMS = jax.tree.map(lambda x: sds(x.shape, x.dtype), abstract_params(CONFIG))


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("impl", ["auto", "pallas"])
def test_forward_lowers_with_the_flash_kernel(platform, impl):
    cfg = dataclasses.replace(CONFIG, attention_impl=impl)
    text = lowered(lambda p, t: internlm2_jax.forward(cfg, p, t), PARAMS, sds((B, S)), platform=platform)
    assert kernel_calls(text, platform) >= 1
    other = "tpu" if platform == "cuda" else "cuda"
    assert kernel_calls(text, other) == 0  # only the target's kernels are lowered


def test_cpu_lowering_of_auto_is_plain_xla():
    text = lowered(lambda p, t: internlm2_jax.forward(CONFIG, p, t), PARAMS, sds((B, S)), platform="cpu")
    assert "custom_call" not in text or all(kernel_calls(text, p) == 0 for p in PLATFORMS)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_prefill_and_decode_lower_with_kernels(platform):
    """Prefill (chunks through the cache) runs the flash kernel; a decode step runs the decode kernel."""
    cache = jax.tree.map(lambda x: sds(x.shape, x.dtype), jax.eval_shape(lambda: init_cache(CONFIG, B, MAX_LEN)))

    def prefill(p, t, lengths):
        return internlm2_jax.model.prefill_last(CONFIG, p, t, max_len=MAX_LEN, lengths=lengths, chunk=128)

    text = lowered(prefill, PARAMS, sds((B, S)), sds((B,)), platform=platform)
    assert kernel_calls(text, platform) >= 1
    decode = jax.jit(lambda p, c, t: internlm2_jax.decode_step(CONFIG, p, c, t), donate_argnums=1)
    text = lowered(decode, PARAMS, cache, sds((B,)), platform=platform)
    assert kernel_calls(text, platform) >= 1
    assert re.search(r"flash_decode|tpu_decode_attention", text), "the decode kernel is not the one lowered"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_decode_kernel_lowers(platform):
    from kernels_pallas import decode_attention

    q, kc = sds((4, 8, 128), jnp.bfloat16), sds((4, 1024, 2, 128), jnp.bfloat16)
    text = lowered(lambda q, k, v, n: decode_attention(q, k, v, n), q, kc, kc, sds((4,)), platform=platform)
    assert kernel_calls(text, platform) == 1


def abstract_mesh(**sizes) -> AbstractMesh:
    return AbstractMesh(tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("mesh_sizes", [{"fsdp": 2, "tensor": 2}, {"fsdp": 2, "sequence": 2}],
                         ids=["fsdp2_tensor2", "fsdp2_sequence2"])
def test_train_step_lowers_on_a_mesh(platform, mesh_sizes):
    """The whole optimizer step (loss, forward and backward kernels, AdamW) on a 2 x 2 abstract mesh."""
    mesh = abstract_mesh(**mesh_sizes)
    trainer = causal_lm_trainer(CONFIG, optax.adamw(1e-3), mesh, StepConfig(loss_chunk=128))
    batch = {"tokens": sds((4, S)), "segment_ids": sds((4, S)), "positions": sds((4, S))}
    shardings = batch_shardings(mesh, batch)
    batch = {k: sds(v.shape, v.dtype, shardings[k]) for k, v in batch.items()}
    with mesh_context(mesh):
        exp = export.export(trainer.jitted_step(batch), platforms=[platform], disabled_checks=ALLOW_KERNELS)(
            trainer.abstract_state(), None, batch)
    text = exp.mlir_module()
    assert exp.nr_devices == 4
    # forward + the backward's dq and dk/dv kernels (GPU: three pallas_calls; TPU splash: fwd, dq, dkv)
    assert kernel_calls(text, platform) >= 3
    sized = ", ".join(f'"{a}"={n}' for a, n in zip(MESH_AXES, mesh.axis_sizes))
    assert f"sdy.mesh @mesh = <[{sized}]>" in text
    arg_shardings = re.findall(r"sdy\.sharding = #sdy\.sharding<@mesh, \[([^\]]*)\]", text)
    assert any('"fsdp"' in s for s in arg_shardings)  # params / batch really split, not replicated
    if "sequence" in mesh_sizes:
        assert "all_to_all" in text  # context parallelism's head <-> sequence exchange


def test_compiled_kernel_on_the_wrong_platform_is_an_error():
    """`kernel_backend="gpu"` asks for the Triton kernels: on this CPU that fails at lowering, it never
    silently runs the interpreter."""
    from kernels_pallas import flash_attention

    q = jnp.zeros((1, 32, 2, 64), jnp.float32)
    with pytest.raises(Exception, match="(?i)interpret|cpu|triton|gpu"):
        jax.jit(lambda q: flash_attention(q, q, q, backend="gpu"))(q)
    cfg = dataclasses.replace(CONFIG, attention_impl="pallas", kernel_backend="tpu", dtype="float32")
    with pytest.raises(Exception, match="(?i)interpret|cpu|mosaic|tpu"):
        jax.jit(lambda p, t: internlm2_jax.forward(cfg, p, t))(internlm2_jax.init_params(cfg, jax.random.key(0)),
                                                               jnp.zeros((1, 128), jnp.int32))
