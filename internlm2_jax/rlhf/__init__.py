"""COOL RLHF: conditional reward model, PPO (critic warm-up, ptx loss), online fast path, DPO and GRPO.

Models live on a `jax.sharding.Mesh` (`mesh`), load from HF / Orbax / msgpack and save with Orbax
(`checkpoints`), read prompt JSONL with a sentencepiece tokenizer (`prompts`) and compute per-token
log-probs in sequence chunks (`logprobs`).
"""

from internlm2_jax.rlhf.reward_loss import log_barrier, ranking_loss, reward_loss
from internlm2_jax.rlhf.reward_model import DEFAULT_CONDITIONS, init_reward_params, score, token_values

__all__ = ["DEFAULT_CONDITIONS", "init_reward_params", "log_barrier", "ranking_loss", "reward_loss", "score",
           "token_values"]
