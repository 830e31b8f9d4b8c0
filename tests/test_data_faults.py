"""Issue 16, data pipeline: every fault injected, and what must happen instead of data loss or silence.

Tiny corpora in tmp_path; the local runner only (the Beam runner shares the decoding and the staged write,
`tests/data/test_data_pipeline.py` checks it gives byte-identical output).
"""

from __future__ import annotations

import errno
import json
import os
import pathlib

import gin
import pytest

from experiments import prepare_data
from internlm2_jax.data import normalize, output, pipeline, writers
from internlm2_jax.data.stats import BadInput
from internlm2_jax.errors import InputDataError

ZH = "这是第{i}篇中文文档，我们在这里测试数据管道的编码处理能力，每一篇文档都必须完整保留。"
EN = "Document {i}: the café on the corner served a naïve résumé of the menu to every guest who came in."


def _jsonl(path: pathlib.Path, texts: list[str], encoding: str = "utf-8") -> list[bytes]:
    lines = [json.dumps({"id": f"d{i}", "text": t}, ensure_ascii=False).encode(encoding)
             for i, t in enumerate(texts)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return lines


def _read(path: pathlib.Path) -> tuple[list[dict], BadInput]:
    bad = BadInput()
    return list(normalize.read_jsonl([path], "web", bad)), bad


def _all_lines(work: pathlib.Path) -> list[dict]:
    """Every record of every JSONL shard (text + code + rejected): each input id exactly once."""
    return [r for p in sorted(work.glob("*/*.jsonl")) if not p.parent.name.startswith(".")
            for r in writers.read_jsonl_shard(p)]


def _run(work: pathlib.Path, paths: list[str], per_shard: int = 3, runner: str = "local") -> dict:
    cfg = pipeline.PipelineConfig(records_per_shard=per_shard)
    specs = [{"kind": "jsonl", "paths": paths, "source": "web"}]
    if runner == "local":
        return pipeline.run_local(specs, work, cfg)
    from internlm2_jax.data import beam_pipeline

    return beam_pipeline.run_beam(specs, work, cfg, runner=runner)


def test_bad_byte_in_chinese_utf8_file_keeps_all_documents(tmp_path):
    lines = _jsonl(tmp_path / "zh.jsonl", [ZH.format(i=i) for i in range(40)])
    data = (tmp_path / "zh.jsonl").read_bytes()
    cut = data.index(lines[17]) + len(lines[17]) // 2
    cut += next(k for k in range(4) if data[cut + k] & 0xC0 != 0x80)  # between two characters
    (tmp_path / "zh.jsonl").write_bytes(data[:cut] + b"\xff" + data[cut:])
    recs, bad = _read(tmp_path / "zh.jsonl")
    assert len(recs) == 40
    assert bad.counts == {"undecodable_bytes": 1} and bad.examples["undecodable_bytes"] == [
        f"{tmp_path / 'zh.jsonl'}:18: 1 byte(s)"]
    assert "\ufffd" in recs[17]["text"] and recs[17]["meta"] == {"undecodable_bytes": 1}
    assert all(r["text"] == ZH.format(i=i) for i, r in enumerate(recs) if i != 17)


def test_gb18030_bytes_in_english_utf8_file_are_not_mojibake(tmp_path):
    texts = [EN.format(i=i) for i in range(5)]
    texts[2] += " 中文"
    lines = _jsonl(tmp_path / "en.jsonl", texts)
    lines[2] = lines[2].replace("中文".encode(), "中文".encode("gb18030"))  # valid GB18030, invalid UTF-8
    (tmp_path / "en.jsonl").write_bytes(b"\n".join(lines))
    recs, bad = _read(tmp_path / "en.jsonl")
    assert [r["text"] for r in recs[:2]] == texts[:2] and "café" in recs[4]["text"]
    assert not any("茅" in r["text"] for r in recs)  # "café" read as GB18030
    assert bad.counts == {"undecodable_bytes": 4} and not bad.encodings
    # A file that is GB18030 through and through still decodes, and is reported.
    _jsonl(tmp_path / "gb.jsonl", [ZH.format(i=i) for i in range(3)], encoding="gb18030")
    recs, bad = _read(tmp_path / "gb.jsonl")
    assert recs[1]["text"] == ZH.format(i=1) and bad.encodings == {"gb18030": 1} and not bad.counts
    assert bad.to_dict()["examples"]["decoded_as_gb18030"] == [str(tmp_path / "gb.jsonl")]


def test_lone_surrogate_is_replaced_and_counted_not_a_crash(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [EN.format(i=i) for i in range(4)])
    with open(tmp_path / "a.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": "s", "text": "broken \\ud800 escape", "url": "http://x/\\udfff"}\n')
    stats = _run(tmp_path / "out", [str(tmp_path / "a.jsonl")])
    assert stats["bad_input"]["counts"] == {"lone_surrogates": 2}
    output.verify(tmp_path / "out")
    rec = next(r for r in _all_lines(tmp_path / "out") if r["id"] == "web/s")
    assert rec["text"] == "broken \ufffd escape" and rec["meta"]["lone_surrogates"] == 2


def _corpus(tmp_path: pathlib.Path, n: int, tag: str = "") -> list[str]:
    _jsonl(tmp_path / "in.jsonl", [EN.format(i=i) + f" {tag} " + "word " * (i % 7) for i in range(n)])
    return [str(tmp_path / "in.jsonl")]


def test_kill_during_write_phase_keeps_previous_output(tmp_path, monkeypatch):
    work = tmp_path / "out"
    _run(work, _corpus(tmp_path, 10))
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    paths = _corpus(tmp_path, 20, "second run")
    real, written = writers.to_json_bytes, []

    def dies_after_first_shard(rec):
        if len(written) == 3:  # killed at the 4th record written (a shard or two are done)
            raise KeyboardInterrupt("killed")
        written.append(rec["id"])
        return real(rec)

    monkeypatch.setattr(writers, "to_json_bytes", dies_after_first_shard)
    monkeypatch.setattr(pipeline.shutil, "rmtree", lambda *a, **k: None)  # kill -9: no cleanup runs
    with pytest.raises(KeyboardInterrupt):
        _run(work, paths)
    monkeypatch.undo()
    assert len(written) == 3
    (staging,) = work.glob(".staging-*")  # the killed run's partial shards, never in the output folders
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file() and staging not in p.parents} == before
    assert sum(output.verify(work)["outputs"].values()) == 10  # the previous run's output, complete
    # The next run clears the leftover and commits the new output.
    stats = _run(work, paths)
    assert not list(work.glob(".staging-*")) and stats["input_records"] == 20
    assert sorted(r["id"] for r in _all_lines(work)) == sorted(f"web/d{i}" for i in range(20))


