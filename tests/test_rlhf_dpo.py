"""DPO on a tiny model: cached reference log-probs, and a few steps raise the implicit reward accuracy; the DPO
stage (`experiments.dpo`) raises the held-out margin."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from internlm2_jax import get_preset
from internlm2_jax.rlhf.dpo import cache_reference, dpo_step, encode_dpo_batch
from internlm2_jax.rlhf.reward_model import init_policy
from internlm2_jax.rlhf.toy_tasks import CharTokenizer, toy_preference_records
from internlm2_jax.train.optimizer import OptimizerConfig, make_optimizer

TOK = CharTokenizer()
CFG = get_preset("tiny", dtype="float32", vocab_size=TOK.vocab_size)
RLHF = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "configs", "rlhf")


@pytest.mark.outcome
def test_dpo_trains_against_cached_reference(seed):
    recs = [r for r in toy_preference_records(32, seed=seed) if r["condition"] == "likes_a"]
    batch = encode_dpo_batch(recs, TOK, seq_len=48)
    assert batch["chosen_mask"].sum() > 0 and np.all(batch["chosen_mask"][:, :5] == 0)
    params = nn.meta.unbox(init_policy(CFG, jax.random.key(seed)))
    (cached,) = cache_reference(CFG, params, [batch])
    tx = make_optimizer(OptimizerConfig(peak_lr=3e-3, warmup_steps=0, schedule="constant", weight_decay=0.0))
    opt = tx.init(params)
    params, opt, m0 = dpo_step(CFG, params, opt, cached, tx=tx, beta=0.1)
    np.testing.assert_allclose(float(m0["dpo_loss"]), np.log(2), rtol=1e-5)  # policy == reference at step 0
    for _ in range(15):
        params, opt, m = dpo_step(CFG, params, opt, cached, tx=tx, beta=0.1)
    assert float(m["dpo_loss"]) < 0.6 and float(m["reward_accuracy"]) > 0.8 and bool(m["finite"])
    # A NaN reference log-prob: the update is skipped (params and optimizer state bit-identical).
    bad = {**cached, "ref_chosen": np.full_like(np.asarray(cached["ref_chosen"]), np.nan)}
    before = jax.tree.map(np.array, (params, opt))
    params, opt, m = dpo_step(CFG, params, opt, bad, tx=tx, beta=0.1)
    assert not bool(m["finite"])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((params, opt))))


@pytest.mark.outcome
def test_dpo_stage_raises_the_held_out_margin(tmp_path, seed):
    """`experiments.dpo` on the tiny preference data: the held-out implicit-reward margin starts at 0 (policy =
    reference) and ends clearly positive, with most held-out pairs ranked right."""
    import gin

    from experiments import dpo
    from internlm2_jax.train.metrics_log import read_metrics

    gin.clear_config()
    args = ["--gin", os.path.join(RLHF, "dpo_tiny.gin"), "--workdir", str(tmp_path), "--gin_param",
            "train_dpo.data = ['toy:128']", "--gin_param", f"train_dpo.seed = {seed}"]
    assert dpo.main(args) == 0
    evals = [r for r in read_metrics(str(tmp_path)) if "eval_reward_margin" in r]
    print("held-out margin / accuracy", [(r["step"], r["eval_reward_margin"], r["eval_reward_accuracy"]) for r in evals])
    assert evals[0]["step"] == 0 and evals[0]["eval_reward_margin"] == 0.0
    assert evals[-1]["eval_reward_margin"] > 1.0 and evals[-1]["eval_reward_accuracy"] >= 0.9
