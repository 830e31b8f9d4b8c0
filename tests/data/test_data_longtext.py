"""Long-text filter: coherent text kept, shuffled-paragraph version dropped."""

from __future__ import annotations

import math
import random

from internlm2_jax.data import longtext, quality
from internlm2_jax.data.records import make_record


def _topic_doc(seed: int = 0, topics: int = 8) -> list[str]:
    """Paragraphs grouped by topic; each topic has its own vocabulary plus shared function words."""
    rng = random.Random(seed)
    func = "the a of and to in is was for on with as by at".split()
    paras = []
    for t in range(topics):
        vocab = [f"{chr(97 + t)}{''.join(rng.choice('bcdfghklmnprstvz') for _ in range(5))}" for _ in range(25)]
        for _ in range(rng.randint(7, 13)):  # uneven sizes: splits rarely hit topic boundaries
            words = [rng.choice(vocab) if rng.random() < 0.6 else rng.choice(func) for _ in range(90)]
            paras.append(" ".join(words).capitalize() + ".")
    return paras


def _lm() -> quality.NgramLM:
    return quality.NgramLM(order=2, cache_weight=0.5, cache_order=2)


def test_coherent_kept_shuffled_dropped():
    paras = _topic_doc()
    coherent = "\n\n".join(paras)
    shuffled_paras = list(paras)
    random.Random(1).shuffle(shuffled_paras)
    shuffled = "\n\n".join(shuffled_paras)
    assert longtext.is_long(coherent)
    f = longtext.LongTextFilter(_lm(), quality.word_encode, margins={"web": 0.75},
                                num_splits=16, context_chars=1000, target_chars=800)
    rc = make_record("c", coherent, "s", lang="en", type="web")
    rs = make_record("s", shuffled, "s", lang="en", type="web")
    assert f.reason(rc) is None, rc["meta"]
    assert f.reason(rs) == "long_incoherent", rs["meta"]
    assert rc["meta"]["coherence_gain"] > rs["meta"]["coherence_gain"] + 0.3


def test_short_texts_pass_and_stats_rules():
    f = longtext.LongTextFilter(_lm(), quality.word_encode)
    assert f.reason(make_record("x", "short text", "s", lang="en", type="web")) is None
    rep = "\n\n".join(["the same paragraph again and again"] * 2000)
    assert f.reason(make_record("r", rep, "s", lang="en", type="web")) == "long_dup_paragraphs"


def test_ngram_lm_probabilities_normalize():
    lm = quality.NgramLM(order=2, cache_weight=0.3).fit([[0, 1, 2, 1, 2, 3], [0, 2, 3]])
    vocab = sorted(lm.vocab)
    # Hand check: the distribution over the vocab (+1 unseen) sums to <= 1 and is positive.
    for ctx in ([0], [0, 1], [0, 2, 3]):
        tot = sum(math.exp(lm.logprobs(ctx + [c])[-1]) for c in vocab)
        assert 0 < tot <= 1.0 + 1e-9
    # Seen bigram is likelier than an unseen one.
    assert lm.logprobs([0, 1, 2])[-1] > lm.logprobs([0, 1, 3])[-1]
