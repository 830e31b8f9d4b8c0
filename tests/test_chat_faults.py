"""Faults of the chat CLI (issue #16): invalid UTF-8 on stdin, messages longer than the context, over-long lines,
and bad model/tokenizer files. `generate_stream` is replaced by a recorder (fast, and it sees every prompt)."""

from __future__ import annotations

import importlib
import io
import sys
from typing import Any, Iterator, Sequence

import jax
import numpy as np
import pytest

from experiments import chat as chat_cli
from internlm2_jax import Tokenizer, get_preset, init_params, save_hf
from internlm2_jax.data.tokenizer_training import train_tokenizer
from internlm2_jax.errors import ConfigValueError

WORDS = "hello there, how are you today? fine thanks."


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return train_tokenizer([WORDS] * 50, str(tmp_path_factory.mktemp("tok") / "t"), vocab_size=384)


@pytest.fixture(scope="module")
def tokenizer(tok_path: str) -> Tokenizer:
    return Tokenizer(tok_path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny HF checkpoint of random weights (filled from the init's shapes: running the init costs ~9 s)."""
    cfg = get_preset("tiny", dtype="float32")
    path = tmp_path_factory.mktemp("ckpt") / "hf"
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    save_hf(cfg, jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), shapes), path)
    return str(path)


@pytest.fixture
def prompts(monkeypatch: pytest.MonkeyPatch, tokenizer: Tokenizer) -> list[list[int]]:
    """Every prompt handed to `generate_stream`; each reply is "fine" then a stop token."""
    seen: list[list[int]] = []
    reply = tokenizer.encode("fine") + [tokenizer.stop_ids[0]]

    def fake_generate_stream(config: Any, params: Any, prompt: Sequence[int], **_: Any) -> Iterator[int]:
        seen.append(list(prompt))
        yield from reply

    # the module, not the `internlm2_jax.generate` function the package exports under the same name
    monkeypatch.setattr(importlib.import_module("internlm2_jax.generate"), "generate_stream", fake_generate_stream)
    return seen


def run_chat(tokenizer: Tokenizer, stdin: Any, *, max_context: int = 128, max_new_tokens: int = 8,
             system: str | None = "be brief", **kw: Any) -> str:
    out = io.StringIO()
    chat_cli.chat(None, None, tokenizer, stdin=stdin, stdout=out, system=system, max_new_tokens=max_new_tokens,
                  max_context=max_context, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0,
                  **kw)
    return out.getvalue()


@pytest.mark.parametrize("data, bad", [(b"ok", 0), ("\u4f60\u597d".encode(), 0), (b"\xff", 1),
                                       ("caf\u00e9".encode("latin-1"), 1), ("\u4f60".encode()[:2], 2)])
def test_decode_counts_invalid_bytes(data: bytes, bad: int) -> None:
    text, n = chat_cli.decode_utf8(data)
    assert n == bad and text.count("\ufffd") == bad
    assert text.replace("\ufffd", "") == data.decode("utf-8", "replace").replace("\ufffd", "")


@pytest.mark.parametrize("make_stdin", [
    lambda b: io.BytesIO(b),  # what `main` passes: sys.stdin.buffer
    lambda b: io.TextIOWrapper(io.BytesIO(b), encoding="utf-8", errors="surrogateescape"),  # C-locale stdin
], ids=["bytes", "surrogateescape"])
def test_invalid_utf8_is_replaced_and_reported(tokenizer: Tokenizer, prompts: list, make_stdin: Any) -> None:
    out = run_chat(tokenizer, make_stdin(b"hi \xff\xfe there\nhello\n/exit\n"))
    assert "[note: 2 invalid UTF-8 bytes in your message were replaced with U+FFFD]\n" in out
    assert out.count("assistant> fine\n") == 2  # the conversation went on: both messages answered
    assert len(prompts) == 2 and len(prompts[1]) > len(prompts[0])  # the first exchange is in the second prompt


def test_lone_surrogate_in_text_stream(tokenizer: Tokenizer, prompts: list) -> None:
    out = run_chat(tokenizer, io.StringIO("a \ud800 b\n"))
    assert "invalid UTF-8 bytes in your message were replaced" in out
    assert out.count("assistant> fine\n") == 1


