"""Per-device memory planner: params, grads, optimizer state and activations, without devices.

Everything is computed from `abstract_params` shapes and `LOGICAL_RULES` mapped onto mesh axis
*sizes*, so a 7B/20B plan on 8-16 accelerators runs on a laptop CPU. State terms are exact for our
`Trainer` (fp32 master params, fp32 grads, AdamW mu + nu fp32, sharded like the params; norm scales
are replicated). Activations are an estimate (documented per term in `activation_bytes`).

SFT modes: `"full"` as above; `"lora"`/`"qlora"` freeze the base (bf16, or int8/int4 + one bf16
scale per `QUANT_GROUP` weights for the block matmuls under qlora; embeddings/head/norms stay bf16)
and train rank-`r` adapters `A [in, r]`, `B [r, out]` on wqkv/wo/w1/w2/w3 with fp32 master,
fp32 grads and AdamW state (16 bytes per adapter parameter).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np

from internlm2_jax.config import REMAT_POLICIES, ModelConfig
from internlm2_jax.model import abstract_params
from internlm2_jax.sharding import LOGICAL_RULES, MESH_AXES

GIB = 1024**3
MODES = ("full", "lora", "qlora")
LORA_TARGETS = {"wqkv": 1, "wo": 2, "w1": 1, "w2": 1, "w3": 1}  # name -> number of input dims
MESH_DEFAULT = {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}
QUANT_GROUP = 64  # weights per quantisation scale (QLoRA block size)
USABLE_FRACTION = 0.92  # of HBM left to the program after runtime / allocator reserve / fragmentation


def shard_elems(shape: Sequence[int], logical: Sequence[str | None], mesh_sizes: dict[str, int]) -> int:
    """Elements of one device's shard of an array with `logical` axes on a mesh of `mesh_sizes`."""
    spec = nn.logical_to_mesh_axes(tuple(logical), LOGICAL_RULES)
    n = 1
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        n *= math.ceil(dim / math.prod(mesh_sizes[a] for a in axes))
    return n


def _param_leaves(config: ModelConfig) -> list[tuple[str, tuple[int, ...], tuple]]:
    """(path, shape, logical axes) of every param leaf."""
    boxed = abstract_params(config)
    specs = nn.get_partition_spec(boxed)
    shapes = nn.meta.unbox(boxed)
    paths = jax.tree_util.tree_flatten_with_path(shapes)[0]
    axes = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return [("/".join(str(getattr(k, "key", k)) for k in p), tuple(x.shape), tuple(a))
            for (p, x), a in zip(paths, axes)]


def activation_bytes(config: ModelConfig, mesh_sizes: dict[str, int], per_device_batch: int, seq_len: int,
                     remat_policy: str, attention: str = "flash", loss_chunk: int = 512) -> dict[str, float]:
    """Estimated activation bytes per device: `saved` (kept for backward) and `transient` (peak temps).

    Per layer and token (D hidden, F ffn, hd head dim, t tensor shards, compute dtype bytes `a`):
    `none` keeps block input, both norm outputs, qkv, roped q/k, attention out, wo out, gate, up,
    silu(gate), gate*up and w2 out, plus `[H/t, S]` fp32 probabilities when `attention="xla"`
    (flash keeps a fp32 logsumexp per head instead); `full` keeps only the block input (the scan
    carry); `minimal` keeps the weight-matmul outputs (qkv, wo, w1, w3, w2) + input; `save_qkv_attn`
    keeps qkv + attention out + input; `save_qkv_attn_mlp` adds wo/w1/w3/w2 outputs. The transient
    term is one layer recomputed in full (remat) and its gradient, the fp32 logits of one loss chunk
    (x3: logits, softmax, grad), and under fsdp two layers of all-gathered weights and one layer of
    unsharded fp32 grads before the reduce-scatter.
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy {remat_policy!r} unknown; expected one of {REMAT_POLICIES}")
    t = mesh_sizes["tensor"]
    a = np.dtype(config.compute_dtype).itemsize
    d, f, hd = config.hidden_size, config.intermediate_size, config.dim_per_head
    h, kv = config.num_attention_heads, config.num_key_value_heads
    tokens = per_device_batch * seq_len / mesh_sizes["sequence"]
    qkv, rq, attn = (h + 2 * kv) * hd / t, (h + kv) * hd / t, h * hd / t
    probs = (h / t) * seq_len * 4 if attention == "xla" else (h / t) * 4
    per_tok = {  # bytes per token per layer
        "none": a * (5 * d + qkv + rq + attn + 4 * f / t) + probs,
        "full": a * d,
        "minimal": a * (2 * d + qkv + 2 * f / t + d),
        "save_qkv_attn": a * (d + qkv + attn),
        "save_qkv_attn_mlp": a * (3 * d + qkv + attn + 2 * f / t),
    }
    saved = per_tok[remat_policy] * tokens * config.num_hidden_layers
    layer_full = per_tok["none"] * tokens
    transient = (2 * layer_full if remat_policy != "none" else layer_full / config.num_hidden_layers)
    transient += 3 * 4 * per_device_batch * min(loss_chunk, seq_len) * config.vocab_size / t
    transient += 2 * a * d * tokens  # final hidden states and their gradient
    if mesh_sizes["fsdp"] > 1:
        layer_params = (d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f) / t
        transient += layer_params * (2 * a + 4)
    return {"saved": float(saved), "transient": float(transient)}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device byte counts of one configuration (see `plan_memory`)."""

    params: float
    grads: float
    opt_state: float
    activations: float
    transient: float
    hbm_bytes: float | None
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> float:
        return self.params + self.grads + self.opt_state + self.activations + self.transient

    @property
    def fits(self) -> bool | None:
        """Whether `total` fits in `USABLE_FRACTION` of the device memory (None if no memory given)."""
        return None if self.hbm_bytes is None else self.total <= USABLE_FRACTION * self.hbm_bytes

    def table(self) -> str:
        """Human-readable table in GiB."""
        rows = [("params", self.params), ("grads", self.grads), ("optimizer state", self.opt_state),
                ("activations (saved)", self.activations), ("activations (transient)", self.transient),
                ("total", self.total)]
        lines = [f"{'per device':<26}{'GiB':>10}"] + [f"{k:<26}{v / GIB:>10.2f}" for k, v in rows]
        if self.hbm_bytes is not None:
            usable = USABLE_FRACTION * self.hbm_bytes
            lines.append(f"{'usable HBM':<26}{usable / GIB:>10.2f}  ({USABLE_FRACTION:.0%} of "
                         f"{self.hbm_bytes / GIB:.0f} GiB)")
            lines.append(f"fits: {'YES' if self.fits else 'NO'}")
        return "\n".join(lines + list(self.notes))


