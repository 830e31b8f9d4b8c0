"""Packing: hand-made documents -> exact rows (tokens / segment_ids / positions / loss_mask)."""

import grain
import numpy as np

from internlm2_jax.input.packing import document_tokens, pack_documents, split_document, stack_rows


def _rows(docs, seq_len, num_bins, packing=True, pad_id=0):
    ds = grain.MapDataset.source([{"tokens": np.asarray(d, np.int32)} for d in docs])
    return list(pack_documents(ds.to_iter_dataset(), seq_len, num_bins=num_bins, pad_id=pad_id,
                               packing=packing))


def _check(rows, expected):
    assert len(rows) == len(expected)
    for row, (tok, seg, pos) in zip(rows, expected):
        assert set(row) == {"tokens", "segment_ids", "positions", "loss_mask"}
        for k in row:
            assert row[k].dtype == np.int32 and row[k].shape == (len(tok),)
        np.testing.assert_array_equal(row["tokens"], tok)
        np.testing.assert_array_equal(row["segment_ids"], seg)
        np.testing.assert_array_equal(row["positions"], pos)
        np.testing.assert_array_equal(row["loss_mask"], (np.asarray(seg) > 0).astype(np.int32))


def test_document_tokens_and_split():
    np.testing.assert_array_equal(document_tokens([5, 6], bos_id=1, eos_id=2), [1, 5, 6, 2])
    np.testing.assert_array_equal(document_tokens([5, 6], bos_id=None, eos_id=2), [5, 6, 2])
    chunks = split_document(np.arange(10), 4)
    assert [c.tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_first_fit_exact_rows():
    # Bins: [1,2,3] -> bin0, [4,5] -> bin1, [6..9] fits nowhere -> emit both rows, restart.
    # The 7-token doc is split into [6,7,8,9] + [10,11,12] (positions restart in chunk 2).
    rows = _rows([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12], [13], [14, 15, 16]], 4, 2, pad_id=-1)
    _check(rows, [
        ([1, 2, 3, -1], [1, 1, 1, 0], [0, 1, 2, 0]),
        ([4, 5, -1, -1], [1, 1, 0, 0], [0, 1, 0, 0]),
        ([6, 7, 8, 9], [1, 1, 1, 1], [0, 1, 2, 3]),
        ([10, 11, 12, 13], [1, 1, 1, 2], [0, 1, 2, 0]),
        ([14, 15, 16, -1], [1, 1, 1, 0], [0, 1, 2, 0]),
    ])


def test_first_fit_fills_earlier_bin():
    # First fit: [7] goes back into bin 0 after [4,5,6] opened bin 1.
    rows = _rows([[1, 2], [4, 5, 6], [7], [8]], 4, 2)
    _check(rows, [
        ([1, 2, 7, 8], [1, 1, 2, 3], [0, 1, 0, 0]),
        ([4, 5, 6, 0], [1, 1, 1, 0], [0, 1, 2, 0]),
    ])


def test_no_document_crosses_rows_unless_split():
    rng = np.random.default_rng(0)
    docs, next_id = [], 1
    for n in rng.integers(1, 20, size=60):
        docs.append(list(range(next_id, next_id + n)))
        next_id += n
    rows = _rows(docs, 8, 4)
    segments = []
    for r in rows:
        for s in range(1, r["segment_ids"].max() + 1):
            m = r["segment_ids"] == s
            np.testing.assert_array_equal(r["positions"][m], np.arange(m.sum()))
            segments.append(r["tokens"][m].tolist())
    # Segments are exactly the 8-token chunks of the documents, each once.
    expected = [c.tolist() for d in docs for c in split_document(np.asarray(d), 8)]
    assert sorted(segments) == sorted(expected)


def test_unpacked_rows_and_batch_padding():
    rows = _rows([[1, 2, 3], [4, 5, 6, 7, 8]], 4, 2, packing=False)
    _check(rows, [
        ([1, 2, 3, 0], [1, 1, 1, 0], [0, 1, 2, 0]),
        ([4, 5, 6, 7], [1, 1, 1, 1], [0, 1, 2, 3]),
        ([8, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]),
    ])
    batch = stack_rows(rows, 4)
    assert batch["tokens"].shape == (4, 4)
    assert batch["loss_mask"][3].sum() == 0 and batch["segment_ids"][3].sum() == 0
