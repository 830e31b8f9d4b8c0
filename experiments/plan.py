"""Per-device memory plan (params / grads / optimizer / activations) from gin configs, no devices.

    python -m experiments.plan --gin experiments/configs/plan/7b_8xh100.gin \\
        [--gin_param 'plan.per_device_batch=4'] [--gin_param 'plan.mode="qlora"']

Prints a table in GiB and whether it fits `hbm_gib`; exits 0 if it fits (or no memory is given),
1 if it does not. Unknown gin bindings fail before anything runs.
"""

from __future__ import annotations

import argparse
import sys

import gin

from internlm2_jax.config import get_preset
from internlm2_jax.train.flops import flops_per_token
from internlm2_jax.train.memory import MemoryPlan, plan_memory


@gin.configurable
def plan(
    preset: str = gin.REQUIRED,
    data: int = 1,
    fsdp: int = 1,
    tensor: int = 1,
    sequence: int = 1,
    per_device_batch: int = 1,
    seq_len: int = 4096,
    remat_policy: str = "full",
    hbm_gib: float | None = None,
    mode: str = "full",
    lora_rank: int = 64,
    qlora_bits: int = 4,
    grad_accum: int = 1,
    attention: str = "flash",
    loss_chunk: int = 512,
) -> MemoryPlan:
    """Builds, prints and returns the memory plan of `preset` on a `data x fsdp x tensor x sequence` mesh.

    `per_device_batch` rows per data/fsdp shard of `seq_len` tokens; `mode` is `full`/`lora`/`qlora`;
    `attention` is `flash` (no `S x S` buffer kept) or `xla` (fp32 probabilities kept per layer).
    """
    config = get_preset(preset)
    sizes = dict(data=data, fsdp=fsdp, tensor=tensor, sequence=sequence)
    result = plan_memory(config, sizes, per_device_batch, seq_len, remat_policy, hbm_gib, mode=mode,
                         lora_rank=lora_rank, qlora_bits=qlora_bits, grad_accum=grad_accum,
                         attention=attention, loss_chunk=loss_chunk)
    devices = data * fsdp * tensor * sequence
    global_batch = per_device_batch * data * fsdp * grad_accum
    print(f"{preset} mode={mode} mesh data={data} fsdp={fsdp} tensor={tensor} sequence={sequence} "
          f"({devices} devices) per_device_batch={per_device_batch} seq_len={seq_len} remat={remat_policy} "
          f"attention={attention} -> global batch {global_batch} x {seq_len} = {global_batch * seq_len:,} tokens")
    print(f"model FLOPs/token (6N + causal attention): {flops_per_token(config, seq_len):.4g}")
    print(result.table())
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gin", action="append", default=[], help="gin config file (repeatable)")
    ap.add_argument("--gin_param", action="append", default=[], help="gin binding (repeatable)")
    args = ap.parse_args(argv)
    try:
        gin.parse_config_files_and_bindings(args.gin, args.gin_param)
    except (ValueError, KeyError) as e:  # gin's unknown-configurable / unknown-parameter errors
        print(f"error: bad gin config: {e}", file=sys.stderr)
        return 2
    try:
        result = plan()
    except ValueError as e:  # a mesh the model cannot use (e.g. more sequence shards than heads)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if result.fits in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
