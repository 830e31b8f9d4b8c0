"""Safety (blocklist, word lists, trainable classifier) and quality (perplexity) filters."""

from __future__ import annotations

import random

import numpy as np
import pytest

from internlm2_jax.data import quality, safety
from internlm2_jax.data.records import make_record


def _rec(text: str, url: str | None = None):
    return make_record("r", text, "s", lang="en", type="web", meta={"url": url} if url else {})


def test_domain_blocklist_and_words():
    f = safety.SafetyFilter(["bad.example", "赌场.cn"], ["slurword", "hateful", "赌博", "色情"])
    assert f.reasons([_rec("fine text", "https://www.casino.bad.example/x?q=1")]) == ["blocked_domain"]
    assert f.reasons([_rec("fine text", "https://notbad.example/x")]) == [None]
    assert f.reasons([_rec("fine text", "http://sub.赌场.cn/")]) == ["blocked_domain"]
    assert f.reasons([_rec("a slurword and hateful speech")]) == ["blocked_words"]
    assert f.reasons([_rec("one slurword only")]) == [None]  # below min_word_hits=2
    assert f.reasons([_rec("hatefulness is not hateful twice")]) == [None]  # whole words only
    assert f.reasons([_rec("这里有赌博和色情内容")]) == ["blocked_words"]  # CJK substring match
    assert safety.url_host("HTTP://A.B.com:80/p") == "a.b.com"


def test_trainable_classifier_toy_dataset(tmp_path):
    rng = random.Random(0)
    bad_vocab = "kill hate attack weapon threat destroy violent 杀 仇恨 攻击".split()
    good_vocab = "garden recipe music river school friend book travel 花园 音乐 学校".split()
    make = lambda v: " ".join(rng.choice(v) for _ in range(12))
    texts = [make(bad_vocab) for _ in range(60)] + [make(good_vocab) for _ in range(60)]
    labels = [1] * 60 + [0] * 60
    clf = safety.HashedNgramLogReg(n_features=1 << 12).fit(texts, labels)
    test_bad = [make(bad_vocab) for _ in range(20)]
    test_good = [make(good_vocab) for _ in range(20)]
    assert (clf.score(test_bad) > 0.5).mean() >= 0.95 and (clf.score(test_good) < 0.5).mean() >= 0.95
    assert isinstance(clf, safety.TextClassifier)
    clf.save(str(tmp_path / "clf.npz"))
    clf2 = safety.HashedNgramLogReg.load(str(tmp_path / "clf.npz"))
    np.testing.assert_allclose(clf2.score(test_bad), clf.score(test_bad))
    f = safety.SafetyFilter(classifier=clf2)
    assert f.reasons([_rec(test_bad[0]), _rec(test_good[0])]) == ["unsafe_classifier", None]


_REF = ("the river flows past the old mill and the farmers bring grain to the market in autumn . "
        "the children watch the boats on the river and the old men talk in the market .")


def test_ngram_perplexity_scorer_and_filter():
    lm = quality.NgramLM(order=3).fit([quality.word_encode(_REF)] * 5)
    scorer = quality.PerplexityScorer(lm, quality.word_encode)
    fluent = "the farmers bring grain to the market and the children watch the boats ."
    word_salad = "market the boats grain farmers . the watch bring to children and the"
    gibberish = "xq zvv plorg wub fnarr kkt qq zzt"
    s = scorer.score([fluent, word_salad, gibberish])
    assert s[0] > s[1] > s[2]
    f = quality.QualityFilter(scorer, {"web": float((s[0] + s[1]) / 2)})
    assert f.reasons([_rec(fluent), _rec(word_salad)]) == [None, "low_quality"]
    # Hand-computed unigram check: add-k over min_vocab types, no data -> uniform.
    empty = quality.NgramLM(order=1, k=1.0, min_vocab=10)
    np.testing.assert_allclose(empty.logprobs([0, 5, 6]), np.log([0.1, 0.1]))


def test_char_level_lm_prefers_chinese_it_saw():
    zh = "我们的模型在大量数据上进行训练。" * 20
    lm = quality.NgramLM(order=4).fit([quality.char_encode(zh)])
    sc = quality.PerplexityScorer(lm).score(["模型在大量数据上进行训练", "训练行进上据数量大在型模"])
    assert sc[0] > sc[1]


def test_model_logprob_fn_adapter():
    internlm2_jax = pytest.importorskip("internlm2_jax")
    if not hasattr(internlm2_jax, "forward") or "tiny" not in getattr(internlm2_jax, "PRESETS", {}):
        pytest.skip("internlm2_jax.forward / tiny preset not available")
    import jax

    cfg = internlm2_jax.get_preset("tiny")
    params = internlm2_jax.init_params(cfg, jax.random.PRNGKey(0))
    fn = quality.model_logprob_fn(cfg, params, batch_size=2)
    seqs = [[1, 5, 6, 7], [1, 9], [1, 3, 4]]
    out = fn(seqs)
    assert [o.shape for o in out] == [(3,), (1,), (2,)]
    # Independent reference: full-softmax log-prob of each next token from forward's logits.
    logits = np.asarray(internlm2_jax.forward(cfg, params, jax.numpy.asarray([seqs[0]])))[0]
    ref = [logits[t] [seqs[0][t + 1]] - np.log(np.exp(logits[t] - logits[t].max()).sum()) - logits[t].max()
           for t in range(3)]
    np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-4)
    assert np.all(out[1] <= 0)
