"""Sources: JSONL / plain text / ArrayRecord / TFDS fixtures, and bad-input errors."""

import json

import numpy as np
import pytest

from internlm2_jax.input.sources import (
    ArrayRecordSource,
    BadRecordError,
    JsonlSource,
    PlainTextSource,
    open_source,
)


def _write_jsonl(path, texts, extra_lines=()):
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_reads_all_lines_in_order(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", ["alpha", "beta"])
    (tmp_path / "b.jsonl").write_text('{"text": "gamma"}\n\n{"text": "dé\\nlta"}\n')
    src = open_source(f"jsonl:{tmp_path}/*.jsonl")
    assert len(src) == 4
    assert [src[i] for i in range(4)] == ["alpha", "beta", "gamma", "dé\nlta"]
    assert src[5] == "beta"  # indices wrap (Grain sources are read modulo length)


def test_jsonl_custom_field_and_split_placeholder(tmp_path):
    (tmp_path / "validation-0.jsonl").write_text('{"content": "x"}\n')
    src = open_source(f"jsonl:{tmp_path}/{{split}}-*.jsonl", "validation", text_field="content")
    assert src[0] == "x"


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", ["ok", "ok2"], ['{"text": "unterminated'])
    src = JsonlSource(str(path))
    assert src[1] == "ok2"
    with pytest.raises(BadRecordError, match=r"bad\.jsonl:3: malformed JSON"):
        src[2]


def test_jsonl_missing_field_and_skip_mode(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "f.jsonl", ["ok"], ['{"body": "no text"}', "not json"])
    with pytest.raises(BadRecordError, match=r"f\.jsonl:2: record has no string field 'text'"):
        JsonlSource(str(path))[1]
    src = JsonlSource(str(path), on_error="skip")
    assert [src[i] for i in range(3)] == ["ok", None, None]
    assert src.num_skipped == 2
    assert "f.jsonl:3" in caplog.text  # skips are logged, never silent


def test_missing_files_raise_with_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        JsonlSource(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"\*\.txt"):
        open_source(f"text:{tmp_path}/*.txt")
    with pytest.raises(ValueError, match="unknown source kind"):
        open_source("csv:/x")


def test_plain_text_file_and_paragraph_modes(tmp_path):
    (tmp_path / "1.txt").write_text("para one\nstill one\n\n  \n\npara two\n")
    (tmp_path / "2.txt").write_text("second file")
    (tmp_path / "3.txt").write_text("  \n")  # whitespace-only file: no document
    by_file = PlainTextSource(f"{tmp_path}/*.txt", mode="file")
    assert [by_file[i] for i in range(len(by_file))] == [
        "para one\nstill one\n\n  \n\npara two\n", "second file"]
    by_par = PlainTextSource(f"{tmp_path}/*.txt", mode="paragraph")
    assert [by_par[i] for i in range(len(by_par))] == [
        "para one\nstill one", "para two\n", "second file"]
    (tmp_path / "4.txt").write_bytes(b"ok\n\n\xff\xfe bad")
    with pytest.raises(BadRecordError, match=r"4\.txt:3: invalid UTF-8"):
        PlainTextSource(str(tmp_path / "4.txt"), mode="paragraph")[1]


def test_array_record_source(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    for shard, texts in enumerate([["a0", "a1"], ["b0"]]):
        w = ArrayRecordWriter(str(tmp_path / f"d-{shard}.array_record"), "group_size:1")
        for t in texts:
            w.write(json.dumps({"text": t}).encode())
        if shard == 1:
            w.write(b"{broken")
        w.close()
    src = open_source(f"arrayrecord:{tmp_path}/d-*.array_record")
    assert len(src) == 4 and [src[i] for i in range(3)] == ["a0", "a1", "b0"]
    with pytest.raises(BadRecordError, match=r"d-1\.array_record:record 1"):
        src[3]
    assert ArrayRecordSource(f"{tmp_path}/d-1.array_record", on_error="skip")[1] is None


def test_tfds_local_builder_roundtrip(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from internlm2_jax.input.tfds_builder import build_local_tfds

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _write_jsonl(corpus / "train-00000-of-00001.jsonl", ["t0", "t1", "t2"])
    _write_jsonl(corpus / "validation-00000-of-00001.jsonl", ["v0"])
    builder = build_local_tfds(corpus, tmp_path / "tfds")
    ds = builder.as_data_source(split="train")
    assert sorted(ds[i]["text"] for i in range(len(ds))) == [b"t0", b"t1", b"t2"]
    # The same data through the source URI (tfds.data_source + text decoding).
    src = open_source(f"tfds:local_text_corpus@{tmp_path / 'tfds'}", "validation")
    assert len(src) == 1 and src[0] == "v0"
    direct = tfds.data_source("local_text_corpus", split="train", data_dir=str(tmp_path / "tfds"))
    assert len(direct) == 3
    assert np.all([isinstance(direct[i]["text"], bytes) for i in range(3)])


@pytest.mark.parametrize("block", [3, 7, 1 << 22])
def test_line_index_streams_across_blocks(tmp_path, block):
    from internlm2_jax.input.sources import _line_spans

    data = b'{"a": 1}\n\n  \t\n{"bb": 22}\r\n\n{"c": 3}'  # no trailing newline
    (tmp_path / "x.jsonl").write_bytes(data)
    s, e, ln = _line_spans(str(tmp_path / "x.jsonl"), block)
    assert [data[i:j] for i, j in zip(s, e)] == [b'{"a": 1}', b'{"bb": 22}\r', b'{"c": 3}']
    assert ln.tolist() == [1, 4, 6]