def plan_memory(config: ModelConfig, mesh_sizes: dict[str, int], per_device_batch: int, seq_len: int,
                remat_policy: str | None = None, hbm_gib: float | None = None, mode: str = "full",
                lora_rank: int = 64, qlora_bits: int = 4, grad_accum: int = 1, attention: str = "flash",
                loss_chunk: int = 512) -> MemoryPlan:
    """Per-device memory of training `config` on a mesh with axis sizes `mesh_sizes`.

    `per_device_batch` is the micro-batch rows per data/fsdp shard; `remat_policy` defaults to the
    config's. `grad_accum > 1` adds a fp32 gradient accumulator (full mode).
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} unknown; expected one of {MODES}")
    if qlora_bits not in (4, 8):
        raise ValueError(f"qlora_bits must be 4 or 8, got {qlora_bits}")
    sizes = {a: int(mesh_sizes.get(a, 1)) for a in MESH_AXES}
    heads_per_shard = config.num_attention_heads // sizes["tensor"]
    if sizes["sequence"] > 1 and heads_per_shard % sizes["sequence"]:  # see layers/attention_sharded.py
        raise ValueError(f"context parallelism splits each tensor shard's {heads_per_shard} query heads over "
                         f"'sequence' (size {sizes['sequence']}): it must divide them")
    if seq_len % sizes["sequence"]:
        raise ValueError(f"seq_len {seq_len} is not divisible by the 'sequence' axis ({sizes['sequence']})")
    remat_policy = config.remat_policy if remat_policy is None else remat_policy
    leaves = _param_leaves(config)
    notes = []
    if mode == "full":
        w = np.dtype(config.weight_dtype).itemsize
        elems = sum(shard_elems(s, ax, sizes) for _, s, ax in leaves)
        params, grads, opt = elems * w, elems * w * (2 if grad_accum > 1 else 1), elems * 8
    else:
        params = grads = opt = 0.0
        adapter = 0
        for path, shape, ax in leaves:
            name = path.split("/")[-1]
            n = shard_elems(shape, ax, sizes)
            if mode == "qlora" and name in LORA_TARGETS:
                params += n * (qlora_bits / 8 + 2 / QUANT_GROUP)
            else:
                params += n * 2  # frozen bf16
            if name in LORA_TARGETS:
                k = LORA_TARGETS[name] + 1  # leading layers axis + input dims
                adapter += shard_elems((*shape[:k], lora_rank), (*ax[:k], None), sizes)
                adapter += shard_elems((shape[0], lora_rank, *shape[k:]), (ax[0], None, *ax[k:]), sizes)
        params += adapter * 4
        grads, opt = adapter * 4.0, adapter * 8.0
        notes.append(f"trainable adapter params per device: {adapter:,} (rank {lora_rank})")
    act = activation_bytes(config, sizes, per_device_batch, seq_len, remat_policy, attention, loss_chunk)
    hbm = None if hbm_gib is None else hbm_gib * GIB
    return MemoryPlan(float(params), float(grads), float(opt), act["saved"], act["transient"], hbm,
                      tuple(notes))
