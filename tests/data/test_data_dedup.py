"""Dedup quality against exact (independently computed) shingle Jaccard similarities."""

from __future__ import annotations

import random

import numpy as np
import pytest

from internlm2_jax.data import dedup


def _exact_jaccard(a: str, b: str, n: int = 5) -> float:
    """Reference: word n-gram set Jaccard for space-separated lower-case alnum words."""
    def grams(t: str) -> set[tuple[str, ...]]:
        w = t.split()
        return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def _planted_corpus(seed: int = 0, n_base: int = 400, length: int = 150):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20000)]
    texts, pairs = [], []
    for i in range(n_base):
        base = [rng.choice(vocab) for _ in range(length)]
        k = rng.choice([0, 1, 2, 3, 4] if i % 2 == 0 else [10, 11, 12, 14, 16])
        var = list(base)
        for pos in rng.sample(range(length), k):
            var[pos] = rng.choice(vocab)
        texts += [" ".join(base), " ".join(var)]
        pairs.append((2 * i, 2 * i + 1))
    return texts, pairs


def test_recall_and_false_positives_vs_exact_jaccard():
    texts, pairs = _planted_corpus()
    cid = dedup.near_duplicate_clusters(texts)
    hi = [(i, j) for i, j in pairs if _exact_jaccard(texts[i], texts[j]) >= 0.8]
    lo = [(i, j) for i, j in pairs if _exact_jaccard(texts[i], texts[j]) <= 0.5]
    assert len(hi) > 100 and len(lo) > 100
    recall = np.mean([cid[i] == cid[j] for i, j in hi])
    fp = np.mean([cid[i] == cid[j] for i, j in lo])
    assert recall >= 0.95, recall
    assert fp <= 0.05, fp
    # Unrelated base documents (J ~ 0) never merge.
    assert len({cid[i] for i, _ in pairs}) == len(pairs)


def test_optimal_bands_matches_datasketch():
    lsh = pytest.importorskip("datasketch.lsh")
    assert dedup.optimal_bands(0.7, 128, 0.5, 0.5) == lsh._optimal_param(0.7, 128, 0.5, 0.5) == (14, 9)
    assert dedup.optimal_bands(0.7, 128) == lsh._optimal_param(0.7, 128, 0.4, 0.6) == (16, 8)
    assert dedup.optimal_bands(0.5, 64, 0.5, 0.5) == lsh._optimal_param(0.5, 64, 0.5, 0.5)


def test_chinese_uses_character_shingles():
    assert dedup.shingle_tokens("我们的模型 hello World") == ["我", "们", "的", "模", "型", "hello", "world"]
    a = "我们的模型在大量数据上进行训练并且使用了严格的数据过滤方法来提高质量" * 2
    b = a.replace("训练", "学习", 1)
    c = "今天天气很好我们一起去公园散步然后回家吃饭晚上看书学习新的知识和技能" * 2
    cid = dedup.near_duplicate_clusters([a, b, c])
    assert cid[0] == cid[1] != cid[2]


def _reference_token_hashes(text: str) -> list[int]:
    """The documented token hash, in plain Python over the regex tokenizer's tokens."""
    p, mult, mask = 0x100000001B3, 0xC2B2AE3D27D4EB4F, (1 << 64) - 1
    out = []
    for tok in dedup.shingle_tokens(text):
        h = sum(ord(c) * pow(p, j, 1 << 64) for j, c in enumerate(tok)) & mask
        out.append(((h ^ (h >> 31)) * mult) & mask)
    return out


def test_vectorized_token_hashes_match_regex_tokens(monkeypatch):
    monkeypatch.setattr(dedup, "_CHUNK_CHARS", 64)  # force several chunks, and one oversized text
    texts = ["Hello World_x 42!", "我们的模型 hello World", "", "ΟΔΟΣ café İstanbul ßx", "a\nb\tc",
             "  ", "・カタカナ한국어", "emoji 😀 ok", "tab\x00nul", "x" * 300, "end ς.", "日本語とEnglish混合"]
    h, counts = dedup.token_hashes(texts)
    assert counts.tolist() == [len(dedup.shingle_tokens(t)) for t in texts]
    for t, got in zip(texts, np.split(h, np.cumsum(counts)[:-1])):
        assert got.tolist() == _reference_token_hashes(t), t


def test_exact_duplicates_code_and_empty():
    code = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 3
    cid = dedup.near_duplicate_clusters([code, "", code, "", "short"])
    assert cid[0] == cid[2] == 0
    assert cid[1] == 1 and cid[3] == 3 and cid[4] == 4  # empty texts never cluster


def test_minhash_estimates_jaccard():
    texts, pairs = _planted_corpus(seed=1, n_base=60)
    h = dedup.MinHasher(256, seed=3)
    sig = h.signatures([dedup.shingle_hashes(t) for t in texts])
    err = [abs(np.mean(sig[i] == sig[j]) - _exact_jaccard(texts[i], texts[j])) for i, j in pairs]
    assert np.mean(err) < 0.05


def test_streaming_equals_batch_and_keep_most_recent():
    texts, _ = _planted_corpus(seed=2, n_base=50)
    dd = dedup.StreamingDeduper()
    for s in range(0, len(texts), 17):
        dd.add(texts[s : s + 17])
    assert dd.clusters() == dedup.near_duplicate_clusters(texts)
    keep = dedup.keep_most_recent([0, 0, 2, 0], ["2020-01-01", "2023-05-01", None, "2021-01-01"])
    assert keep.tolist() == [False, True, True, False]
    assert dedup.cluster_size_histogram([0, 0, 2, 0, 4]) == {"1": 2, "3": 1}
