"""Online fast path: rule checks, hack scan → preference pairs, and the round driver with stub hooks."""

import json
import os

from internlm2_jax.rlhf.online import RoundHooks, RuleChecks, run_rounds, scan_rollouts, write_jsonl
from internlm2_jax.rlhf.preference_data import tokenize_pairs
from internlm2_jax.rlhf.toy_tasks import TOY_CONDITIONS, CharTokenizer

P1 = [{"role": "user", "content": "q1"}]
P2 = [{"role": "user", "content": "q2"}]
ROLLOUTS = [
    {"messages": P1, "category": "likes_a", "response": "ab" * 20, "reward": 4.0},   # repetitive hack
    {"messages": P1, "category": "likes_a", "response": "a fine answer", "reward": 1.0},
    {"messages": P2, "category": "likes_b", "response": "x" * 50, "reward": 3.5},   # too long
    {"messages": P2, "category": "likes_b", "response": "ok", "reward": 0.5},
    {"messages": P2, "category": "likes_b", "response": "also ok", "reward": 0.7},
    {"messages": P1, "category": "likes_a", "response": "low and bad " * 9, "reward": -2.0},  # not top-rewarded
]


def test_rule_checks():
    rc = RuleChecks(max_chars=30, max_repeat_ratio=0.5, format_regex=None)
    assert rc({"response": "x" * 31}).startswith("length")
    assert rc({"response": "abababababab"}).startswith("repetition")
    assert rc({"response": "a normal reply"}) is None
    assert RuleChecks(format_regex=r"^\d+$")({"response": "12a"}).startswith("format")


def test_scan_pairs_flagged_top_rewards_with_clean_responses(tmp_path):
    checks = (RuleChecks(max_chars=30), lambda r: "verifier" if r["response"] == "also ok" else None)
    pairs = scan_rollouts(ROLLOUTS, checks=checks, top_fraction=0.5)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a fine answer", "ab" * 20), ("ok", "x" * 50)]
    assert pairs[0]["condition"] == "likes_a" and pairs[1]["reason"].startswith("length")
    # The patch file is directly usable as RM preference data.
    path = os.path.join(tmp_path, "patch.jsonl")
    write_jsonl(path, pairs)
    recs = [json.loads(line) for line in open(path)]
    tok = CharTokenizer()
    tokenized, dropped = tokenize_pairs(recs, tok, TOY_CONDITIONS, tok.reward_id, max_len=256)
    assert len(tokenized) == 2 and dropped == 0


def test_round_driver_threads_patches_and_human_data(tmp_path):
    seen = []

    def train_rm(k, rdir, files):
        seen.append(list(files))
        return rdir

    def run_ppo(k, rdir, rm_dir):
        path = os.path.join(rdir, "rollouts.jsonl")
        write_jsonl(path, ROLLOUTS)
        return path

    hooks = RoundHooks(train_rm, run_ppo, human_data=lambda k: [f"human_{k}.jsonl"])
    summary = run_rounds(hooks, ["base.jsonl"], str(tmp_path), rounds=2, top_fraction=0.5,
                         checks=(RuleChecks(max_chars=30),))
    assert [s["patch_pairs"] for s in summary] == [2, 2]
    assert seen[0] == ["base.jsonl", "human_0.jsonl"]
    assert seen[1][:2] == ["base.jsonl", "human_0.jsonl"] and seen[1][2].endswith("round_0/patch_pairs.jsonl")
    assert seen[1][3] == "human_1.jsonl"


def test_a_stage_stopped_by_a_signal_stops_the_rounds(tmp_path, monkeypatch):
    import experiments.online_rlhf as online_cli

    calls = []
    monkeypatch.setattr(online_cli, "train_rm", lambda out, data: calls.append(("rm", out)) or {"stopped": True})
    monkeypatch.setattr(online_cli, "train_ppo", lambda out, reward: calls.append(("ppo", out)) or {})
    out = online_cli.online_rounds(str(tmp_path), rounds=2)
    assert [c[0] for c in calls] == ["rm"]  # a half-trained RM never feeds PPO
    assert out == [{"stopped_in": calls[0][1]}]
