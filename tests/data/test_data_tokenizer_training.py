"""Tests for internlm2_jax.data.tokenizer_training (small, fast training)."""

from __future__ import annotations

import pathlib
import random
import sysconfig

import pytest
import sentencepiece as spm

from internlm2_jax.data.tokenizer_training import CHAT_SPECIALS, train_tokenizer

_EN = ("the model reads data from many sources and learns to predict the next token while "
       "training runs on large clusters with careful filtering of web pages books and code").split()
_ZH = "我们的模型在大量数据上进行训练并且使用了严格的数据过滤方法来提高质量中文文本处理"


def _corpus() -> list[str]:
    rng = random.Random(0)
    docs = []
    for _ in range(300):
        docs.append(" ".join(rng.choice(_EN) for _ in range(80)) + f" {rng.randint(0, 10**6)}.\n")
        docs.append("".join(rng.choice(_ZH) for _ in range(120)) + "。\n")
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for name in ["textwrap.py", "heapq.py", "bisect.py", "functools.py"]:
        docs.append((stdlib / name).read_text(encoding="utf-8"))
    return docs


@pytest.fixture(scope="module")
def sp(tmp_path_factory) -> spm.SentencePieceProcessor:
    prefix = str(tmp_path_factory.mktemp("tok") / "tiny")
    path = train_tokenizer(iter(_corpus()), prefix, vocab_size=1000, num_spare=4)
    assert path == prefix + ".model"
    return spm.SentencePieceProcessor(model_file=path)


def test_vocab_multiple_of_128_and_specials_on_top(sp):
    v = sp.get_piece_size()
    assert v == 1024  # 1000 rounded up to a multiple of 128
    assert [sp.id_to_piece(i) for i in range(v - 6, v)] == list(CHAT_SPECIALS)
    assert sp.piece_to_id("<|im_end|>") == v - 2 and sp.piece_to_id("<|im_start|>") == v - 1
    assert sp.piece_to_id("<|plugin|>") == v - 6
    assert sp.id_to_piece(v - 7).startswith("[UNUSED_TOKEN_")
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n    if x:\n        return 1\n\treturn  2\n",
        "year 2024 has 366 days",
        "我们的模型训练数据。",
        "emoji 🦜 ok",
        "  leading and trailing spaces  \n\n",
    ],
)
def test_roundtrip(sp, text):
    assert sp.decode(sp.encode(text)) == text


def test_digits_are_split(sp):
    pieces = sp.encode("12345", out_type=str)
    assert pieces == ["1", "2", "3", "4", "5"]


def test_no_dummy_prefix(sp):
    assert not sp.encode("the", out_type=str)[0].startswith("\u2581\u2581")
    assert sp.decode(sp.encode("the")) == "the"


def test_emoji_byte_fallback(sp):
    pieces = sp.encode("🦜", out_type=str)
    assert pieces == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>"]


def test_specials_are_user_defined_pieces(sp):
    # USER_DEFINED pieces are matched atomically in raw text (unlike the released tokenizer,
    # whose spares are never produced from text; the tokenizer wrapper maps specials itself).
    ids = sp.encode("<|im_start|>user")
    assert ids[0] == sp.piece_to_id("<|im_start|>")
    assert sp.decode(ids) == "<|im_start|>user"


def test_file_input(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n".join(_corpus()[:200]), encoding="utf-8")
    path = train_tokenizer([f], str(tmp_path / "t"), vocab_size=512, num_spare=2)
    sp = spm.SentencePieceProcessor(model_file=path)
    assert sp.get_piece_size() == 512
    assert sp.id_to_piece(511) == "<|im_start|>"


def test_too_small_vocab_errors(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["abc"], str(tmp_path / "t"), vocab_size=128)
