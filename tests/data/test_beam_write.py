"""The parallel shard write (issue 20): a layout both runners share, and no record gathered on one worker."""

from __future__ import annotations

import collections
import pathlib

import pytest

from internlm2_jax.data import layout, output, pipeline, synthetic, writers

beam = pytest.importorskip("apache_beam")
from apache_beam.testing.util import assert_that  # noqa: E402

from internlm2_jax.data import beam_pipeline  # noqa: E402


def test_layout_is_stable_and_spreads_records():
    # Pinned (not Python's salted hash, which differs per process): another hash would reshuffle every
    # dataset between versions and make Beam workers disagree.
    assert [layout.shard_index(f"web/d{i}", 7) for i in range(8)] == [0, 0, 6, 0, 0, 4, 6, 1]
    assert [layout.shard_count(n, 10) for n in (0, 1, 10, 11, 100)] == [1, 1, 1, 2, 10]
    sizes = collections.Counter(layout.shard_index(f"id{i}", 10) for i in range(10_000))
    assert len(sizes) == 10 and max(sizes.values()) < 1_150  # ~1000 each
    with pytest.raises(ValueError, match="records_per_shard must be >= 1"):
        layout.shard_count(5, 0)


def test_write_shards_sorts_each_shard_and_writes_empty_ones(tmp_path):
    recs = [{"id": f"r{i}", "text": f"text {i}"} for i in (5, 3, 9, 1, 7, 2)]
    shards = writers.write_shards(recs, tmp_path, "rejected", records_per_shard=1)
    assert [pathlib.Path(s.path).name for s in shards] == [f"rejected-{k:05d}.jsonl" for k in range(6)]
    assert sum(s.records for s in shards) == 6 and any(s.records == 0 for s in shards)  # 6 ids, 6 shards: a gap
    for k, s in enumerate(shards):
        ids = [r["id"] for r in writers.read_jsonl_shard(s.path)]
        assert ids == sorted(ids) and all(layout.shard_index(i, 6) == k for i in ids)
        assert s.bytes == (tmp_path / "rejected" / pathlib.Path(s.path).name).stat().st_size
        assert s.sha256 == writers.file_digest(s.path)
    assert sorted(p.name for p in (tmp_path / "rejected").iterdir()) == [pathlib.Path(s.path).name for s in shards]


def _is_or_holds_record(value: object) -> bool:
    if isinstance(value, dict):
        return {"id", "text"} <= value.keys() or any(_is_or_holds_record(v) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return any(_is_or_holds_record(v) for v in value)
    return False


def test_beam_graph_gathers_no_records_on_one_worker(tmp_path):
    """Every side input of the whole pipeline (what one worker receives entire) is checked while it runs:
    a few elements (at most one per shard file) and no record in them."""
    paths = synthetic.write_corpus(tmp_path / "input", n_docs=60)
    specs = [{"kind": "jsonl", "paths": paths, "source": "synthetic"}]
    work = tmp_path / "out"
    cfg = pipeline.PipelineConfig(records_per_shard=1000)  # 2 + 2 + 1 shard files; 60+ records, 7+ files
    p = beam.Pipeline("DirectRunner")
    beam_pipeline.build(p, specs, str(work), str(output.new_staging(work)), cfg)
    side_inputs = []

    class _SideInputs(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node: object) -> None:
            side_inputs.extend((node.full_label, si.pvalue) for si in node.side_inputs)

    p.visit(_SideInputs())
    assert {label for label, _ in side_inputs} >= {"Commit", "Key text", "Key code", "Key rejected"}

    def small(label: str):
        def check(elements: list) -> None:
            assert len(elements) <= 5, (label, len(elements))
            assert not _is_or_holds_record(elements), label
        return check

    for i, (label, pcoll) in enumerate(side_inputs):
        assert_that(pcoll, small(label), label=f"Small side input {i}")
    p.run().wait_until_finish()
    stats = output.verify(work)["stats"]
    assert stats["outputs"]["text"]["records"] > 20 and stats["input_records"] > 60