def test_main_reads_invalid_bytes_from_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                             hf_dir: str, tok_path: str, prompts: list) -> None:
    # A strict text stdin would raise UnicodeDecodeError; `main` must read its bytes.
    stdin = io.TextIOWrapper(io.BytesIO(b"hi \xff there\nhello\n/exit\n"), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdin", stdin)
    code = chat_cli.main(["--hf", hf_dir, "--tokenizer", tok_path, "--dtype", "float32",
                          "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "[note: 1 invalid UTF-8 byte in your message was replaced with U+FFFD]\n" in out
    assert out.count("assistant> fine\n") == 2
    assert max(map(len, prompts)) + 8 <= 128  # default --max-context: the tiny model's 128 positions


def test_message_longer_than_context_is_refused(tokenizer: Tokenizer, prompts: list) -> None:
    long = " ".join(["hello there"] * 100)
    out = run_chat(tokenizer, io.StringIO(f"hi\n{long}\nhow are you\n"), max_context=128, max_new_tokens=8)
    n = len(tokenizer.encode_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": long}],
                                  add_generation_prompt=True))
    assert (f"[message not sent: it is {n} tokens with the chat format and system prompt; --max-context 128 "
            "with --max-new-tokens 8 leaves room for 120: shorten it or raise --max-context]\n") in out
    assert out.count("assistant> fine\n") == 2 and len(prompts) == 2  # before and after: the chat goes on
    assert all(len(p) <= 120 for p in prompts) and "dropped" not in out
    alone = tokenizer.encode_chat([{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "how are you"}], add_generation_prompt=True)
    assert len(prompts[1]) > len(alone)  # the first exchange is still in the conversation (nothing reset)


def test_many_turns_never_exceed_context(tokenizer: Tokenizer, prompts: list) -> None:
    lines = [" ".join(["how are you"] * (1 + i % 5)) for i in range(30)]
    out = run_chat(tokenizer, io.StringIO("\n".join(lines) + "\n"), max_context=96, max_new_tokens=8)
    assert len(prompts) == 30 and out.count("assistant> fine\n") == 30
    assert max(map(len, prompts)) <= 96 - 8
    assert "[note: the oldest" in out and "dropped to fit --max-context 96]" in out


class ReadSpy(io.BytesIO):
    """Records the longest single `readline` result (what the reader ever held at once)."""

    longest = 0

    def readline(self, size: int | None = -1) -> bytes:
        line = super().readline(size)
        self.longest = max(self.longest, len(line))
        return line


def test_overlong_line_is_skipped_unread(tokenizer: Tokenizer, prompts: list) -> None:
    stdin = ReadSpy(b"hello " * 16 + b"hell\n" + b"b" * 10_000 + b"\nhello\n")
    out = run_chat(tokenizer, stdin, max_line_bytes=100)
    assert ("[message not sent: the line is over 100 bytes, more than --max-context 128 can hold: shorten it or "
            "raise --max-context]\n") in out
    assert out.count("[message not sent") == 1  # a line of exactly the limit is fine
    assert out.count("assistant> fine\n") == 2 and stdin.longest <= 101
    assert "bbbb" not in tokenizer.decode([t for p in prompts for t in p])


def test_no_room_for_a_message(tokenizer: Tokenizer, hf_dir: str, tok_path: str,
                               capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigValueError, match="leaves no room"):
        run_chat(tokenizer, io.StringIO("hi\n"), max_context=8, max_new_tokens=8)
    # Through `main`: the default --max-new-tokens 256 cannot fit the tiny model's 128 positions.
    assert chat_cli.main(["--hf", hf_dir, "--tokenizer", tok_path, "--dtype", "float32"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --max-new-tokens 256 leaves no room for a message in --max-context 128: lower --max-new-tokens "
        "or raise --max-context"]


def test_load_errors_are_one_line(tmp_path: Any, hf_dir: str, tok_path: str, capsys: pytest.CaptureFixture) -> None:
    assert chat_cli.main(["--hf", str(tmp_path / "missing"), "--tokenizer", tok_path]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: HF checkpoint folder not found: {tmp_path / 'missing'}"]
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"garbage")
    assert chat_cli.main(["--hf", hf_dir, "--tokenizer", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: not a sentencepiece model")
