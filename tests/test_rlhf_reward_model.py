"""Conditional reward model: data formats, token-budget packing, and a tiny RM that learns a conditional rule."""

import time

import jax
import numpy as np
import pytest

from internlm2_jax import get_preset
from internlm2_jax.rlhf.preference_data import pack_pairs, record_conversations, tokenize_pairs
from internlm2_jax.rlhf.reward_model import init_reward_params
from internlm2_jax.rlhf.reward_task import evaluate, rm_train_step
from internlm2_jax.rlhf.toy_tasks import TOY_CONDITIONS, CharTokenizer, toy_preference_records
from internlm2_jax.train.optimizer import OptimizerConfig, make_optimizer

TOK = CharTokenizer()
CFG = get_preset("tiny", dtype="float32", vocab_size=TOK.vocab_size)
NAMES = sorted(TOY_CONDITIONS)
PACK = dict(token_budget=1024, row_len=128, max_pairs=16, condition_names=NAMES)
EPOCHS = 4  # 2 epochs left likes_a at 0.59-0.84 on some seeds and CPUs; 4 gives >= 0.97 on seeds 0-4


def test_record_formats_are_equivalent():
    a = {"prompt": "hi", "chosen": "yes", "rejected": "no"}
    b = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}
    assert record_conversations(a) == record_conversations(b)
    pa, _ = tokenize_pairs([{**a, "condition": "likes_a"}], TOK, TOY_CONDITIONS, TOK.reward_id, max_len=64)
    pn, _ = tokenize_pairs([a], TOK, TOY_CONDITIONS, TOK.reward_id, max_len=64)
    assert pa[0].chosen[-1] == TOK.reward_id and "system" in TOK.decode(pa[0].chosen)
    assert len(pa[0].chosen) > len(pn[0].chosen)  # the condition adds its system turn
    with pytest.raises(KeyError, match="unknown reward condition"):
        tokenize_pairs([{**a, "condition": "nope"}], TOK, TOY_CONDITIONS, TOK.reward_id, max_len=64)
    _, dropped = tokenize_pairs([a], TOK, TOY_CONDITIONS, TOK.reward_id, max_len=10)
    assert dropped == 1


def test_junk_pairs_rank_the_preferred_letter():
    recs = toy_preference_records(200, seed=3, junk_fraction=0.25)
    junk = [r for r in recs if set(r["rejected"]) - set("ab")]
    assert 25 <= len(junk) <= 75 and {r["condition"] for r in junk} == set(TOY_CONDITIONS)
    for r in junk:
        letter = TOY_CONDITIONS[r["condition"]]
        assert len(r["chosen"]) == len(r["rejected"]) and r["chosen"].count(letter) > r["rejected"].count(letter) == 0
    assert toy_preference_records(50, seed=3) == toy_preference_records(50, seed=3, junk_fraction=0.0)


def test_packing_respects_token_budget():
    pairs, _ = tokenize_pairs(toy_preference_records(40), TOK, TOY_CONDITIONS, TOK.reward_id, max_len=64)
    batches = list(pack_pairs(pairs, **PACK))
    assert int(sum(b["pair_mask"].sum() for b in batches)) == 40
    for b in batches:
        assert b["tokens"].shape == (8, 128)  # 1024-token budget regardless of the pair count
        for i in np.nonzero(b["pair_mask"])[0]:
            for key in ("chosen_index", "rejected_index"):
                r, p = b[key][i]
                assert b["tokens"][r, p] == TOK.reward_id
                assert b["positions"][r, p] == np.sum(b["segment_ids"][r] == b["segment_ids"][r, p]) - 1
    pairs0 = tokenize_pairs(toy_preference_records(1), TOK, TOY_CONDITIONS, TOK.reward_id, max_len=64)[0][0]
    assert len(pairs0.chosen) + len(pairs0.rejected) <= 128


@pytest.mark.outcome
def test_tiny_rm_learns_conditional_rule(seed):
    """Condition likes_a prefers the mostly-'a' response, likes_b the mostly-'b' one (same response pairs)."""
    t0 = time.time()
    train, _ = tokenize_pairs(toy_preference_records(256, seed=seed), TOK, TOY_CONDITIONS, TOK.reward_id, max_len=64)
    test_recs = toy_preference_records(128, seed=seed + 1000)
    test, _ = tokenize_pairs(test_recs, TOK, TOY_CONDITIONS, TOK.reward_id, max_len=64)
    batches = list(pack_pairs(train, **PACK))
    tx = make_optimizer(OptimizerConfig(peak_lr=3e-3, end_lr_ratio=0.5, warmup_steps=5, total_steps=EPOCHS * len(batches),
                                        weight_decay=0.01))
    params = init_reward_params(CFG, jax.random.key(seed))
    opt = tx.init(params)
    for _ in range(EPOCHS):
        for b in batches:
            params, opt, m = rm_train_step(CFG, params, opt, b, tx=tx)
    assert bool(m["finite"])
    # A NaN in the batch: the update is skipped (params and optimizer state bit-identical), not applied.
    bad = {**batches[0], "pair_mask": np.where(np.arange(len(batches[0]["pair_mask"])) == 0, np.nan,
                                                batches[0]["pair_mask"]).astype(np.float32)}
    before = jax.tree.map(np.array, (params, opt))
    params, opt, m = rm_train_step(CFG, params, opt, bad, tx=tx)
    assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((params, opt))))
    acc = evaluate(CFG, params, list(pack_pairs(test, **PACK)), NAMES)
    print(f"held-out {acc} in {time.time() - t0:.1f}s")
    assert acc["accuracy"] >= 0.9 and acc["accuracy/likes_a"] >= 0.9 and acc["accuracy/likes_b"] >= 0.9
    # Same pair, flipped condition → flipped preference.
    flipped = [{**r, "condition": "likes_b" if r["condition"] == "likes_a" else "likes_a"} for r in test_recs]
    fl, _ = tokenize_pairs(flipped, TOK, TOY_CONDITIONS, TOK.reward_id, max_len=64)
    assert evaluate(CFG, params, list(pack_pairs(fl, **PACK)), NAMES)["accuracy"] <= 0.1
