"""Input readers (issue 16): every bad line is `file:line: what is wrong` or, with `on_error='skip'`, counted and
left out; an empty dataset is an `EmptyDatasetError`, never an untrained model. Tiny files, no training."""

import dataclasses
import json
import os

import pytest

from internlm2_jax.errors import ConfigValueError, EmptyDatasetError, InputDataError
from internlm2_jax.jsonl import MissingInputError, read_jsonl_records
from internlm2_jax.rlhf.preference_data import read_preference_pairs
from internlm2_jax.rlhf.prompts import read_prompts
from internlm2_jax.rlhf.toy_tasks import TOY_CONDITIONS

PAIR = {"prompt": "hi", "chosen": "yes", "rejected": "no"}
PROMPT = {"prompt": "Add 2 and 3.", "category": "likes_a"}


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


@pytest.mark.parametrize("bad, why", [
    ("{oops", "bad JSON"),
    (json.dumps({"prompt": "hi", "chosen": "yes"}), "needs 'chosen' and 'rejected'"),
    (json.dumps({"chosen": [{"role": "wizard", "content": "x"}], "rejected": "no"}), "unknown role 'wizard'"),
    (json.dumps({**PAIR, "chosen": 3}), "'chosen': expected a string or a list of messages"),
    (json.dumps({**PAIR, "condition": "nope"}), "unknown reward condition 'nope'"),
    (json.dumps([1, 2]), "must be a JSON object"),
])
def test_preference_pairs_name_file_and_line(tmp_path, bad, why):
    path = _write(tmp_path / "pairs.jsonl", [PAIR, "", bad, PAIR])  # line 2 blank: the bad record is line 3
    with pytest.raises(InputDataError, match=rf"pairs\.jsonl:3: .*{why}"):
        read_preference_pairs(path, conditions=TOY_CONDITIONS)
    recs = read_preference_pairs(path, "skip", TOY_CONDITIONS)
    assert list(recs) == [PAIR, PAIR] and recs.skipped == 1 and recs.where == [f"{path}:1", f"{path}:4"]
    assert recs.errors[0].startswith(f"{path}:3: ") and why in recs.errors[0]


def test_prompts_name_file_and_line(tmp_path):
    path = _write(tmp_path / "prompts.jsonl", [PROMPT, {"messages": [{"role": "user", "content": "x"}]},
                                               {"text": "no prompt"}, {"messages": []}, PROMPT])
    with pytest.raises(InputDataError, match=r"prompts\.jsonl:3: prompt record needs 'prompt' or 'messages'"):
        read_prompts(path)
    recs = read_prompts(path, on_error="skip", conditions=TOY_CONDITIONS)
    assert len(recs) == 3 and recs.skipped == 2 and ":4: 'messages' must be a non-empty list" in recs.errors[1]
    assert recs[0] == {"messages": [{"role": "user", "content": "Add 2 and 3."}], "category": "likes_a"}
    with pytest.raises(InputDataError, match=r":1: unknown reward condition 'likes_a'"):
        read_prompts(path, conditions={"other": "x"})


def test_invalid_utf8_costs_one_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n{"prompt": "ok2"}\n')
    with pytest.raises(InputDataError, match=r"p\.jsonl:2: invalid UTF-8"):
        read_prompts(str(path))
    assert [r["messages"][0]["content"] for r in read_prompts(str(path), "skip")] == ["ok", "ok2"]


def test_empty_and_all_bad_files_are_empty_datasets(tmp_path, caplog):
    empty = _write(tmp_path / "empty.jsonl", ["", "  "])
    all_bad = _write(tmp_path / "bad.jsonl", ["{oops", "[]"])
    for read in (read_preference_pairs, read_prompts, read_jsonl_records):
        with pytest.raises(EmptyDatasetError, match=r"empty\.jsonl: no usable .*s \(0 skipped\)"):
            read(empty)
    for read in (read_preference_pairs, read_prompts):
        with pytest.raises(EmptyDatasetError, match=r"bad\.jsonl: no usable .*s \(2 skipped\)"):
            read(all_bad, "skip")
    good = _write(tmp_path / "good.jsonl", [PROMPT])
    assert len(read_prompts([empty, good])) == 1 and "empty.jsonl: no usable prompts" in caplog.text
    with pytest.raises(EmptyDatasetError, match=r"empty\.jsonl, .*bad\.jsonl: no usable prompts \(2 skipped\)"):
        read_prompts([empty, all_bad], "skip")
    with pytest.raises(MissingInputError, match="nope.jsonl: input file not found") as e:
        read_prompts(str(tmp_path / "nope.jsonl"))
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, InputDataError)
    with pytest.raises(ConfigValueError, match="on_error='ignore'"):
        read_prompts(empty, on_error="ignore")


