"""Packed SFT rows: logits equal each conversation alone; masks, positions, buckets."""

import flax.linen as nn
import jax
import numpy as np

from internlm2_jax import forward, get_preset, init_params
from internlm2_jax.sft.packing import bucketed_batches, packed_batches, pack_rows

CFG = get_preset("tiny", dtype="float32")


def _examples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(3, 14))
        ids = [1] + rng.integers(3, 500, k - 1).tolist()
        out.append((ids, [False] * (k // 2) + [True] * (k - k // 2)))
    return out


def test_packed_logits_equal_separate_runs():
    params = nn.meta.unbox(init_params(CFG, jax.random.key(0)))
    ex = _examples(7)
    batches = list(packed_batches(ex, batch_size=2, seq_len=24))
    fwd = jax.jit(lambda t, p, s: forward(CFG, params, t, positions=p, segment_ids=s))
    alone = jax.jit(lambda t: forward(CFG, params, t))
    seen = 0
    for b in batches:
        logits = np.asarray(fwd(b["tokens"], b["positions"], b["segment_ids"]))
        for r in range(b["tokens"].shape[0]):
            for seg in range(1, b["segment_ids"][r].max() + 1):
                idx = np.nonzero(b["segment_ids"][r] == seg)[0]
                ids = b["tokens"][r, idx]
                match = [i for i, (e, m) in enumerate(ex) if list(e) == ids.tolist()]
                assert match, "segment is not one of the conversations"
                buf = np.zeros((1, 24), np.int32)
                buf[0, : len(idx)] = ids
                ref = np.asarray(alone(buf))[0, : len(idx)]
                np.testing.assert_allclose(logits[r, idx], ref, atol=2e-5, rtol=2e-5)
                np.testing.assert_array_equal(b["positions"][r, idx], np.arange(len(idx)))
                want = np.asarray(ex[match[0]][1], np.int32)
                want[0] = 0
                np.testing.assert_array_equal(b["loss_mask"][r, idx], want)
                seen += 1
    assert seen == 7


def test_pack_rows_and_buckets():
    ex = _examples(20, seed=1)
    rows = pack_rows(ex, 32)
    assert sorted(i for r in rows for i in r) == list(range(20))
    assert all(sum(len(ex[i][0]) for i in r) <= 32 for r in rows)
    total = 0
    for b in bucketed_batches(ex, 4, multiple=8, shuffle_seed=0):
        assert b["tokens"].shape[0] == 4 and b["tokens"].shape[1] % 8 == 0
        lens = (b["segment_ids"] > 0).sum(1)
        assert b["tokens"].shape[1] - 8 < lens.max() <= b["tokens"].shape[1]
        total += int((lens > 0).sum())
    assert total == 20
