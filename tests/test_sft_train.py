"""The SFT experiment end to end: CLI run to ≥ 90 % held-out exact match, HF export, LoRA from that export,
exact resume (grain iterator state in checkpoints), --show_mask; the tiny addition config as a slow test."""

import os
import shutil
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest

from internlm2_jax.checkpointing import Checkpointer
from internlm2_jax.gin_setup import parse_gin
from internlm2_jax.sft.train import sft_train
from internlm2_jax.train.metrics_log import read_metrics

ROOT = os.path.dirname(os.path.dirname(__file__))
TEST_GIN = os.path.join(ROOT, "tests", "configs", "sft_test.gin")


def _run(workdir, *bindings, gin_file=TEST_GIN):
    gin.clear_config()
    gin.add_config_file_search_path(ROOT)
    parse_gin([gin_file], list(bindings))
    return sft_train(str(workdir))


def _state(workdir, step):
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def _cli(workdir, *args):
    cmd = [sys.executable, "-m", "experiments.sft", "--gin", TEST_GIN, "--workdir", str(workdir), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, seed):
    workdir = tmp_path_factory.mktemp("sft_full")
    proc = _cli(workdir, "--gin_param", "sft_train.export_hf=True", "--gin_param", f"sft_train.seed={seed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.mark.outcome
def test_cli_reaches_exact_match_and_exports(full_run):
    rows = read_metrics(str(full_run))
    em = [r["eval_exact_match"] for r in rows if "eval_exact_match" in r]
    assert em and em[-1] >= 0.9, rows[-3:]
    assert Checkpointer(os.path.join(full_run, "checkpoints")).all_steps()
    assert {"config.json", "tokenizer.model"} <= set(os.listdir(full_run / "hf"))


def test_show_mask(full_run, tmp_path):
    shutil.copytree(full_run / "data", tmp_path / "data")
    proc = _cli(tmp_path, "--show_mask", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("[[") == 2 and "<|im_end|>]]" in proc.stdout and "Repeat" in proc.stdout
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.outcome
def test_lora_from_hf_export(full_run, tmp_path):
    """LoRA fine-tune starting from the exported HF folder (its tokenizer is picked up from there)."""
    last = _run(tmp_path, f"sft_train.init_from = '{full_run / 'hf'}'", "sft_train.task = None",
                f"sft_train.data = '{full_run / 'data' / 'train.jsonl'}'",
                f"sft_train.eval_data = '{full_run / 'data' / 'eval.jsonl'}'",
                "sft_train.mode = 'lora'", "sft_train.num_steps = 3", "sft_train.export_hf = True",
                "sft_train.eval_max_examples = 16", "OptimizerConfig.peak_lr = 1e-4")
    assert last["eval_exact_match"] >= 0.9  # starts from the fine-tuned model; B = 0 at init
    params = _state(tmp_path, 3)["params"]
    assert "tok_embeddings" not in params
    assert set(params["layers"]["attention"]["wqkv"]) == {"a", "b"}  # adapters + optimizer only
    assert os.path.exists(tmp_path / "hf" / "config.json")


def test_exact_resume(tmp_path):
    ref, work = tmp_path / "ref", tmp_path / "work"
    bindings = ("sft_train.num_steps = 6", "sft_train.checkpoint_every = 3", "sft_train.log_every = 1",
                "sft_train.task_sizes = (200, 8)", "CheckpointConfig.async_save = False",
                "sft_train.checkpoint = @CheckpointConfig()")
    _run(ref, *bindings)
    shutil.copytree(ref, work)
    shutil.rmtree(work / "checkpoints" / "6")
    _run(work, *bindings)  # resumes at step 3: same data order and params as the uninterrupted run

    def losses(w):
        return [(r["step"], r["loss"]) for r in read_metrics(str(w)) if "loss" in r]

    assert losses(work) == losses(ref) and [s for s, _ in losses(ref)] == list(range(1, 7))
    for a, b in zip(jax.tree.leaves(_state(work, 6)["params"]), jax.tree.leaves(_state(ref, 6)["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
@pytest.mark.outcome
def test_tiny_addition_reaches_90_percent(tmp_path, seed):
    """The demo config: 2-digit addition in chat form, fresh tiny model, held-out prompts."""
    last = _run(tmp_path, "sft_train.progress = False", f"sft_train.seed = {seed}",
                gin_file=os.path.join(ROOT, "experiments", "configs", "sft", "tiny.gin"))
    assert last["eval_exact_match"] >= 0.9, last


@pytest.mark.parametrize("name", ["internlm2_1_8b", "internlm2_7b", "internlm2_20b", "internlm2_7b_32k",
                                  "internlm2_7b_qlora", "tiny"])
def test_shipped_sft_configs_parse(name):
    gin.clear_config()
    gin.add_config_file_search_path(ROOT)
    parse_gin([os.path.join(ROOT, "experiments", "configs", "sft", f"{name}.gin")], [])
    assert gin.query_parameter("sft_train.mode") in ("full", "lora", "qlora")
    if name != "tiny":
        assert gin.query_parameter("OptimizerConfig.peak_lr") in (4e-5, 2e-4)
        assert gin.query_parameter("SFTDataConfig.seq_len") in (4096, 32768)
        assert gin.query_parameter("sft_train.epochs") == 1
