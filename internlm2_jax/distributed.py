"""Multi-host start-up: one `initialize()` for explicit args, env vars, SLURM and TPU pods.

Every process runs the same program. After `initialize()`, `jax.devices()` lists the devices of all
processes, a `Mesh` spans them, and each process feeds only its share of the global batch
(`local_batch_slice`) which `sharding.host_local_to_global` assembles into global arrays.

Resolution order (first match wins):
1. explicit `coordinator` / `num_processes` / `process_id` arguments;
2. `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID` env vars;
3. SLURM (`SLURM_JOB_ID` + `SLURM_NTASKS` > 1 + `SLURM_PROCID`): jax's own SLURM auto-detection
   (coordinator = first node of `SLURM_STEP_NODELIST`); one GPU per task (`SLURM_LOCALID`), or all
   `SLURM_GPUS_ON_NODE` GPUs when there is one task per node;
4. a Cloud TPU VM (libtpu + `/dev/accel*` or `/dev/vfio`): `jax.distributed.initialize()` with no
   arguments (jax reads the pod's worker list from the TPU metadata);
5. otherwise single process: nothing to do.
`INTERNLM2_JAX_DISTRIBUTED=off` forces 5, `=auto` forces a bare `jax.distributed.initialize()`.
CPU processes talk through gloo (`jax_cpu_collectives_implementation`, jax's CPU default).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from collections.abc import Mapping

import jax


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How `initialize` will start: `source` is explicit/env/slurm/tpu/auto/single."""

    source: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    """Devices this process drives; None = jax's default (all visible, or SLURM_LOCALID under SLURM)."""


def _on_tpu_vm() -> bool:
    has_chip = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    return has_chip and importlib.util.find_spec("libtpu") is not None


def resolve(coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, env: Mapping[str, str] | None = None) -> LaunchPlan:
    """Decides how to start from arguments and `env` (default `os.environ`) without starting anything."""
    env = os.environ if env is None else env
    forced = env.get("INTERNLM2_JAX_DISTRIBUTED", "").lower()
    if forced == "off":
        return LaunchPlan("single")
    if coordinator is not None or num_processes is not None or process_id is not None:
        if None in (coordinator, num_processes, process_id):
            raise ValueError("give all of coordinator, num_processes and process_id, or none of them; got "
                             f"{coordinator!r}, {num_processes!r}, {process_id!r}")
        return LaunchPlan("explicit", coordinator, int(num_processes), int(process_id))
    keys = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    present = [k for k in keys if env.get(k)]
    if present:
        if len(present) != 3:
            raise ValueError(f"set all of {keys} or none; only {present} are set")
        return LaunchPlan("env", env[keys[0]], int(env[keys[1]]), int(env[keys[2]]))
    if forced == "auto":
        return LaunchPlan("auto")
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        # jax's SLURM detection gives each task ONE device (SLURM_LOCALID); with one task per node
        # the task must drive all the node's GPUs instead.
        ids = None
        per_node = env.get("SLURM_NTASKS_PER_NODE", "")
        if (per_node == "1" or env.get("SLURM_NTASKS") == env.get("SLURM_NNODES")) and env.get("SLURM_GPUS_ON_NODE"):
            ids = tuple(range(int(env["SLURM_GPUS_ON_NODE"])))
        return LaunchPlan("slurm", None, int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]), ids)
    if env is os.environ and _on_tpu_vm():
        return LaunchPlan("tpu")
    return LaunchPlan("single")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> LaunchPlan:
    """Starts `jax.distributed` as `resolve` decides (no-op for one process); returns the plan.

    Must run before anything touches a jax backend (`jax.devices()`, creating arrays).
    `coordinator` is `host:port` of process 0; `timeout_s` bounds waiting for all processes.
    """
    plan = resolve(coordinator, num_processes, process_id)
    if plan.source == "single" or (plan.num_processes == 1 and plan.source in ("explicit", "env")):
        return plan
    if jax.distributed.is_initialized():
        return plan
    if plan.source in ("explicit", "env"):
        jax.distributed.initialize(plan.coordinator, plan.num_processes, plan.process_id,
                                   initialization_timeout=timeout_s)
    elif plan.source == "slurm":
        jax.distributed.initialize(cluster_detection_method="slurm", initialization_timeout=timeout_s,
                                   local_device_ids=None if plan.local_device_ids is None
                                   else list(plan.local_device_ids))
    else:  # tpu / auto: jax's cluster auto-detection
        jax.distributed.initialize(initialization_timeout=timeout_s)
    return plan


def local_batch_slice(global_batch: int, process_index: int | None = None,
                      process_count: int | None = None) -> slice:
    """Rows `[i * B/n, (i+1) * B/n)` of a global batch of `B` rows that process `i` of `n` loads."""
    i = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} is not divisible by {n} processes")
    per = global_batch // n
    return slice(i * per, (i + 1) * per)
