"""Normalization readers, classification and bad-input accounting."""

from __future__ import annotations

import json

from internlm2_jax.data import normalize, records
from internlm2_jax.data.stats import BadInput


def test_detect_lang_and_type():
    assert records.detect_lang("这是一个中文句子，我们在测试语言识别。" * 3) == "zh"
    assert records.detect_lang("The cat sat on the mat and it was happy with the day.") == "en"
    assert records.detect_lang("def f(x):\n    return x\n\nclass A:\n    pass\n") == "code"
    assert records.detect_lang("Der Hund läuft schnell über die Straße zum Park.") == "other"
    assert records.classify_type("We cite \\cite{a} and \\begin{equation} x \\end", lang="en") == "techlit"
    assert records.classify_type("Chapter One\nIt was...\nChapter Two\nThen...", lang="en") == "book"
    assert records.classify_type("hello world", lang="en") == "web"
    assert records.classify_type("x", lang="code") == "code"


def test_jsonl_bad_input_is_counted(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text("\n".join([
        json.dumps({"id": "1", "text": "The cat sat on the mat.", "url": "http://x.org/a",
                    "timestamp": "2023-01-01"}),
        "{not json",
        json.dumps({"id": "3", "body": "no text key"}),
        json.dumps({"id": "4", "text": "中文内容测试"}),
    ]), encoding="utf-8")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "gbk.jsonl").write_bytes(json.dumps({"text": "中文编码"}, ensure_ascii=False).encode("gb18030"))
    (tmp_path / "junk.jsonl").write_bytes(b"\x81\xff\x81\xff\x80" * 3)
    bad = BadInput()
    paths = sorted(tmp_path.glob("*.jsonl"))
    recs = list(normalize.read_jsonl(paths, "web", bad))
    texts = [r["text"] for r in recs]
    assert texts == ["The cat sat on the mat.", "中文内容测试", "中文编码"]
    assert recs[0]["meta"] == {"url": "http://x.org/a"} and recs[0]["timestamp"] == "2023-01-01"
    assert recs[0]["id"] == "web/1"
    assert bad.counts == {"malformed_json": 1, "missing_text": 1, "empty_file": 1, "unknown_encoding": 1}
    assert bad.files_read == 4


def test_text_dir_and_code_repo(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello there", encoding="utf-8")
    (tmp_path / "docs" / "b.txt").write_text("", encoding="utf-8")
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "m.py").write_text("import os\n", encoding="utf-8")
    (repo / "README.md").write_text("not code", encoding="utf-8")
    bad = BadInput()
    docs = list(normalize.read_text_dir(tmp_path / "docs", "txt", bad))
    assert [d["meta"]["path"] for d in docs] == ["a.txt"] and bad.counts["empty_file"] == 1
    code = list(normalize.read_code_repo(repo, "code", bad))
    assert len(code) == 1 and code[0]["meta"] == {"repo": "repo", "path": "pkg/m.py", "language": "python"}
    assert code[0]["type"] == "code" and code[0]["lang"] == "code"


def test_tfds_reader_with_fake_source(monkeypatch):
    import tensorflow_datasets as tfds

    data = [{"text": "The cat sat on the mat.".encode(), "label": 1}, {"text": b"\xff\xfe\x00"}, {"x": 1}]
    monkeypatch.setattr(tfds, "data_source", lambda name, split, data_dir=None: data)
    bad = BadInput()
    recs = list(normalize.read_tfds("fake", "tf", bad))
    assert [r["text"] for r in recs] == ["The cat sat on the mat."] and recs[0]["meta"] == {"label": 1}
    assert sum(bad.counts.values()) == 2
