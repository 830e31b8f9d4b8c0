"""End-to-end pipeline: mixing, determinism, per-process sharding, exact resume, checkpointing."""

import collections
import json

import numpy as np
import pytest

from internlm2_jax.input import InputConfig, make_pretrain_iterator
from internlm2_jax.input.pipeline import restore_iterator_state, save_iterator_state

BOS, EOS = 1, 2


class WordIdTokenizer:
    """Test tokenizer: "1003 7 7" -> [1003, 7, 7] (first word identifies the document)."""

    bos_id, eos_id, vocab_size = BOS, EOS, 1 << 20

    def encode(self, text, add_bos=False, add_eos=False):
        return [int(w) for w in text.split()]


TOK = WordIdTokenizer()


def _corpus(tmp_path, name, base, n_docs, max_len=6, seed=0):
    """JSONL source `name`: doc j = "<base + j>" followed by 0..max_len-1 filler ids."""
    rng = np.random.default_rng(seed)
    lines = [json.dumps({"text": " ".join([str(base + j)] + ["7"] * int(rng.integers(0, max_len)))})
             for j in range(n_docs)]
    (tmp_path / f"{name}-train.jsonl").write_text("\n".join(lines) + "\n")
    return f"jsonl:{tmp_path}/{name}-{{split}}.jsonl"


def _doc_ids(batches):
    """Document ids (first token after BOS of every segment starting with BOS), in order."""
    ids = []
    for b in batches:
        for tok, seg in zip(b["tokens"], b["segment_ids"]):
            for s in range(1, seg.max() + 1):
                t = tok[seg == s]
                if t[0] == BOS:
                    ids.append(int(t[1]))
    return ids


def _take(it, n):
    return [next(it) for _ in range(n)]


def _all(it):
    return list(it)


def _cfg(tmp_path, **kw):
    base = {"mixture": {"a": 3.0, "b": 1.0}, "seq_len": 16, "global_batch_size": 4, "seed": 0,
            "read_threads": 0}
    base.update(kw)
    if "sources" not in kw:
        base["sources"] = {"a": _corpus(tmp_path, "a", 100_000, 400),
                           "b": _corpus(tmp_path, "b", 200_000, 400, seed=1)}
    return InputConfig(**base)


def test_batch_shapes_and_dtypes(tmp_path):
    it = make_pretrain_iterator(_cfg(tmp_path), tokenizer=TOK, shard_index=0, shard_count=2)
    b = next(it)
    assert set(b) == {"tokens", "segment_ids", "positions", "loss_mask"}
    for v in b.values():
        assert v.shape == (2, 16) and v.dtype == np.int32
    np.testing.assert_array_equal(b["loss_mask"], b["segment_ids"] > 0)


def test_mixture_weights_respected(tmp_path):
    ids = _doc_ids(_take(make_pretrain_iterator(_cfg(tmp_path), tokenizer=TOK,
                                                shard_index=0, shard_count=1), 80))
    frac_a = np.mean([i < 200_000 for i in ids])
    assert len(ids) > 300 and abs(frac_a - 0.75) < 0.03, (len(ids), frac_a)
    ids2 = _doc_ids(_take(make_pretrain_iterator(_cfg(tmp_path, mixture={"a": 1, "b": 4}),
                                                 tokenizer=TOK, shard_index=0, shard_count=1), 80))
    assert abs(np.mean([i < 200_000 for i in ids2]) - 0.2) < 0.03


def test_deterministic_by_seed(tmp_path):
    def ids(seed):
        it = make_pretrain_iterator(_cfg(tmp_path, seed=seed), tokenizer=TOK,
                                    shard_index=0, shard_count=1)
        return _doc_ids(_take(it, 10))

    assert ids(0) == ids(0)
    assert ids(0) != ids(1)
    assert sorted(ids(0)) != sorted(ids(1))  # different documents, not only order
    unshuffled = make_pretrain_iterator(_cfg(tmp_path, shuffle=False), tokenizer=TOK,
                                        shard_index=0, shard_count=1)
    assert _doc_ids(_take(unshuffled, 2))[:4] == [100_000, 100_001, 100_002, 200_000]


def test_two_processes_partition_the_single_process_stream(tmp_path):
    cfg = _cfg(tmp_path, num_epochs=1, global_batch_size=4)
    single = _doc_ids(_all(make_pretrain_iterator(cfg, tokenizer=TOK, shard_index=0,
                                                  shard_count=1)))
    shards = [_doc_ids(_all(make_pretrain_iterator(cfg, tokenizer=TOK, shard_index=i,
                                                   shard_count=2))) for i in range(2)]
    assert len(single) == len(set(single)) > 100  # one epoch: every document at most once
    assert not set(shards[0]) & set(shards[1])
    assert collections.Counter(shards[0] + shards[1]) == collections.Counter(single)


