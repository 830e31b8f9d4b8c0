"""Train an InternLM2-style sentencepiece BPE tokenizer.

Settings follow the released InternLM2 tokenizer: BPE, byte fallback, digits split, no dummy
prefix, identity normalization, whitespace kept verbatim, ``<unk>``=0, ``<s>``=1, ``</s>``=2 and no
pad piece. The total vocabulary is rounded up to a multiple of 128; the top of the vocabulary holds
spare ``[UNUSED_TOKEN_k]`` pieces followed by the six chat specials as the very last ids (same
relative order as the released tokenizer, whose specials are ids 92538..92543)::

    [0..T)           trained pieces (<unk>, <s>, </s>, 256 byte pieces, merges)
    [T..V-6)         [UNUSED_TOKEN_1], [UNUSED_TOKEN_2], ...
    [V-6..V)         <|plugin|> <|interpreter|> <|action_end|> <|action_start|> <|im_end|> <|im_start|>

The specials are USER_DEFINED pieces carrying the special strings as names, so
``SentencePieceProcessor.piece_to_id('<|im_end|>')`` finds them. Note: sentencepiece matches
USER_DEFINED pieces atomically in raw text, so ``encode('<|im_end|>')`` yields the special id here,
while the released tokenizer never produces its specials from text.
"""

from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

CHAT_SPECIALS: tuple[str, ...] = (
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
)
VOCAB_MULTIPLE = 128
# sentencepiece skips training sentences longer than this (bytes); we chunk documents below it.
_MAX_SENTENCE_BYTES = 8192

TextSource = str | os.PathLike | Iterable[str] | Iterable[os.PathLike]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _is_file_source(src: object) -> bool:
    """Paths (``os.PathLike`` or an existing file path string) are files; other strings are text."""
    if isinstance(src, os.PathLike):
        return True
    return isinstance(src, str) and len(src) < 4096 and "\n" not in src and os.path.isfile(src)


def _iter_texts(source: TextSource) -> Iterator[str]:
    """Yield documents from a path, a list of paths, or an iterable of text strings."""
    items: Iterable = [source] if isinstance(source, (str, os.PathLike)) else source
    for item in items:
        if _is_file_source(item):
            yield pathlib.Path(item).read_text(encoding="utf-8", errors="replace")
        elif isinstance(item, str):
            yield item
        else:
            raise TypeError(f"train_tokenizer: unsupported input item of type {type(item).__name__}")


def _chunk(text: str, max_bytes: int = _MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Split a document at line boundaries into pieces under ``max_bytes`` (newlines kept)."""
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if buf and size + n > max_bytes:
            yield "".join(buf)
            buf, size = [], 0
        if n > max_bytes:  # a single huge line: hard split by characters
            step = max(1, max_bytes // 4)
            for i in range(0, len(line), step):
                yield line[i : i + step]
            continue
        buf.append(line)
        size += n
    if buf:
        yield "".join(buf)


def _sentences(source: TextSource) -> Iterator[str]:
    for text in _iter_texts(source):
        for chunk in _chunk(text):
            if chunk.strip():
                yield chunk


def _append_top_pieces(
    proto: model_pb2.ModelProto, total: int, special_tokens: Sequence[str]
) -> None:
    """Append ``[UNUSED_TOKEN_k]`` spares then ``special_tokens`` so the vocab has ``total`` pieces."""
    existing = {p.piece for p in proto.pieces}
    clash = [s for s in special_tokens if s in existing]
    if clash:
        raise ValueError(f"special tokens already present in the trained vocabulary: {clash}")
    n_spare = total - len(proto.pieces) - len(special_tokens)
    if n_spare < 0:
        raise ValueError(
            f"trained vocabulary ({len(proto.pieces)}) + specials ({len(special_tokens)}) exceeds "
            f"the target size {total}"
        )
    names = [f"[UNUSED_TOKEN_{k}]" for k in range(1, n_spare + 1)] + list(special_tokens)
    for name in names:
        piece = proto.pieces.add()
        piece.piece = name
        piece.score = 0.0
        piece.type = model_pb2.ModelProto.SentencePiece.USER_DEFINED


def train_tokenizer(
    text_iter_or_files: TextSource,
    output_prefix: str,
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = CHAT_SPECIALS,
    num_spare: int = 8,
    character_coverage: float = 0.9995,
    input_sentence_size: int = 2_000_000,
    seed: int = 0,
) -> str:
    """Train an InternLM2-style BPE tokenizer and write ``{output_prefix}.model`` / ``.vocab``.

    Args:
      text_iter_or_files: a file path, a list of ``os.PathLike`` paths, or an iterable of document
        strings (documents are chunked at line boundaries; newlines are kept).
      output_prefix: output path prefix (directories are created).
      vocab_size: requested total vocabulary size; rounded up to a multiple of 128.
      special_tokens: appended as the very last ids, in order (default: the chat specials).
      num_spare: minimum number of ``[UNUSED_TOKEN_k]`` spares below the specials; more are
        added to reach the multiple of 128 when BPE learns fewer pieces than requested.
      character_coverage: sentencepiece character coverage (rare characters use byte fallback).
      input_sentence_size: max number of training sentences sampled by sentencepiece.
      seed: sentencepiece random seed (for input sampling).

    Returns:
      The path of the written ``.model`` file.
    """
    total = _round_up(int(vocab_size), VOCAB_MULTIPLE)
    n_train = total - num_spare - len(special_tokens)
    if n_train < 3 + 256 + 1:
        raise ValueError(
            f"vocab_size {vocab_size} too small: need > 259 trained pieces (3 controls + 256 bytes) "
            f"plus {num_spare} spares and {len(special_tokens)} specials"
        )
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(text_iter_or_files),
        model_writer=buf,
        model_type="bpe",
        vocab_size=n_train,
        hard_vocab_limit=False,  # small corpora may not support n_train merges
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=_MAX_SENTENCE_BYTES * 2,
        num_threads=max(1, min(4, os.cpu_count() or 1)),
        minloglevel=2,
    )
    proto = model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    _append_top_pieces(proto, total, special_tokens)
    # Keep the recorded trainer spec consistent with the final vocabulary.
    proto.trainer_spec.vocab_size = len(proto.pieces)

    out = pathlib.Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_path = f"{output_prefix}.model"
    with open(model_path, "wb") as f:
        f.write(proto.SerializeToString())
    with open(f"{output_prefix}.vocab", "w", encoding="utf-8") as f:
        for p in proto.pieces:
            f.write(f"{p.piece}\t{p.score:g}\n")
    return model_path
