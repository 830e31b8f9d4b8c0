"""Needle-in-a-haystack: haystack construction (depth, budget, chat frame), the grid + heat map on a
tiny model, loading an Orbax checkpoint, and perplexity against a direct forward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm2_jax import forward, get_preset, init_params
from internlm2_jax.checkpointing import CheckpointConfig, Checkpointer
from internlm2_jax.eval import needle
from internlm2_jax.eval.perplexity import perplexity
from internlm2_jax.eval.runner import load_model, load_tokenizer

CONFIG = get_preset("tiny", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    max_position_embeddings=64, dtype="float32")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("stdlib", CONFIG, None)  # the 512-piece tokenizer the pretraining test caches


@pytest.fixture(scope="module")
def params():
    return nn.meta.unbox(init_params(CONFIG, jax.random.key(0)))


def test_chat_frame_is_the_chat_rendering(tok):
    head, tail = needle.prompt_frame(tok, "chat")
    haystack = " The grass is green."
    full = tok.encode_chat([{"role": "user", "content": haystack + "\n\n" + needle.QUESTION}],
                           add_generation_prompt=True)
    assert head + tok.encode(haystack) + tail == full  # a haystack starting with a space merges with nothing
    assert tok.decode(head) == "<s><|im_start|>user\n"
    assert head[:2] == [tok.bos_id, tok.im_start_id] and tail[-1:] == tok.encode("assistant\n")[-1:]
    with pytest.raises(ValueError, match="prompt_format"):
        needle.prompt_frame(tok, "markdown")


@pytest.mark.parametrize("fmt", ["chat", "plain"])
@pytest.mark.parametrize("length", [256, 1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_needle_at_requested_depth_within_budget(tok, fmt, length, depth):
    sentences = needle.generated_sentences(200, seed=1)
    h = needle.build_haystack(tok, sentences, context_length=length, depth=depth, value="4721", prompt_format=fmt)
    assert len(h.prompt) <= length
    assert len(h.prompt) > length - h.max_sentence_tokens  # the budget is filled up to one sentence
    needle_ids = tok.encode(" " + needle.NEEDLE.format(value="4721"))
    assert h.prompt[h.needle_start:h.needle_start + h.needle_len] == needle_ids
    filler = h.context_end - h.context_start - h.needle_len
    offset = h.needle_start - h.context_start
    assert abs(offset - depth * filler) <= h.max_sentence_tokens  # within one sentence of the target
    assert abs(h.actual_depth - depth) <= h.max_sentence_tokens / filler
    text = tok.decode(h.prompt)
    assert text.count("The secret number is 4721.") == 1
    assert ("<|im_start|>assistant\n" in text) == (fmt == "chat")


def test_stdlib_filler_and_errors(tok):
    lines = needle.stdlib_sentences(500)
    assert len(lines) == 500 and not any(c.isdigit() for line in lines for c in line)
    h = needle.build_haystack(tok, lines, context_length=512, depth=0.5, value="1234")
    assert len(h.prompt) <= 512 and 0.3 < h.actual_depth < 0.7
    with pytest.raises(ValueError, match="no room"):
        needle.build_haystack(tok, lines, context_length=20, depth=0.5, value="1234")
    with pytest.raises(ValueError, match="depth"):
        needle.build_haystack(tok, lines, context_length=512, depth=1.5, value="1234")


def test_needle_grid_and_heatmap(tok, params, tmp_path):
    res = needle.needle_suite(CONFIG, params, tok, context_lengths=[96, 160], depths=[0, 50, 100],
                              trials=2, max_new_tokens=4, batch_size=6)
    grid = np.asarray(res["grid"])
    assert grid.shape == (2, 3) and ((grid >= 0) & (grid <= 1)).all()
    assert len(res["samples"]) == 2 * 3 * 2 and all(s["prompt_tokens"] <= s["context_length"] for s in res["samples"])
    from internlm2_jax.eval.plots import needle_heatmap

    path = needle_heatmap(res["grid"], res["context_lengths"], res["depths"], str(tmp_path / "needle.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_load_model_from_orbax_workdir(params, tmp_path):
    """The params-only restore `evaluate(checkpoint=...)` uses (the CLI test covers `evaluate` itself)."""
    ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"), CheckpointConfig(async_save=False))
    trained = jax.tree.map(lambda x: x * 0.5, params)  # stands in for briefly trained weights
    ckpt.save(8, {"params": trained, "step": jnp.int32(8)}, force=True)
    ckpt.close()
    config, loaded, source = load_model(CONFIG, None, str(tmp_path / "run"))
    assert config == CONFIG
    assert source.startswith("orbax:")
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_perplexity_matches_forward(params):
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, CONFIG.vocab_size, (2, 16)).astype(np.int32)
    seg = np.ones_like(tokens)
    seg[1, 10:] = 2  # two documents in row 1: no target across the boundary
    pos = np.concatenate([np.arange(16)[None], np.concatenate([np.arange(10), np.arange(6)])[None]]).astype(np.int32)
    batch = {"tokens": tokens, "segment_ids": seg, "positions": pos, "loss_mask": np.ones_like(tokens)}
    res = perplexity(CONFIG, params, [batch])
    logp = np.asarray(jax.nn.log_softmax(forward(CONFIG, params, jnp.asarray(tokens), positions=jnp.asarray(pos),
                                                 segment_ids=jnp.asarray(seg)), axis=-1))
    nll = [-logp[b, t, tokens[b, t + 1]] for b in range(2) for t in range(15) if seg[b, t] == seg[b, t + 1]]
    assert res["tokens"] == len(nll) == 29
    np.testing.assert_allclose(res["loss"], np.mean(nll), rtol=1e-4)
    np.testing.assert_allclose(res["perplexity"], np.exp(np.mean(nll)), rtol=1e-3)
