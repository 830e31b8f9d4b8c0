"""Online RLHF rounds (train RM → PPO → scan rollouts for reward hacking → patch the RM):
`python -m experiments.online_rlhf --gin experiments/configs/rlhf/online_tiny.gin`.

Fast path: `internlm2_jax.rlhf.online.scan_rollouts` turns flagged top-reward rollouts into preference
pairs (`round_k/patch_pairs.jsonl`), added to the next round's RM data. Slow path: set
`online_rounds.human_data = {round: [jsonl paths]}` to add human-labelled preference files per round.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

import gin

from experiments.cli import entry_point
from experiments.ppo import train_ppo
from experiments.reward_model import train_rm
from internlm2_jax.rlhf.online import RoundHooks, RuleChecks, run_rounds


class _StageStopped(Exception):
    """A stage saved and stopped on a signal: a half-trained RM must not feed the next PPO run."""


@gin.configurable
def online_rounds(workdir: str, base_data: Sequence[str] = ("toy:256",), rounds: int = 3,
                  human_data: Optional[dict] = None, top_fraction: float = 0.25, max_pairs: int = 100,
                  max_chars: int = 2000, max_repeat_ratio: float = 0.5, format_regex: Optional[str] = None):
    """Runs the rounds with the gin-configured `train_rm` / `train_ppo`; returns the per-round summary."""
    def rm_hook(k: int, rdir: str, files: list[str]) -> str:
        out = os.path.join(rdir, "rm")
        if train_rm(out, data=files).get("stopped"):  # base data + every earlier patch / human-labelled file
            raise _StageStopped(out)
        return out

    def ppo_hook(k: int, rdir: str, rm_dir: str) -> str:
        out = os.path.join(rdir, "ppo")
        if train_ppo(out, reward="rm:" + rm_dir).get("stopped"):  # the RM workdir (Orbax checkpoint)
            raise _StageStopped(out)
        return os.path.join(out, "rollouts.jsonl")

    hooks = RoundHooks(rm_hook, ppo_hook, lambda k: list((human_data or {}).get(k, [])))
    checks = (RuleChecks(max_chars=max_chars, max_repeat_ratio=max_repeat_ratio, format_regex=format_regex),)
    try:
        return run_rounds(hooks, list(base_data), workdir, rounds, checks=checks, top_fraction=top_fraction,
                          max_pairs=max_pairs)
    except _StageStopped as stopped:  # SIGTERM/SIGINT inside a stage: stop the rounds; the same command resumes
        return [{"stopped_in": str(stopped)}]


@entry_point
def main(argv=None) -> int:
    from experiments.cli import parse_args

    args = parse_args(__doc__, default_gin="rlhf/online_tiny.gin", argv=argv)
    print(json.dumps({"workdir": args.workdir, "rounds": online_rounds(args.workdir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