def test_reward_model_and_dpo_refuse_empty_preferences(tmp_path):
    from experiments.dpo import load_dpo_records
    from experiments.reward_model import load_preferences, train_rm
    from internlm2_jax import get_preset

    empty = _write(tmp_path / "empty.jsonl", [])
    with pytest.raises(EmptyDatasetError, match="empty.jsonl: no usable preference pairs"):
        load_preferences([empty], "no-tokenizer-needed.model", None)  # the data is read before the tokenizer
    assert len(load_preferences(["toy:4", empty], None, None)[0]) == 4  # an empty patch (online round) only warns
    with pytest.raises(EmptyDatasetError, match="empty.jsonl: no usable preference pairs"):
        load_dpo_records([empty], "no-tokenizer-needed.model", 0)  # the data is read before the tokenizer
    with pytest.raises(ConfigValueError, match=r"mixes \['toy:4'\] with files \[.*empty.jsonl'\]"):
        load_dpo_records(["toy:4", empty], None, 0)  # was: int('/tmp/...') in a traceback
    with pytest.raises(ConfigValueError, match="bad toy source 'toy:x'"):
        load_dpo_records(["toy:x"], None, 0)
    bad = _write(tmp_path / "bad.jsonl", [PAIR, "{oops"])
    recs, *_ = load_preferences(["toy:4", bad], None, None, on_error="skip")
    assert len(recs) == 5 and recs.skipped == 1
    cfg = get_preset("tiny", dtype="float32", vocab_size=102)
    with pytest.raises(EmptyDatasetError, match=r"toy:1: 1 usable preference pairs, need at least 2"):
        train_rm(str(tmp_path / "rm"), model=cfg, data=["toy:1"])  # refused before any model is built
    assert not os.path.exists(tmp_path / "rm" / "rm_params.msgpack")


def test_reward_model_entry_point_prints_one_line(tmp_path, capsys):
    import gin

    from experiments import reward_model

    bad = _write(tmp_path / "pairs.jsonl", [PAIR, PAIR, {"prompt": "hi", "chosen": "yes"}])
    gin.clear_config()
    try:
        code = reward_model.main(["--gin", os.path.join("experiments", "configs", "rlhf", "rm_tiny.gin"),
                                  "--workdir", str(tmp_path / "rm"),
                                  "--gin_param", f"train_rm.data = ['toy:4', '{bad}']"])
    finally:
        gin.clear_config()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and err[0].startswith(f"error: {bad}:3: preference record needs 'chosen' and 'rejected'")


def test_sft_readers(tmp_path):
    from internlm2_jax.sft.data import SFTDataConfig, fitted_examples
    from internlm2_jax.sft.formats import FormatError, load_conversations

    good = {"instruction": "a", "output": "b"}
    path = _write(tmp_path / "sft.jsonl", [good, good, {"messages": [{"role": "wizard", "content": "x"}]}])
    with pytest.raises(FormatError, match=r"sft\.jsonl:3: message 0: unknown role 'wizard'"):
        load_conversations(path)
    assert load_conversations(path, on_error="skip").skipped == 1
    with pytest.raises(EmptyDatasetError, match=r"empty\.jsonl: no usable conversations \(0 skipped\)"):
        load_conversations(_write(tmp_path / "empty.jsonl", []))
    long = [([1] * 10, [True] * 10)]
    assert len(fitted_examples(long, SFTDataConfig(seq_len=8))) == 1  # truncated, kept
    with pytest.raises(EmptyDatasetError, match="all 1 are longer than SFTDataConfig.seq_len=8"):
        fitted_examples(long, SFTDataConfig(seq_len=8, overlong="skip"))


class _WordTok:
    bos_id, eos_id = 1, 2

    def encode(self, text, add_bos=False, add_eos=False):
        return [int(w) for w in text.split()]


def _pretrain_cfg(tmp_path, **kw):
    from internlm2_jax.input import InputConfig

    kw = {"shuffle": False, "num_epochs": 1, "read_threads": 2, "prefetch_batches": 0, **kw}
    return InputConfig(sources={"web": f"jsonl:{tmp_path}/web-{{split}}.jsonl"}, seq_len=8, global_batch_size=2, **kw)


def _docs(it):
    return sorted(int(t) for b in it for row in b["tokens"] for t in row if t > 2)


def test_pretraining_skip_counts_and_empty_sources(tmp_path):
    from internlm2_jax.input import make_pretrain_iterator
    from internlm2_jax.input.pipeline import skipped_records

    _write(tmp_path / "web-train.jsonl", [{"text": "10"}, {"text": "11"}, "{oops", {"body": "12"}, {"text": "13"}])
    with pytest.raises(InputDataError, match=r"web-train\.jsonl:3: malformed JSON"):
        list(make_pretrain_iterator(_pretrain_cfg(tmp_path), tokenizer=_WordTok(), shard_index=0, shard_count=1))
    it = make_pretrain_iterator(_pretrain_cfg(tmp_path, on_error="skip"), tokenizer=_WordTok(), shard_index=0,
                                shard_count=1)
    assert _docs(it) == [10, 11, 13] and skipped_records(it) == 2

    _write(tmp_path / "web-train.jsonl", ["{oops", {"body": "12"}])  # every record bad: an error, not a hang
    endless = _pretrain_cfg(tmp_path, on_error="skip", num_epochs=None, read_threads=0)  # no reader left running
    it = make_pretrain_iterator(endless, tokenizer=_WordTok(), shard_index=0, shard_count=1)
    with pytest.raises(EmptyDatasetError, match=r"web-train\.jsonl: no usable records \(2 skipped"):
        next(it)
    _write(tmp_path / "web-train.jsonl", ["", " "])
    with pytest.raises(EmptyDatasetError, match=r"web-train\.jsonl: input source 'web' .* has no documents"):
        make_pretrain_iterator(_pretrain_cfg(tmp_path), tokenizer=_WordTok(), shard_index=0, shard_count=1)
    missing = dataclasses.replace(_pretrain_cfg(tmp_path), sources={"web": f"jsonl:{tmp_path}/nothing-*.jsonl"})
    with pytest.raises(MissingInputError, match="no files match"):
        make_pretrain_iterator(missing, tokenizer=_WordTok(), shard_index=0, shard_count=1)
