"""Entry points run end to end on the tiny configs (slow: several compilations)."""

import json
import os

import pytest

from experiments import ppo as ppo_exp
from experiments import reward_model as rm_exp

CFG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "configs", "rlhf")


@pytest.mark.slow
def test_reward_model_then_ppo_against_it(tmp_path, capsys):
    rm_dir, ppo_dir = str(tmp_path / "rm"), str(tmp_path / "ppo")
    assert rm_exp.main(["--gin", os.path.join(CFG, "rm_tiny.gin"), "--workdir", rm_dir]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] >= 0.9
    assert ppo_exp.main(["--gin", os.path.join(CFG, "ppo_tiny.gin"), "--workdir", ppo_dir,
                         "--gin_param", "train_ppo.iterations = 3",
                         "--gin_param", f"train_ppo.reward = 'rm:{rm_dir}'"]) == 0  # the RM's Orbax workdir
    out = capsys.readouterr().out
    assert "gen" in out and "tok/s" in out
    rows = [json.loads(line) for line in open(os.path.join(ppo_dir, "metrics.jsonl"))]
    assert len(rows) == 3 and "time/generation" in rows[0]
    assert os.path.exists(os.path.join(ppo_dir, "rollouts.jsonl"))
    assert os.path.isdir(os.path.join(ppo_dir, "checkpoints", "3"))  # the actor, as an Orbax checkpoint
