"""Online RLHF fast path: find reward hacking in rollouts and turn it into targeted preference pairs.

A rollout record is `{"messages": [...prompt turns], "category": str | None, "response": str, "reward": float}`.
Responses among the top-rewarded ones that a rule check (length, repetition, format) or a pluggable
verifier flags are treated as hacks: each becomes a `rejected` response, paired with a non-flagged
response to the same prompt as `chosen`. The JSONL output is a preference file the RM trainer reads
directly (it carries the prompt's category as the RM condition). The slow path (broad human-labelled
data) enters a round through `RoundHooks.human_data`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Any, Callable, Optional, Sequence

Verifier = Callable[[dict[str, Any]], Optional[str]]  # record → reason it is a hack, or None


@dataclasses.dataclass(frozen=True)
class RuleChecks:
    """Rule-based hack detectors; a threshold of 0 / None disables that rule."""

    max_chars: int = 2000                 # flag responses longer than this
    max_repeat_ratio: float = 0.5         # flag when one n-gram covers more than this fraction of the response
    ngram: int = 3
    format_regex: Optional[str] = None    # flag responses NOT matching (re.search) this pattern

    def __call__(self, record: dict[str, Any]) -> Optional[str]:
        text = record["response"]
        if self.max_chars and len(text) > self.max_chars:
            return f"length {len(text)} > {self.max_chars}"
        if self.max_repeat_ratio and len(text) >= 2 * self.ngram:
            grams = collections.Counter(text[i: i + self.ngram] for i in range(len(text) - self.ngram + 1))
            ratio = grams.most_common(1)[0][1] * self.ngram / len(text)
            if ratio > self.max_repeat_ratio:
                return f"repetition {ratio:.2f} > {self.max_repeat_ratio}"
        if self.format_regex and not re.search(self.format_regex, text):
            return f"format: no match for {self.format_regex!r}"
        return None


def _key(record: dict[str, Any]) -> str:
    return json.dumps([record.get("messages"), record.get("category")], sort_keys=True)


def scan_rollouts(records: Sequence[dict[str, Any]], *, checks: Sequence[Verifier] = (RuleChecks(),),
                  top_fraction: float = 0.2, max_pairs: int = 100) -> list[dict[str, Any]]:
    """Preference pairs `{"messages", "chosen", "rejected", "condition", "reason", "rewards"}` from hacks.

    Only records whose reward is in the top `top_fraction` of all rewards are examined; the chosen side
    is the best-rewarded non-flagged response to the same prompt (prompts without one are skipped).
    """
    if not records:
        return []
    rewards = sorted((r["reward"] for r in records), reverse=True)
    cutoff = rewards[max(int(len(rewards) * top_fraction) - 1, 0)]
    by_prompt: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in records:
        by_prompt[_key(r)].append(r)
    flags = {id(r): next((why for c in checks if (why := c(r))), None) for r in records}
    pairs = []
    for r in sorted(records, key=lambda x: -x["reward"]):
        if r["reward"] < cutoff or flags[id(r)] is None:
            continue
        clean = [o for o in by_prompt[_key(r)] if flags[id(o)] is None]
        if not clean:
            continue
        best = max(clean, key=lambda o: o["reward"])
        pairs.append({"prompt": r["messages"], "chosen": best["response"], "rejected": r["response"],
                      "condition": r.get("category"), "reason": flags[id(r)],
                      "rewards": [best["reward"], r["reward"]]})
        if len(pairs) >= max_pairs:
            break
    return pairs


def write_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """Writes one JSON object per line (atomically: a temp file renamed over `path`)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


@dataclasses.dataclass
class RoundHooks:
    """Callables of one online round; each takes the round index and a working directory.

    `train_rm(round, workdir, preference_files) -> rm_dir`, `run_ppo(round, workdir, rm_dir) -> rollouts.jsonl`,
    `human_data(round) -> list of preference JSONL paths` (the slow path; default none).
    """

    train_rm: Callable[[int, str, list[str]], str]
    run_ppo: Callable[[int, str, str], str]
    human_data: Callable[[int], list[str]] = lambda round_index: []


def run_rounds(hooks: RoundHooks, base_files: Sequence[str], workdir: str, rounds: int = 3, *,
               checks: Sequence[Verifier] = (RuleChecks(),), top_fraction: float = 0.2,
               max_pairs: int = 100) -> list[dict[str, Any]]:
    """Train RM → PPO → scan → patch, `rounds` times; each round's patch (and slow-path data) is added to
    the RM's preference files of the next round. Returns a summary per round."""
    import os

    files, summary = list(base_files), []
    for k in range(rounds):
        rdir = os.path.join(workdir, f"round_{k}")
        os.makedirs(rdir, exist_ok=True)
        files += hooks.human_data(k)
        rm_dir = hooks.train_rm(k, rdir, list(files))
        rollouts_path = hooks.run_ppo(k, rdir, rm_dir)
        with open(rollouts_path) as f:
            rollouts = [json.loads(line) for line in f if line.strip()]
        pairs = scan_rollouts(rollouts, checks=checks, top_fraction=top_fraction, max_pairs=max_pairs)
        patch = os.path.join(rdir, "patch_pairs.jsonl")
        write_jsonl(patch, pairs)
        files.append(patch)
        summary.append({"round": k, "rm_dir": rm_dir, "rollouts": len(rollouts), "patch_pairs": len(pairs)})
    return summary
