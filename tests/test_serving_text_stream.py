"""The incremental detokenizer of the streaming server against decoding the whole output at once.

Reference: `Tokenizer.decode` of all ids (the released InternLM2 `tokenizer.model` when INTERNLM2_ASSETS is set,
whose byte-fallback pieces split Chinese characters and emoji across ids, and a BPE tokenizer trained here).
"""

from __future__ import annotations

import random

import pytest
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from internlm2_jax import Tokenizer
from internlm2_jax.data.tokenizer_training import train_tokenizer
from internlm2_jax.serving.text_stream import TextStream

TEXTS = ["hello there, how are you today?  fine thanks.\n\nthe weather in shanghai is warm.",
         "上海的天气很暖和。你好，世界！ 🙂🚀 naïve café — “quotes” and   spaces\tand tabs",
         "def f(x):\n    return x ** 2  # 平方\n"]


@pytest.fixture(scope="module", params=["trained", "dummy_prefix", "released"])
def tokenizer(request, tmp_path_factory) -> Tokenizer:
    if request.param == "released":
        return Tokenizer(request.getfixturevalue("released_assets"))
    path = train_tokenizer([" ".join(TEXTS[:1])] * 40, str(tmp_path_factory.mktemp("tok") / "t"), vocab_size=300)
    if request.param == "dummy_prefix":  # SentencePiece then drops the space that starts a decode
        proto = model_pb2.ModelProto()
        proto.ParseFromString(open(path, "rb").read())
        proto.normalizer_spec.add_dummy_prefix = True
        path = path.replace(".model", "_dummy.model")
        open(path, "wb").write(proto.SerializeToString())
    return Tokenizer(path)


def _streamed(stream: TextStream, ids: list[int]) -> str:
    out = []
    for i in ids:
        out.append(stream.push(i))
        assert stream.full_content().startswith(stream.shown)  # nothing shown is ever taken back
    return "".join(out) + stream.finish()


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_whole_decode(tokenizer, text):
    ids = tokenizer.encode(text, allow_special=False)
    whole = tokenizer.decode(ids, skip_special=True)
    stream = TextStream(tokenizer)
    assert _streamed(stream, ids) == whole == stream.full_content()


def test_random_ids_with_special_tokens_and_end_ids(tokenizer):
    rng = random.Random(0)
    specials = list(tokenizer.special_ids.values())
    for _ in range(20):
        ids = [rng.randrange(tokenizer.vocab_size) if rng.random() > 0.1 else rng.choice(specials or [0])
               for _ in range(rng.randrange(1, 60))]
        ends = {ids[-1]}
        stream = TextStream(tokenizer, end_ids=ends)
        streamed = _streamed(stream, ids)
        assert streamed == tokenizer.decode([t for t in ids if t not in ends], skip_special=True)


@pytest.mark.parametrize("stop", [["weather"], [" is", "today"], ["\n\n"], ["暖和"], ["no such text"]])
def test_stop_strings_cut_the_content_where_the_whole_decode_would(tokenizer, stop):
    text = TEXTS[0] + " " + TEXTS[1]
    ids = tokenizer.encode(text, allow_special=False)
    whole = tokenizer.decode(ids, skip_special=True)
    hits = [whole.find(s) for s in stop if s in whole]
    expected = whole[:min(hits)] if hits else whole
    stream = TextStream(tokenizer, stop)
    pushed = []
    for i in ids:
        pushed.append(stream.push(i))
        assert not any(s in "".join(pushed) for s in stop)  # a stop string is never shown, not even in part
        if stream.stopped:
            break
    assert stream.stopped == bool(hits)
    assert "".join(pushed) + stream.finish() == expected


def test_tools_hold_back_everything_from_the_action_start(tokenizer):
    action = tokenizer.special_ids.get("<|action_start|>")
    if action is None:
        pytest.skip("this tokenizer has no <|action_start|>")
    ids = tokenizer.encode("let me look that up", allow_special=False)
    tail = tokenizer.encode("<|plugin|>\n{\"name\": \"search\"}", allow_special=True)
    stream = TextStream(tokenizer, tools=True)
    assert _streamed(stream, ids + [action] + tail) == tokenizer.decode(ids, skip_special=True)
    assert "<|plugin|>" in stream.text