def test_kill_during_commit_reads_as_incomplete(tmp_path, monkeypatch):
    work = tmp_path / "out"
    _run(work, _corpus(tmp_path, 10))
    calls = []
    real = os.replace

    def dies_on_second_rename(a, b):
        if pathlib.Path(a).parent.parent.name.startswith(".staging-"):  # a shard file renamed into place by
            return real(a, b)  # its writer (writers.write_shard) before the commit: not a commit rename
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real(a, b)

    monkeypatch.setattr(output.os, "replace", dies_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        _run(work, _corpus(tmp_path, 12))
    monkeypatch.undo()
    assert not (work / "manifest.json").exists()
    with pytest.raises(InputDataError, match=r"manifest\.json: missing: the output in .* is incomplete"):
        output.verify(work)
    assert prepare_data.main(["--verify", str(work)]) == 2
    _run(work, _corpus(tmp_path, 12))
    assert sum(output.verify(work)["outputs"].values()) == 12


@pytest.mark.parametrize("runner", ["local", "DirectRunner"])
def test_rerun_with_other_records_per_shard_leaves_no_stale_shards(tmp_path, runner):
    if runner != "local":
        pytest.importorskip("apache_beam")
    work = tmp_path / "out"
    paths = _corpus(tmp_path, 13)
    _run(work, paths, per_shard=2, runner=runner)
    n_before = len(list(work.rglob("*-*.jsonl")))
    _run(work, paths, per_shard=7, runner=runner)
    manifest = output.verify(work)  # also refuses any shard file not listed
    assert len(list(work.rglob("*-*.jsonl"))) < n_before
    assert {p.relative_to(work).as_posix() for p in work.glob("*/*-*.*")} == {e["path"] for e in manifest["shards"]}
    ids = [r["id"] for r in _all_lines(work)]
    assert len(ids) == len(set(ids)) == 13 and not list(work.glob(".staging-*"))
    (work / "text" / "text-00099.jsonl").write_text("{}\n")  # a stale shard is noticed
    with pytest.raises(InputDataError, match="text-00099.jsonl: not listed"):
        output.verify(work)


def test_glob_matching_nothing_is_an_error(tmp_path):
    pattern = str(tmp_path / "missing-*.jsonl")
    with pytest.raises(InputDataError, match=r"missing-\*\.jsonl: no file matches this pattern \(source 'web'\)"):
        _run(tmp_path / "out", [pattern])
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(InputDataError, match="no such directory"):
        pipeline.check_sources([{"kind": "text_dir", "root": str(tmp_path / "nope"), "source": "books"}])


def _main(capsys, *args: str) -> tuple[int, str, str]:
    gin.clear_config()
    try:
        code = prepare_data.main(["--gin", "experiments/configs/data/tiny.gin", *args])
    finally:
        gin.clear_config()
    out, err = capsys.readouterr()
    return code, out, err


def test_prepare_data_errors_are_one_line_exit_2(tmp_path, capsys):
    code, out, err = _main(capsys, "--workdir", str(tmp_path), "--gin_param", "PipelineConfig.records_per_shard = 0")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["error: bad value PipelineConfig.records_per_shard=0: must be >= 1"]
    code, out, err = _main(capsys, "--workdir", str(tmp_path / "r"), "--gin_param", "PipelineConfig.dedup_max_rounds = 0")
    assert code == 2 and err.strip().splitlines() == ["error: bad value PipelineConfig.dedup_max_rounds=0: must be >= 1"]
    assert not (tmp_path / "r").exists()  # refused before any work
    code, _, err = _main(capsys, "--workdir", str(tmp_path), "--gin_param", "prepare_data.synthetic_docs = 0",
                         "--gin_param", "prepare_data.stdlib_packages = ()", "--gin_param",
                         f"prepare_data.sources = ({{'kind': 'jsonl', 'paths': ['{tmp_path}/nope*.jsonl']}},)")
    lines = [ln for ln in err.splitlines() if " INFO " not in ln]
    assert code == 2 and lines == [f"error: {tmp_path}/nope*.jsonl: no file matches this pattern (source 'jsonl')"]


def test_prepare_data_summary_lines(tmp_path, capsys):
    _jsonl(tmp_path / "in.jsonl", [EN.format(i=i) for i in range(3)])
    (tmp_path / "in.jsonl").write_bytes((tmp_path / "in.jsonl").read_bytes().replace(b"menu", b"m\xffenu", 1))
    code, out, err = _main(capsys, "--workdir", str(tmp_path / "out"), "--gin_param", "prepare_data.synthetic_docs = 0",
                           "--gin_param", "prepare_data.stdlib_packages = ()", "--gin_param",
                           "prepare_data.quality_reference_docs = 0", "--gin_param",
                           f"prepare_data.sources = ({{'kind': 'jsonl', 'paths': ['{tmp_path}/in.jsonl']}},)")
    assert code == 0 and json.loads(out.split("\n}\n")[0] + "}")["input_records"] == 3
    assert f"wrote {tmp_path / 'out'} (manifest.json" in err
    assert "1 undecodable byte(s) replaced by U+FFFD" in err
    assert " INFO internlm2_jax.data.pipeline: read 3 records" in err  # progress


def test_disk_full_is_one_line_exit_6_previous_output_intact(tmp_path, capsys, monkeypatch):
    _jsonl(tmp_path / "in.jsonl", [EN.format(i=i) for i in range(3)])
    args = ("--workdir", str(tmp_path / "out"), "--gin_param", "prepare_data.synthetic_docs = 0", "--gin_param",
            "prepare_data.stdlib_packages = ()", "--gin_param", "prepare_data.quality_reference_docs = 0",
            "--gin_param", f"prepare_data.sources = ({{'kind': 'jsonl', 'paths': ['{tmp_path}/in.jsonl']}},)")
    assert _main(capsys, *args)[0] == 0
    before = (tmp_path / "out" / "manifest.json").read_bytes()

    def full(rec):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "shard"))

    monkeypatch.setattr(writers, "to_json_bytes", full)
    code, out, err = _main(capsys, *args)
    lines = [ln for ln in err.splitlines() if " INFO " not in ln]
    assert code == 6 and lines == [f"error: disk full writing {tmp_path}/out/shard (No space left on device); the "
                                   f"previous output in {tmp_path}/out is unchanged: free space and run the same "
                                   "command"]
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before and not list((tmp_path / "out").glob(".st*"))
    output.verify(tmp_path / "out")