def test_epochs_reshuffle_and_validation_is_finite_unshuffled(tmp_path):
    cfg = _cfg(tmp_path, sources={"a": _corpus(tmp_path, "a", 100_000, 30)}, mixture=None,
               num_epochs=2)
    ids = _doc_ids(_all(make_pretrain_iterator(cfg, tokenizer=TOK, shard_index=0, shard_count=1)))
    assert sorted(ids[:30]) == sorted(ids[30:]) == list(range(100_000, 100_030))
    assert ids[:30] != ids[30:]
    _corpus(tmp_path, "a", 500, 9)  # (re)writes a-train; copy it to the validation split
    (tmp_path / "a-validation.jsonl").write_text((tmp_path / "a-train.jsonl").read_text())
    val = _all(make_pretrain_iterator(cfg, tokenizer=TOK, split="validation", shard_index=0,
                                      shard_count=1))
    assert _doc_ids(val) == list(range(500, 509))
    assert all(b["tokens"].shape == (4, 16) for b in val)  # last batch padded, not ragged


@pytest.mark.parametrize("read_threads,seq_len,prefetch,window",
                         [(0, 16, 0, 0), (2, 5, 2, 0), (0, 5, 2, 8)])
def test_iterator_state_exact_resume(tmp_path, read_threads, seq_len, prefetch, window):
    cfg = _cfg(tmp_path, read_threads=read_threads, seq_len=seq_len,  # seq_len 5: split docs
               prefetch_batches=prefetch, row_shuffle_window=window)
    ref = make_pretrain_iterator(cfg, tokenizer=TOK, shard_index=1, shard_count=2)
    _take(ref, 7)
    state = json.loads(json.dumps(ref.get_state()))  # JSON-serializable
    expected = _take(ref, 6)
    fresh = make_pretrain_iterator(cfg, tokenizer=TOK, shard_index=1, shard_count=2)
    fresh.set_state(state)
    for want, got in zip(expected, _take(fresh, 6)):
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


def test_state_file_helpers(tmp_path):
    cfg = _cfg(tmp_path)
    it = make_pretrain_iterator(cfg, tokenizer=TOK, shard_index=0, shard_count=1)
    _take(it, 3)
    save_iterator_state(it, tmp_path / "state.json")
    want = next(it)
    it2 = make_pretrain_iterator(cfg, tokenizer=TOK, shard_index=0, shard_count=1)
    restore_iterator_state(it2, tmp_path / "state.json")
    np.testing.assert_array_equal(next(it2)["tokens"], want["tokens"])


def test_orbax_checkpoint_manager_roundtrip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    from internlm2_jax.input import orbax_restore_args, orbax_save_args

    cfg = _cfg(tmp_path)
    it = make_pretrain_iterator(cfg, tokenizer=TOK, shard_index=0, shard_count=1)
    _take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(2, args=ocp.args.Composite(step=ocp.args.JsonSave({"step": 2}),
                                             data=orbax_save_args(it)))
        mngr.wait_until_finished()
    want = _take(it, 2)
    it2 = make_pretrain_iterator(cfg, tokenizer=TOK, shard_index=0, shard_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        out = mngr.restore(2, args=ocp.args.Composite(step=ocp.args.JsonRestore(),
                                                      data=orbax_restore_args(it2)))
    assert out["step"] == {"step": 2}
    for w, g in zip(want, _take(it2, 2)):
        np.testing.assert_array_equal(w["tokens"], g["tokens"])


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        make_pretrain_iterator(_cfg(tmp_path, global_batch_size=3), tokenizer=TOK,
                               shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match="exactly the sources"):
        make_pretrain_iterator(_cfg(tmp_path, mixture={"a": 1.0}), tokenizer=TOK,
                               shard_index=0, shard_count=1)
    bad = _cfg(tmp_path)
    (tmp_path / "a-train.jsonl").write_text('{"text": "5 5"}\n{oops\n')
    it = make_pretrain_iterator(bad, tokenizer=TOK, shard_index=0, shard_count=1)
    with pytest.raises(Exception, match=r"a-train\.jsonl:2: malformed JSON"):
        _take(it, 50)


def test_skip_mode_and_row_window_shuffle(tmp_path):
    cfg = _cfg(tmp_path, on_error="skip", shuffle=False, num_epochs=1)
    with open(tmp_path / "a-train.jsonl", "a") as f:
        f.write("{oops\n")  # one bad line: skipped (and logged), the rest is intact
    ids = _doc_ids(_all(make_pretrain_iterator(cfg, tokenizer=TOK, shard_index=0, shard_count=1)))
    assert len(ids) == len(set(ids)) > 100
    plain = _doc_ids(_take(make_pretrain_iterator(_cfg(tmp_path), tokenizer=TOK), 8))
    windowed = _doc_ids(_take(make_pretrain_iterator(_cfg(tmp_path, row_shuffle_window=16),
                                                     tokenizer=TOK), 8))
    assert plain != windowed and len(set(plain) & set(windowed)) > len(plain) // 2
