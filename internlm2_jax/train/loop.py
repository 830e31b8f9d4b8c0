"""The one training loop of every stage: steps, logs, eval and other hooks, checkpoints, resume, safety.

A stage gives a `step_fn(state, host_batch) -> (state, metrics)` whose metrics include `finite` and `skipped`
(consecutive skipped updates); the loop owns cadences, exact resume (state + data iterators in one Orbax
checkpoint), SIGTERM/SIGINT save-and-stop and the non-finite stop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax

from internlm2_jax.checkpointing import CheckpointConfig, Checkpointer
from internlm2_jax.errors import EXIT_NONFINITE, ConfigValueError, UserFacingError
from internlm2_jax.train import outcome
from internlm2_jax.train.metrics_log import MetricsLog, read_metrics
from internlm2_jax.train.trainer import Trainer
from internlm2_jax.workdir_lock import WorkdirLock

log = logging.getLogger(__name__)


class NonFiniteLossError(UserFacingError, RuntimeError):
    """Raised after too many consecutive non-finite steps (exit code 3)."""

    exit_code = EXIT_NONFINITE


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
        self.signum: Optional[int] = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: finishing this step, saving and exiting", signum)
        self.requested, self.signum = True, signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def initial_state(trainer: Trainer, init_from: Optional[str], seed: int):
    """Fresh params, or a warm start from any `params_loading` source (HF folder, our Orbax workdir or
    checkpoint dir, msgpack): params only, step 0 and a fresh optimizer state."""
    if init_from is None:
        return trainer.init_state(jax.random.key(seed))
    from internlm2_jax.params_loading import load_policy

    return trainer.state_from_params(load_policy(init_from, trainer.task.config, trainer.param_shardings))


def restore_or_init(abstract_state: Any, ckpt: Checkpointer, data_iter: Any,
                    init: Callable[[], Any], expect_model: Optional[dict] = None) -> tuple[int, Any]:
    """`(start_step, state)`: the newest usable checkpoint (data iterators restored in place), else `init()`."""
    restored = ckpt.restore(abstract_state, data_iter=data_iter, expect_model=expect_model)
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
    log_keys: Optional[tuple[str, ...]] = None
    """Metrics written at a log step (None: every scalar the step returns except `finite`)."""
    nonfinite_advice: str = "The last checkpoint holds finite params; lower the lr or inspect the data near this step"
    num_steps_name: str = "num_steps"
    """The binding that sets `num_steps` (e.g. `train.num_steps`), named in errors and the summary line."""

    def __post_init__(self) -> None:
        for name, value, low in ((self.num_steps_name, self.num_steps, 1), ("log_every", self.log_every, 1),
                                 ("checkpoint_every", self.checkpoint_every, 1), ("eval_every", self.eval_every, 0),
                                 ("max_nonfinite", self.max_nonfinite, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigValueError(f"{name}={value!r}: must be an integer >= {low}")


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(step, state) -> metrics | None` run every `every` steps (and at the last); metrics are logged."""

    every: int
    fn: Callable[[int, Any], Optional[dict]]


