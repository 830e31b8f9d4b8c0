"""The generic training loop shared by pretraining and SFT: steps, logs, eval, checkpoints, safety."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable, Iterator, Optional

import jax

from internlm2_jax.checkpointing import Checkpointer, load_parameters_only
from internlm2_jax.sharding import host_local_to_global
from internlm2_jax.train.metrics_log import MetricsLog
from internlm2_jax.train.step import Trainer

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite steps."""


def report_skipped_step(step: int, in_a_row: int, max_nonfinite: int, advice: str, what: str = "steps") -> None:
    """Logs an update skipped for a non-finite loss or gradient; raises `NonFiniteLossError` once
    `max_nonfinite` were skipped in a row (`advice` ends the error message)."""
    log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step, in_a_row)
    if in_a_row >= max_nonfinite:
        raise NonFiniteLossError(
            f"{max_nonfinite} consecutive non-finite {what} (last at step {step}); stopping. {advice}")


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes the step, saves and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: finishing this step, saving and exiting", signum)
        self.requested = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def initial_state(trainer: Trainer, init_from: Optional[str], seed: int):
    """Fresh params, or warm start from an HF folder / our Orbax checkpoint (params only)."""
    if init_from is None:
        return trainer.init_state(jax.random.key(seed))
    if os.path.exists(os.path.join(init_from, "config.json")):
        from internlm2_jax.hf_io import load_hf

        cfg, params = load_hf(init_from)
        mismatch = {f.name for f in dataclasses.fields(cfg) if f.name not in ("dtype", "param_dtype", "scan_layers",
                    "remat_policy", "attention_impl", "rope_theta", "rope_scaling", "max_position_embeddings")
                    and getattr(cfg, f.name) != getattr(trainer.config, f.name)}
        if mismatch:
            raise ValueError(f"init_from={init_from}: HF config differs from the model config in {sorted(mismatch)}")
        return trainer.state_from_params(params)
    ckpt_dir = os.path.join(init_from, "checkpoints") if os.path.isdir(os.path.join(init_from, "checkpoints")) \
        else init_from
    params = load_parameters_only(ckpt_dir, trainer.abstract_state().params)
    return trainer.state_from_params(params)


def restore_or_init(trainer: Any, ckpt: Checkpointer, data_iter: Any,
                    init: Callable[[], Any]) -> tuple[int, Any]:
    """`(start_step, state)`: the newest readable checkpoint (data iterator restored in place), else `init()`."""
    restored = ckpt.restore(trainer.abstract_state(), data_iter=data_iter)
    if restored is None:
        return 0, init()
    start, state, _ = restored
    log.info("resumed from step %d in %s", start, ckpt.directory)
    return start, state


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Cadences and safety limits of `run_loop`."""

    num_steps: int
    log_every: int = 10
    eval_every: int = 1000
    checkpoint_every: int = 1000
    max_nonfinite: int = 5
    """Consecutive skipped (non-finite) steps after which the run stops."""
    spike_factor: float = 2.0
    """A loss above this multiple of its running mean is logged as a spike."""
    progress: bool = True
    desc: str = "train"


def run_loop(trainer: Trainer, state: Any, start: int, train_it: Iterator[dict], ckpt: Checkpointer,
             metrics_log: MetricsLog, cfg: LoopConfig, *, evaluate: Optional[Callable[[Any], dict]] = None,
             meta: Optional[dict] = None) -> tuple[Any, dict, bool]:
    """Runs steps `start..cfg.num_steps` on host-local batches from `train_it`.

    Blocks on each step, logs every `log_every` steps (tokens/s, lr, ...), calls `evaluate(params)`
    every `eval_every` (and once at step 0), checkpoints every `checkpoint_every` and at the end,
    skips non-finite updates (stopping after `max_nonfinite` in a row), and on SIGTERM/SIGINT
    saves and returns early. Returns `(state, last_logged_metrics, stopped_by_signal)`.
    """
    m = trainer.mesh
    num_steps, log_every, eval_every = cfg.num_steps, cfg.log_every, cfg.eval_every
    checkpoint_every, max_nonfinite, spike_factor = cfg.checkpoint_every, cfg.max_nonfinite, cfg.spike_factor
    stop = _StopFlag()
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=num_steps, initial=start, dynamic_ncols=True, desc=cfg.desc)
    if start == 0 and eval_every and evaluate is not None:
        metrics_log.write(0, evaluate(state.params))
    ema, last, t0, tokens_seen = None, {}, time.perf_counter(), 0.0
    try:
        for step in range(start, num_steps):
            batch = host_local_to_global(next(train_it), m)
            state, metrics = trainer.step(state, batch)
            metrics = jax.device_get(metrics)  # blocks: one step in flight at a time
            tokens_seen += float(metrics["tokens"])
            done = step + 1
            if not metrics["finite"]:
                report_skipped_step(done, int(metrics["skipped"]), max_nonfinite, "The last checkpoint holds finite "
                                    "params; lower the lr or inspect the data near this step")
            else:
                loss = float(metrics["loss"])
                if ema is not None and loss > spike_factor * ema:
                    log.warning("step %d: loss spike %.4f (running mean %.4f)", done, loss, ema)
                ema = loss if ema is None else 0.98 * ema + 0.02 * loss
            if done % log_every == 0 or done == num_steps:
                dt = time.perf_counter() - t0
                last = {k: float(metrics[k]) for k in ("loss", "accuracy", "grad_norm", "lr", "tokens") if k in metrics}
                last.update(tokens_per_s=tokens_seen / max(dt, 1e-9), skipped=int(metrics["skipped"]))
                if evaluate is not None and eval_every and (done % eval_every == 0 or done == num_steps):
                    last.update(evaluate(state.params))
                metrics_log.write(done, last)
                t0, tokens_seen = time.perf_counter(), 0.0
            elif evaluate is not None and eval_every and done % eval_every == 0:
                metrics_log.write(done, evaluate(state.params))
            if bar is not None:
                bar.update(1)
                if last:
                    bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
            if done % checkpoint_every == 0 or done == num_steps or stop.requested:
                ckpt.save(done, state, train_it, meta, force=True)
            if stop.requested:
                ckpt.wait()
                log.warning("stopped by signal after step %d; checkpoint saved", done)
                break
    finally:
        ckpt.close()
        metrics_log.close()
        stop.restore()
        if bar is not None:
            bar.close()
    return state, last, stop.requested
