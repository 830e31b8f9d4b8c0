"""Interactive terminal chat with an InternLM2 model (streaming, multi-turn).

    python -m experiments.chat --hf PATH [--tokenizer PATH]
    python -m experiments.chat --checkpoint DIR --preset NAME --tokenizer PATH

Commands: `/reset` clears the conversation, `/exit` (or end of input) quits. Works with piped stdin, e.g.
`printf 'hi\\n/exit\\n' | python -m experiments.chat --hf ckpt`. Replies stream token by token.

Every prompt fits `--max-context` (which defaults to the model's `max_position_embeddings`, at most 4096) with
`--max-new-tokens` to spare: the oldest exchanges are dropped first (with a note), and a message too long on its
own is refused with one line while the conversation goes on. Invalid UTF-8 in a message is replaced by U+FFFD
and reported; a line longer than `LINE_BYTES_PER_TOKEN * max_context` bytes is skipped unread and refused.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import IO, Any, Optional, Sequence, TextIO, Union

import jax

from experiments.cli import entry_point
from internlm2_jax.errors import ConfigValueError, InputDataError, UserFacingError

DEFAULT_MAX_CONTEXT = 4096
"""`--max-context` when not given: this, or the model's `max_position_embeddings` when smaller."""
LINE_BYTES_PER_TOKEN = 16 * 4
"""Input bytes read per context token before a line is refused unread. A token covers at most a few characters
of real text (4 bytes each in UTF-8), so a longer line could never fit; the bound keeps memory flat."""

_ESCAPED = re.compile("[\udc80-\udcff]+")  # bytes that are not UTF-8, as `surrogateescape` decodes them
Stream = Union[IO[bytes], IO[str]]


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """`(config, params)` from `--hf` or an orbax train-state `--checkpoint` with `--preset`."""
    from internlm2_jax import get_preset, load_hf
    if args.hf:
        return load_hf(args.hf, dtype=args.dtype)
    from internlm2_jax.params_loading import load_policy, single_device_abstract

    config = get_preset(args.preset, dtype=args.dtype)
    shardings = jax.tree.map(lambda a: a.sharding, single_device_abstract(config))
    return config, load_policy(args.checkpoint, config, shardings, args.step)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """`(text, number of invalid bytes)`: each byte that is not valid UTF-8 becomes one U+FFFD."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    bad = 0

    def replace(m: re.Match[str]) -> str:
        nonlocal bad
        bad += len(m.group())
        return "\ufffd" * len(m.group())

    return _ESCAPED.sub(replace, data.decode("utf-8", "surrogateescape")), bad


def _as_bytes(line: str) -> bytes:
    """The bytes behind a text line: a `surrogateescape` stream (Python's default for stdin under a C/POSIX
    locale) carries invalid bytes as lone surrogates, which sentencepiece rejects ("not a string")."""
    try:
        return line.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # other lone surrogates: encoded as the invalid UTF-8 they are, replaced later
        return line.encode("utf-8", "surrogatepass")


def read_message(stream: Stream, limit: int) -> Optional[tuple[str, int, bool]]:
    """The next line of `stream` (binary or text) as `(text, invalid UTF-8 bytes, too long)`; None at the end.

    At most `limit + 1` bytes (characters for a text stream) are held at once: the rest of a longer line is
    read in bounded chunks and dropped, and the line comes back with `too long` set (and no text).
    """
    line = stream.readline(limit + 1)
    if not line:
        return None
    newline = b"\n" if isinstance(line, bytes) else "\n"
    if len(line) > limit and not line.endswith(newline):
        while True:  # skip to the end of the line without keeping it
            rest = stream.readline(limit + 1)
            if not rest or rest.endswith(newline):
                return "", 0, True
    text, bad = decode_utf8(line if isinstance(line, bytes) else _as_bytes(line))
    return text.rstrip("\r\n"), bad, False


def chat(config: Any, params: Any, tokenizer: Any, *, stdin: Stream, stdout: TextIO, system: Optional[str],
         max_new_tokens: int, max_context: int, temperature: float, top_p: float, top_k: int,
         repetition_penalty: float, seed: int, max_line_bytes: Optional[int] = None) -> None:
    """The read-eval-print loop; each reply is streamed to `stdout` as its tokens are sampled.

    `stdin` may be binary (`sys.stdin.buffer`: invalid UTF-8 is replaced and reported) or text. No prompt longer
    than `max_context - max_new_tokens` tokens reaches the model; `max_line_bytes` (default
    `LINE_BYTES_PER_TOKEN * max_context`) bounds what one input line may hold in memory.
    """
    from internlm2_jax.generate import generate_stream

    if not 0 < max_new_tokens < max_context:
        raise ConfigValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a message in "
                               f"--max-context {max_context}: lower --max-new-tokens or raise --max-context")
    room = max_context - max_new_tokens
    limit = max_line_bytes or LINE_BYTES_PER_TOKEN * max_context
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    rng = jax.random.key(seed)
    stops = tuple(tokenizer.stop_ids)

    def say(line: str) -> None:
        stdout.write(line + "\n")
        stdout.flush()

    say("chat ready (/reset, /exit)")
    while (got := read_message(stdin, limit)) is not None:
        text, bad, too_long = got
        if too_long:
            say(f"[message not sent: the line is over {limit} bytes, more than --max-context {max_context} "
                "can hold: shorten it or raise --max-context]")
            continue
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            messages = list(base)
            say("[conversation reset]")
            continue
        if not text.strip():
            continue
        if bad:
            say(f"[note: {bad} invalid UTF-8 byte{'s' if bad != 1 else ''} in your message "
                f"{'were' if bad != 1 else 'was'} replaced with U+FFFD]")
        user = {"role": "user", "content": text}
        # The message alone first: one encode decides a refusal, however long the history.
        alone = len(tokenizer.encode_chat(base + [user], add_generation_prompt=True))
        if alone > room:
            say(f"[message not sent: it is {alone} tokens with the chat format"
                f"{' and system prompt' if base else ''}; --max-context {max_context} with --max-new-tokens "
                f"{max_new_tokens} leaves room for {room}: shorten it or raise --max-context]")
            continue
        messages.append(user)
        prompt = tokenizer.encode_chat(messages, add_generation_prompt=True)
        dropped = 0
        while len(prompt) > room and len(messages) > len(base) + 1:
            del messages[len(base):len(base) + 2]  # drop the oldest exchange
            dropped += 1
            prompt = tokenizer.encode_chat(messages, add_generation_prompt=True)
        if dropped:
            say(f"[note: the oldest {dropped} exchange{'s were' if dropped != 1 else ' was'} dropped to fit "
                f"--max-context {max_context}]")
        if len(prompt) > room:  # cannot happen (the message alone fits); never send an over-long prompt
            messages.pop()
            say(f"[message not sent: the prompt is {len(prompt)} tokens, over the {room} that fit]")
            continue
        rng, sub = jax.random.split(rng)
        stdout.write("assistant> ")
        out: list[int] = []
        shown = ""
        for tok in generate_stream(config, params, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                                   stop_ids=stops, rng=sub, pad_id=tokenizer.pad_id,
                                   vocab_limit=tokenizer.vocab_size):
            if tok in stops:
                break
            out.append(tok)
            text_so_far = tokenizer.decode(out, skip_special=True)
            if not text_so_far.endswith("\ufffd"):  # wait for complete UTF-8 characters
                stdout.write(text_so_far[len(shown):])
                stdout.flush()
                shown = text_so_far
        reply = tokenizer.decode(out)
        say(tokenizer.decode(out, skip_special=True)[len(shown):])
        messages.append({"role": "assistant", "content": reply})


def _user_error(path: str, e: Exception) -> InputDataError:
    """`e` as one `error:` line that names `path` (once)."""
    msg = str(e) if not isinstance(e, KeyError) else f"missing {e}"
    return InputDataError(msg if path in msg else f"{path}: {msg}")


def load_checked(args: argparse.Namespace, tok_path: str) -> tuple[Any, Any, Any]:
    """`(tokenizer, config, params)`; a missing, bad or mismatched file becomes one `error:` line (`run_main`)."""
    from internlm2_jax import Tokenizer

    try:
        tokenizer = Tokenizer(tok_path)
    except (OSError, ValueError) as e:
        raise _user_error(tok_path, e) from e
    try:
        config, params = load_model(args)
    except UserFacingError:
        raise
    except (OSError, ValueError, KeyError) as e:  # missing / unreadable files: the user's to fix
        raise _user_error(args.hf or args.checkpoint, e) from e
    try:
        tokenizer.check_compatible(config.vocab_size)
    except ValueError as e:
        raise _user_error(tok_path, e) from e
    return tokenizer, config, params


def add_model_args(p: argparse.ArgumentParser) -> None:
    """`--hf` | `--checkpoint --preset [--step]`, `--tokenizer`, `--dtype` (chat and serve)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="HF InternLM2 checkpoint folder")
    src.add_argument("--checkpoint", help="orbax train-state checkpoint directory (needs --preset)")
    p.add_argument("--preset", help="model preset of --checkpoint")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--tokenizer", help="tokenizer.model (default: inside --hf)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")