def run_loop(step_fn: Callable[[Any, Any], tuple[Any, dict]], state: Any, start: int, train_it: Iterator,
             ckpt: Checkpointer, metrics_log: MetricsLog, cfg: LoopConfig, *,
             evaluate: Optional[Callable[[Any], dict]] = None, meta: Optional[dict] = None,
             hooks: Sequence[Hook] = (), extra_iters: Optional[dict[str, Any]] = None) -> tuple[Any, dict, bool]:
    """Runs steps `start..cfg.num_steps` of `step_fn` on batches from `train_it`.

    Blocks on each step, logs every `log_every` steps (tokens/s when the step reports `tokens`), calls
    `evaluate(state)` every `eval_every` (and once at step 0), runs `hooks`, checkpoints every
    `checkpoint_every` and at the end (state + `train_it` + `extra_iters`, e.g. PPO's pretraining data),
    skips non-finite updates (stopping after `max_nonfinite` in a row), and on SIGTERM/SIGINT saves and returns
    early. Returns `(state, last_logged_metrics, stopped_by_signal)`.
    """
    num_steps, log_every, eval_every = cfg.num_steps, cfg.log_every, cfg.eval_every
    iters = {"": train_it, **(extra_iters or {})} if extra_iters else train_it
    stop = _StopFlag()
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=num_steps, initial=start, dynamic_ncols=True, desc=cfg.desc)
    if start == 0 and eval_every and evaluate is not None:
        metrics_log.write(0, evaluate(state))
    ema, last, t0, tokens_seen, done = None, {}, time.perf_counter(), 0.0, start
    try:
        for step in range(start, num_steps):
            state, metrics = step_fn(state, next(train_it))
            metrics = jax.device_get(metrics)  # blocks: one step in flight at a time
            tokens_seen += float(metrics.get("tokens", 0.0))
            done = step + 1
            if not metrics["finite"]:
                report_skipped_step(done, int(metrics["skipped"]), cfg.max_nonfinite, cfg.nonfinite_advice)
            elif "loss" in metrics:
                loss = float(metrics["loss"])
                if ema is not None and loss > cfg.spike_factor * ema:
                    log.warning("step %d: loss spike %.4f (running mean %.4f)", done, loss, ema)
                ema = loss if ema is None else 0.98 * ema + 0.02 * loss
            if done % log_every == 0 or done == num_steps:
                dt = time.perf_counter() - t0
                keys = cfg.log_keys or [k for k in metrics if k != "finite" and not isinstance(metrics[k], str)]
                last = {k: float(metrics[k]) for k in keys if k in metrics}
                if "tokens" in metrics:
                    last["tokens_per_s"] = tokens_seen / max(dt, 1e-9)
                last["skipped"] = int(metrics["skipped"])
                if evaluate is not None and eval_every and (done % eval_every == 0 or done == num_steps):
                    last.update(evaluate(state))
                metrics_log.write(done, last)
                t0, tokens_seen = time.perf_counter(), 0.0
            elif evaluate is not None and eval_every and done % eval_every == 0:
                metrics_log.write(done, evaluate(state))
            for hook in hooks:
                if done % hook.every == 0 or done == num_steps:
                    out = hook.fn(done, state)
                    if out:
                        metrics_log.write(done, out)
            if bar is not None:
                bar.update(1)
                if "loss" in last:
                    bar.set_postfix(loss=f"{last['loss']:.3f}")
            if done % cfg.checkpoint_every == 0 or done == num_steps or stop.requested:
                ckpt.save(done, state, iters, meta, force=True)
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
    outcome.record(outcome.RunOutcome(
        "stopped" if stop.requested else "finished", step=done if num_steps > start else start, num_steps=num_steps,
        workdir=metrics_log.workdir, num_steps_name=cfg.num_steps_name, signal=stop.signum,
        resumed_from=start or None))
    return state, last, stop.requested


def run_stage(workdir: str, abstract_state: Any, init: Callable[[], Any],
              step_fn: Callable[[Any, Any], tuple[Any, dict]], train_it: Iterator, cfg: LoopConfig, *,
              checkpoint: CheckpointConfig = CheckpointConfig(), evaluate: Optional[Callable[[Any], dict]] = None,
              meta: Optional[dict] = None, hooks: Sequence[Hook] = (),
              extra_iters: Optional[dict[str, Any]] = None) -> tuple[Any, dict, bool]:
    """Lock, resume-or-start, then `run_loop` in `workdir` (`checkpoints/`, `metrics.jsonl`): a stage's whole life.

    `abstract_state`: shapes/shardings of the state (restore target); `init()`: the fresh state when the workdir
    holds no usable checkpoint. A second run on the same workdir fails at once (`WorkdirBusyError`); checkpoints
    of another config raise `CheckpointMismatchError` (`meta["model"]` and the state's shapes are compared); a
    checkpoint past `cfg.num_steps` is a `ConfigValueError`, one at `cfg.num_steps` means "already complete"
    (nothing runs; the outcome says so). Rows of `metrics.jsonl` past the restored step are set aside, so a
    resumed run's log equals the uninterrupted one's.
    """
    with WorkdirLock(workdir):
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), checkpoint)
        iters = {"": train_it, **extra_iters} if extra_iters else train_it
        try:
            start, state = restore_or_init(abstract_state, ckpt, iters, init, (meta or {}).get("model"))
        except BaseException:
            ckpt.close()
            raise
        if start >= cfg.num_steps:
            ckpt.close()
            if start > cfg.num_steps:
                raise ConfigValueError(
                    f"{cfg.num_steps_name}={cfg.num_steps} is below the step of the newest checkpoint in {workdir} "
                    f"({start}); nothing to do. Raise {cfg.num_steps_name} to continue, or use a new --workdir")
            outcome.record(outcome.RunOutcome("already_complete", step=start, num_steps=cfg.num_steps,
                                              workdir=workdir, num_steps_name=cfg.num_steps_name))
            rows = [r for r in read_metrics(workdir) if r.get("step") == start] if os.path.exists(
                os.path.join(workdir, "metrics.jsonl")) else []
            return state, {k: v for r in rows for k, v in r.items() if k != "step"}, False
        return run_loop(step_fn, state, start, train_it, ckpt, MetricsLog(workdir, resume_step=start), cfg,
                        evaluate=evaluate, meta=meta, hooks=hooks, extra_iters=extra_iters)
