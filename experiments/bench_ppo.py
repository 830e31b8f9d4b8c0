"""PPO benchmark on a tiny config (CPU, < 2 min): `python -m experiments.bench_ppo`.

Measures (after a warm-up iteration that compiles everything):
  * rollout tokens/s of the KV-cache sampler (`internlm2_jax.generate.generate`), and as a baseline in
    the same run, of naive generation without a cache (one full forward over the whole buffer per token);
  * the PPO iteration time breakdown: generation / scoring (reward + old log-probs, values, advantages) /
    training (critic + actor steps).
Prints a table; the last line is `rollout_speedup_vs_no_cache=<float>`.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from internlm2_jax.config import ModelConfig, get_preset
from internlm2_jax.model import forward
from internlm2_jax.rlhf.rl_trainer import RLConfig, RLTrainer
from internlm2_jax.rlhf.reward_model import init_policy, init_reward_params
from internlm2_jax.rlhf.rollout import make_prompt_items
from internlm2_jax.rlhf.toy_tasks import TOY_CONDITIONS, CharTokenizer, target_token_reward, toy_prompts
from internlm2_jax.generate import generate, sample_logits
from internlm2_jax.train.optimizer import OptimizerConfig, make_optimizer

BATCH, PROMPT_LEN, NEW_TOKENS, ITERS = 16, 32, 32, 3


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def generate_no_cache(config: ModelConfig, params: Any, tokens: jax.Array, lengths: jax.Array, rng: jax.Array, *,
                      max_new_tokens: int) -> jax.Array:
    """Baseline sampler: `tokens [B, P]` right-padded → `[B, max_new_tokens]`, one full forward over the
    `[B, P + N]` buffer per new token (no KV cache; same top-p-free temperature-1 sampling)."""
    b, p = tokens.shape
    buf = jnp.pad(tokens, ((0, 0), (0, max_new_tokens)))

    def body(i, carry):
        buf, rng = carry
        rng, sub = jax.random.split(rng)
        logits = forward(config, params, buf)[jnp.arange(b), lengths + i - 1]
        tok = sample_logits(logits, sub, temperature=1.0, top_k=0, top_p=1.0)
        return buf.at[jnp.arange(b), lengths + i].set(tok), rng

    buf, _ = jax.lax.fori_loop(0, max_new_tokens, body, (buf, rng))
    return jax.vmap(lambda row, n: jax.lax.dynamic_slice(row, (n,), (max_new_tokens,)))(buf, lengths)


def _time(fn, repeats: int = 3) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t0) / repeats


def run(argv: Sequence[str] = ()) -> dict[str, float]:
    tok = CharTokenizer()
    cfg = get_preset("tiny", dtype="float32", vocab_size=tok.vocab_size)
    params = nn.meta.unbox(init_policy(cfg, jax.random.key(0)))
    items = make_prompt_items(toy_prompts(64, tok), tok, TOY_CONDITIONS)[:BATCH]
    prompts = [it["tokens"] for it in items]
    lengths = np.array([len(p) for p in prompts], np.int32)
    padded = np.zeros((BATCH, PROMPT_LEN), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    n_tok = BATCH * NEW_TOKENS
    t_cache = _time(lambda: generate(cfg, params, prompts, max_new_tokens=NEW_TOKENS, temperature=1.0,
                                     stop_ids=(-5,), rng=jax.random.key(1)))  # no stop: all N tokens
    t_naive = _time(lambda: generate_no_cache(cfg, params, jnp.asarray(padded), jnp.asarray(lengths),
                                              jax.random.key(1), max_new_tokens=NEW_TOKENS))
    target = tok.encode("a")[0]
    tx = make_optimizer(OptimizerConfig(peak_lr=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.0))
    ppo = RLConfig(batch_size=BATCH, max_prompt_len=PROMPT_LEN, max_new_tokens=NEW_TOKENS, critic_warmup_iters=0,
                   ptx_coef=0.0, top_p=1.0)
    trainer = RLTrainer(cfg, ppo, params, init_reward_params(cfg, jax.random.key(1), backbone=params),
                        lambda it, r: target_token_reward(r, target), tx, tx, stop_ids=tok.stop_ids)
    trainer.iterate(items)  # compile
    rows = [trainer.iterate(items) for _ in range(ITERS)]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("time/generation", "time/scoring", "time/training",
                                                                "rollout_tokens_per_s", "response_length")}
    total = mean["time/generation"] + mean["time/scoring"] + mean["time/training"]
    print(f"tiny model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}; "
          f"batch {BATCH}, prompt <= {PROMPT_LEN}, {NEW_TOKENS} new tokens; device {jax.devices()[0].platform}")
    print(f"{'measurement':<34}{'value':>12}")
    for name, value in [("rollout tok/s (KV cache)", n_tok / t_cache), ("rollout tok/s (no cache, baseline)",
                        n_tok / t_naive), ("PPO iter: generation s", mean["time/generation"]),
                        ("PPO iter: scoring s", mean["time/scoring"]), ("PPO iter: training s", mean["time/training"]),
                        ("PPO iter: total s", total), ("PPO iter: rollout tok/s", mean["rollout_tokens_per_s"]),
                        ("PPO iter: mean response length", mean["response_length"])]:
        print(f"{name:<34}{value:>12.3f}")
    speedup = t_naive / t_cache
    print(f"rollout_speedup_vs_no_cache={speedup:.3f}")
    return {"speedup": speedup, **mean}


def main(argv: Sequence[str] | None = None) -> int:
    run(argv or sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
