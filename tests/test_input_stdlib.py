"""Embedded stdlib corpus + cached tokenizer, and the pipeline on it."""

import json
import os

import numpy as np
import pytest

from internlm2_jax.input import InputConfig, make_pretrain_iterator
from internlm2_jax.input.stdlib_corpus import build_stdlib_corpus, default_cache_dir, ensure_tokenizer, stdlib_files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, build_stdlib_corpus(cache, max_bytes=400_000, val_fraction=0.2, num_shards=2)


def _lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_corpus_layout_split_and_determinism(corpus, tmp_path):
    cache, d = corpus
    manifest = json.loads((d / "manifest.json").read_text())
    train = _lines(d / "train-00000-of-00002.jsonl") + _lines(d / "train-00001-of-00002.jsonl")
    val = _lines(d / "validation-00000-of-00001.jsonl")
    assert manifest["train"] == len(train) > 0 and manifest["validation"] == len(val) > 0
    assert 400_000 <= manifest["bytes"] < 400_000 + 2_000_000  # capped (stops after the cap)
    paths = [r["path"] for r in train + val]
    assert not {r["path"] for r in train} & {r["path"] for r in val}
    assert not any(p.split("/")[-1].startswith("test_") or "/test/" in f"/{p}" for p in paths)
    # Cached: same directory returned; rebuilt elsewhere: byte-identical shards.
    assert build_stdlib_corpus(cache, max_bytes=400_000, val_fraction=0.2, num_shards=2) == d
    d2 = build_stdlib_corpus(tmp_path, max_bytes=400_000, val_fraction=0.2, num_shards=2)
    for name in os.listdir(d):
        assert (d / name).read_bytes() == (d2 / name).read_bytes()


def test_stdlib_files_skips_tests_and_site_packages():
    rels = [r for r, _ in stdlib_files()]
    assert rels == [r for r, _ in stdlib_files()] and len(rels) == len(set(rels))  # deterministic
    assert "os.py" in rels and "json/decoder.py" in rels
    assert not [r for r in rels if "site-packages" in r or r.startswith("test/")]


def test_ensure_tokenizer_cached_and_pipeline(corpus):
    from internlm2_jax.tokenizer import Tokenizer

    cache, d = corpus
    path = ensure_tokenizer(d, 512, cache)
    mtime = os.path.getmtime(path)
    assert ensure_tokenizer(d, 512, cache) == path and os.path.getmtime(path) == mtime
    tok = Tokenizer(path)
    assert tok.vocab_size == 512
    assert tok.sp.piece_to_id("<|im_start|>") != tok.sp.unk_id()
    text = "def f(x):\n    return x + 1\n"
    assert tok.sp.decode(tok.encode(text)) == text

    # (`stdlib:<cache>` would build the default 20 MB corpus; read the small one directly.)
    cfg = InputConfig(sources={"stdlib": f"jsonl:{d}/{{split}}-*.jsonl"}, seq_len=64,
                      global_batch_size=2)
    b = next(make_pretrain_iterator(cfg, tokenizer=tok, shard_index=0, shard_count=1))
    assert b["tokens"].shape == (2, 64) and b["tokens"].max() < 512
    val = list(make_pretrain_iterator(cfg, tokenizer=tok, split="validation", shard_index=0,
                                      shard_count=1))
    n_tok = sum(int(x["loss_mask"].sum()) for x in val)
    assert n_tok > 1000 and np.all([x["tokens"].shape == (2, 64) for x in val])


def test_stdlib_uri_kind(tmp_path):
    from internlm2_jax.input.pipeline import open_config_source

    src = open_config_source(f"stdlib:{tmp_path}", "validation", InputConfig())
    assert len(src) > 0 and "def " in "".join(src[i] for i in range(len(src)))


def test_default_cache_dir_is_the_user_cache(monkeypatch, tmp_path, capfd):
    monkeypatch.delenv("INTERNLM2_JAX_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "internlm2_jax")  # what the README says
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "internlm2_jax")
    monkeypatch.setenv("INTERNLM2_JAX_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == str(tmp_path / "mine")
    capfd.readouterr()
    d = build_stdlib_corpus(None, max_bytes=50_000, num_shards=1)
    assert str(d).startswith(str(tmp_path / "mine"))
    first = capfd.readouterr().err
    build_stdlib_corpus(None, max_bytes=50_000, num_shards=1)
    assert first.count("\n") == 1 and "building the Python-stdlib pretraining corpus" in first
    assert capfd.readouterr().err == ""  # nothing when cached
