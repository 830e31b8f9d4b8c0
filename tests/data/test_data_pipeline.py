"""End to end: the tiny gin config, Grain-readable shards, stats and bad input; Beam == local."""

from __future__ import annotations

import json

import gin
import pytest

from experiments import prepare_data
from internlm2_jax.data import output, writers

TINY = "experiments/configs/data/tiny.gin"
SMALL = ["prepare_data.synthetic_docs = 60", "prepare_data.stdlib_packages = ('json',)",
         "prepare_data.quality_reference_docs = 40"]


def _run(workdir, *extra: str) -> dict:
    gin.clear_config()
    try:
        code = prepare_data.main(["--gin", TINY, "--workdir", str(workdir),
                                  *sum((["--gin_param", b] for b in extra), [])])
    finally:
        gin.clear_config()
    assert code == 0
    output.verify(workdir)  # manifest committed, every shard present with its checksum
    return json.loads((workdir / "stats.json").read_text())


def test_tiny_end_to_end(tmp_path):
    stats = _run(tmp_path, *SMALL)
    # Bad input is counted, never fatal.
    assert stats["bad_input"]["counts"]["malformed_json"] == 1
    assert stats["bad_input"]["counts"]["empty_file"] >= 1
    st = stats["stages"]
    assert st["rules"]["dropped"] == {"min_words": 10, "symbol_ratio": 10}
    assert st["dedup"]["dropped"] == {"near_duplicate": 6}
    assert st["dedup"]["cluster_size_histogram"]["2"] == 6
    assert st["safety"]["dropped"] == {"blocked_domain": 10, "blocked_words": 10}
    assert st["longtext"]["dropped"] == {"long_incoherent": 1}
    # Grain reads the ArrayRecord shards; JSONL twins hold the same records.
    files = stats["files"]
    ar = [str(tmp_path / f) for f in files["text"] if f.endswith(".array_record")]
    js = [tmp_path / f for f in files["text"] if f.endswith(".jsonl")]
    recs = writers.read_array_record_shards(ar)
    assert recs == [r for p in js for r in writers.read_jsonl_shard(p)]
    assert len(recs) == stats["outputs"]["text"]["records"]
    ids = {r["id"] for r in recs}
    assert "synthetic/d0-dup" in ids and "synthetic/d0" not in ids  # most recent kept
    assert "synthetic/long-coherent" in ids and "synthetic/long-shuffled" not in ids
    rejected = [r for f in files["rejected"] for r in writers.read_jsonl_shard(tmp_path / f)]
    assert {r["meta"]["dropped_by"] for r in rejected} >= {"rules/min_words", "dedup/near_duplicate",
                                                          "safety/blocked_domain", "longtext/long_incoherent"}
    code = writers.read_array_record_shards([str(tmp_path / f) for f in files["code"] if f.endswith(".array_record")])
    text = "".join(r["text"] for r in code)
    assert text.index("# json/scanner.py") < text.index("# json/decoder.py")  # decoder imports scanner


def test_beam_direct_runner_equals_local(tmp_path):
    pytest.importorskip("apache_beam")
    local = _run(tmp_path / "local", *SMALL)
    beam = _run(tmp_path / "beam", *SMALL, "prepare_data.runner = 'DirectRunner'")
    for s in (local, beam):
        s["bad_input"]["examples"] = {k: [e.split("/input/")[-1] for e in v]
                                      for k, v in s["bad_input"]["examples"].items()}
    assert beam == local
    for f in sum(local["files"].values(), []):
        assert (tmp_path / "local" / f).read_bytes() == (tmp_path / "beam" / f).read_bytes(), f
    # A pattern matching nothing stops the Beam runner too, before any worker runs (issue 16).
    from internlm2_jax.data import beam_pipeline, pipeline
    from internlm2_jax.errors import InputDataError

    with pytest.raises(InputDataError, match=r"nope-\*\.jsonl: no file matches"):
        beam_pipeline.run_beam([{"kind": "jsonl", "paths": [str(tmp_path / "nope-*.jsonl")]}], tmp_path / "b2",
                               pipeline.PipelineConfig())


def test_approx_tokens_counts_words_and_single_cjk_characters():
    from internlm2_jax.data.stats import approx_tokens

    # Hello, world, 你, 好, 世, 界, ＡＢ (full-width letters: one word), 豈, 更 (CJK compatibility block), 한, 국
    assert approx_tokens("Hello, world! 你好 世界 ＡＢ 豈更 한국") == 11
    assert approx_tokens("  \n\t ") == 0
