"""Beam dedup (distributed components + keyed keep-combine) == the local union-find dedup, record for record."""

from __future__ import annotations

import random

import pytest

beam = pytest.importorskip("apache_beam")
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402

from internlm2_jax.data import beam_pipeline, pipeline  # noqa: E402
from internlm2_jax.data.records import make_record  # noqa: E402


def _planted_records(seed: int = 0) -> list[dict]:
    """Families of edited copies (sizes 1..12), a 40-document chain of overlapping windows (neighbours
    J ~ 0.9, the ends unrelated), duplicate code files; timestamps random, missing or tied."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(30000)]
    stamps = [None, "", "2023-01-01", "2023-01-01T10:00:00Z", "2024-06-30", "2022-12-31T23:59:59Z"]
    texts: list[str] = []
    for _ in range(60):
        base = [rng.choice(vocab) for _ in range(120)]
        for _ in range(rng.choice([1, 1, 2, 3, 5, 12])):
            copy = list(base)
            for pos in rng.sample(range(len(copy)), rng.randint(0, 6)):
                copy[pos] = rng.choice(vocab)
            texts.append(" ".join(copy))
    stream = [rng.choice(vocab) for _ in range(40 * 6 + 200)]
    texts += [" ".join(stream[6 * k : 6 * k + 200]) for k in range(40)]
    recs = [make_record(f"t{i}", t, "web", lang="en", type="web", timestamp=rng.choice(stamps))
            for i, t in zip(rng.sample(range(10 * len(texts)), len(texts)), texts)]
    body = "def f(x):\n    return x + 1\n"
    for i in range(6):
        src = body if i % 2 else body.replace("    ", "  ")  # the same file re-indented: one code key
        recs.append(make_record(f"c{i}", src, "repo", lang="code", type="code", timestamp=rng.choice(stamps),
                                meta={"path": f"f{i}.py"}))
    rng.shuffle(recs)
    return recs


def test_beam_keep_most_recent_equals_local_union_find():
    recs = _planted_records()
    cfg = pipeline.PipelineConfig()
    kept, dropped, hist = pipeline.dedup_records([dict(r, meta=dict(r["meta"])) for r in recs], cfg)
    assert max(int(k) for k in hist) >= 40 and hist["1"] > 10  # the chain is one cluster; singletons exist
    assert sum(r["type"] == "code" for r in kept) == 1
    sizes = [int(k) for k, v in hist.items() for _ in range(v)]
    with beam.Pipeline("DirectRunner") as p:
        texts = p | "Texts" >> beam.Create([r for r in recs if r["type"] != "code"])
        codes = p | "Codes" >> beam.Create([r for r in recs if r["type"] == "code"])
        out = beam_pipeline.keep_most_recent(texts, codes, cfg)
        assert_that(out.kept | "KeptIds" >> beam.Map(lambda r: r["id"]), equal_to([r["id"] for r in kept]),
                    label="kept")
        assert_that(out.dropped | "DroppedIds" >> beam.Map(lambda r: (r["id"], r["meta"]["dropped_by"])),
                    equal_to([(r["id"], r["meta"]["dropped_by"]) for r in dropped]), label="dropped")
        assert_that(out.sizes, equal_to(sizes), label="sizes")


def test_dedup_max_rounds_comes_from_the_config():
    """`PipelineConfig.dedup_max_rounds` (gin-bindable) sets the components rounds unrolled in the graph."""
    labels = []

    class _Labels(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            labels.append(node.full_label)

    for rounds, expected in ((3, 3), (None, beam_pipeline.DEFAULT_MAX_ROUNDS)):
        labels.clear()
        p = beam.Pipeline("DirectRunner")
        texts = p | "Texts" >> beam.Create([])
        beam_pipeline.keep_most_recent(texts, p | "Codes" >> beam.Create([]),
                                       pipeline.PipelineConfig(dedup_max_rounds=rounds))
        p.visit(_Labels())
        assert {lb.split("/")[1] for lb in labels if lb.startswith("Components/Round")} == {
            f"Round{i}" for i in range(expected)}


def _tiny_run(workdir, *extra: str) -> dict:
    from test_data_pipeline import SMALL, _run  # noqa: PLC0415  (the Beam pipeline's existing fixtures)

    return _run(workdir, *SMALL, "prepare_data.runner = 'DirectRunner'", *extra)


def test_multi_process_direct_runner_writes_the_same_bytes(tmp_path):
    """~25 s (worker start-up), under the ~30 s that would send it to the slow suite. Shards are written by
    whichever worker holds them (`beam_write`); the layout makes the files identical anyway."""
    single = _tiny_run(tmp_path / "single", "prepare_data.beam_options = ('--direct_num_workers=1',)")
    multi = _tiny_run(tmp_path / "multi", "prepare_data.beam_options = ('--direct_num_workers=2', "
                      "'--direct_running_mode=multi_processing')")
    assert multi["stages"] == single["stages"] and multi["outputs"] == single["outputs"]
    assert multi["files"] == single["files"] and all(single["files"][k] for k in ("text", "code", "rejected"))
    for f in sum(single["files"].values(), []):
        assert (tmp_path / "single" / f).read_bytes() == (tmp_path / "multi" / f).read_bytes(), f
