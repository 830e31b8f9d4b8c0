"""`python -m experiments.eval` end to end on the tiny config (shrunk further by gin bindings)."""

import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(__file__))
TINY = os.path.join(ROOT, "experiments", "configs", "eval", "tiny.gin")
SMALLER = [  # the pretraining test's model (its 512-piece tokenizer is cached) and fewer prompts
    "model_config.vocab_size = 512", "model_config.hidden_size = 64", "model_config.intermediate_size = 128",
    "model_config.num_hidden_layers = 2", "model_config.max_position_embeddings = 64",
    "perplexity_suite.max_batches = 2", "perplexity_suite.seq_len = 64",
    "needle_suite.context_lengths = [96, 192]", "needle_suite.depths = [0, 50, 100]",
    "needle_suite.max_new_tokens = 4", "tasks_suite.tasks = ['add', 'lookup']", "tasks_suite.num_examples = 4",
    "tasks_suite.max_new_tokens = 4", "chat_bench_suite.max_new_tokens = 4", "speed_suite.batch_sizes = [1, 2]",
    "speed_suite.prompt_len = 32", "speed_suite.new_tokens = 8", "speed_suite.repeats = 1",
]


def _run(workdir, *bindings):
    cmd = [sys.executable, "-m", "experiments.eval", "--gin", TINY, "--workdir", str(workdir)]
    for b in bindings:
        cmd += ["--gin_param", b]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
                          check=False)


def test_cli_tiny_writes_results_and_plots(tmp_path):
    proc = _run(tmp_path, *SMALLER)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["failed"] == {}
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["suites"]) == {"perplexity", "needle", "tasks", "chat_bench", "speed"}
    assert res["metadata"]["source"].startswith("init:") and res["metadata"]["params"] > 0
    assert np.asarray(res["suites"]["needle"]["grid"]).shape == (2, 3)
    assert res["suites"]["perplexity"]["tokens"] > 0 and res["suites"]["perplexity"]["perplexity"] > 1
    assert res["suites"]["tasks"]["n"] == 8 and res["suites"]["chat_bench"]["n"] == 4
    assert [r["batch_size"] for r in res["suites"]["speed"]["runs"]] == [1, 2]
    assert all(r["decode_tokens_per_s"] > 0 for r in res["suites"]["speed"]["runs"])
    for png in ("needle.png", "scores.png"):
        with open(tmp_path / png, "rb") as f:
            assert f.read(4) == b"\x89PNG"


def test_cli_bad_suite_name_fails_fast(tmp_path):
    start = time.time()
    proc = _run(tmp_path, "evaluate.suitez = ['needle']")
    assert proc.returncode == 2 and "suitez" in proc.stderr
    assert not (tmp_path / "results.json").exists() and time.time() - start < 60


def test_eval_configs_parse():
    import gin

    from internlm2_jax.eval.runner import SUITES
    from internlm2_jax.gin_setup import parse_gin

    try:
        for name in ("tiny.gin", "internlm2_7b.gin"):
            gin.clear_config()
            gin.add_config_file_search_path(ROOT)
            parse_gin([os.path.join(ROOT, "experiments", "configs", "eval", name)], [])
            assert set(gin.query_parameter("evaluate.suites")) <= set(SUITES)
        assert gin.query_parameter("needle_suite.context_lengths")[-1] == 32768
        assert gin.query_parameter("evaluate.hf_path")
    finally:
        gin.clear_config()