def tokenizer_path(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The tokenizer to load (`--tokenizer`, else the one inside `--hf`); a usage error when missing."""
    if args.checkpoint and not args.preset:
        p.error("--checkpoint needs --preset")
    path = args.tokenizer or (os.path.join(args.hf, "tokenizer.model") if args.hf else None)
    if not path or not os.path.exists(path):
        p.error(f"tokenizer not found ({path}); pass --tokenizer")
    return path


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-context", type=int, default=None,
                   help=f"prompt + reply tokens (default: the model's max_position_embeddings, at most "
                        f"{DEFAULT_MAX_CONTEXT})")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tok_path = tokenizer_path(p, args)
    if args.max_new_tokens < 1:  # both checked before the (slow) model load
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.max_context is not None and args.max_context <= args.max_new_tokens:
        p.error(f"--max-new-tokens {args.max_new_tokens} leaves no room for a message in --max-context "
                f"{args.max_context}")
    tokenizer, config, params = load_checked(args, tok_path)
    positions = config.max_position_embeddings
    max_context = args.max_context or min(DEFAULT_MAX_CONTEXT, positions)
    if max_context > positions:  # allowed (RoPE extrapolates, more so with rope_scaling) but never unremarked
        print(f"note: --max-context {max_context} is beyond the model's max_position_embeddings {positions} "
              f"(rope_scaling {config.rope_scaling_dict}): replies past that length may degrade",
              file=sys.stderr, flush=True)
    # Bytes, not text: invalid UTF-8 is then replaced and reported by `chat` instead of crashing the decoder.
    stdin = getattr(sys.stdin, "buffer", sys.stdin)
    chat(config, params, tokenizer, stdin=stdin, stdout=sys.stdout, system=args.system,
         max_new_tokens=args.max_new_tokens, max_context=max_context, temperature=args.temperature,
         top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
