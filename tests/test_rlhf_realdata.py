"""Real-data path: chunked log-probs, checkpoint sources (HF / Orbax / msgpack), sentencepiece prompts, the
RM scoring format, PPO end to end with a tiny trained tokenizer, and the mesh equivalence worker."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm2_jax import get_preset
from internlm2_jax.rlhf.logprobs import chunked_token_logprobs, policy_logprobs, token_logprobs
from internlm2_jax.params_loading import load_policy, load_reward, save_msgpack, save_params_orbax, source_kind
from internlm2_jax.rlhf.mesh import actor_shardings, critic_shardings, default_mesh
from internlm2_jax.rlhf.preference_data import encode_for_reward
from internlm2_jax.rlhf.prompts import default_reward_token_id, read_prompts, turn_end_ids
from internlm2_jax.rlhf.reward_model import DEFAULT_CONDITIONS, init_policy, init_reward_params
from internlm2_jax.rlhf.rollout import RewardModelScorer, make_prompt_items

HERE = os.path.dirname(__file__)
CFG = get_preset("tiny", dtype="float32", vocab_size=128, num_hidden_layers=1)
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Add 2 and 3 to get 5, then 7 and 8 give 15.\n",
         "def add(a, b):\n    return a + b\n", "Be helpful, harmless and honest in every answer."] * 20


def _same(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_chunked_logprobs_match_full_logits():
    # Kernel level, values and gradients: chunks of 8 over 21 positions (two full chunks + a padded one).
    h = jax.random.normal(jax.random.key(0), (3, 21, 16))
    head = jax.random.normal(jax.random.key(1), (16, 40)) * 0.5
    tokens = jax.random.randint(jax.random.key(2), (3, 21), 0, 40)
    mask = jnp.zeros((3, 21)).at[:, 9:].set(1.0)

    def total(fn):
        def f(h, w):
            logp, ent = fn(h, w)
            return jnp.sum(logp * mask) + 0.1 * jnp.sum(ent * mask), (logp, ent)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (_, full), g_full = total(lambda h, w: token_logprobs(jnp.einsum("btd,dv->btv", h, w), tokens))(h, head)
    (_, chunked), g_chunked = total(lambda h, w: chunked_token_logprobs(h, w, tokens, chunk=8))(h, head)
    for f, c in zip(full, chunked):  # position 0 has no action (no previous logits)
        np.testing.assert_allclose(np.asarray(c)[:, 1:], np.asarray(f)[:, 1:], rtol=1e-5, atol=1e-5)
    for a, b in zip(g_full, g_chunked):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    # Model level: the policy's chunked log-probs equal the full-logits ones.
    params = nn.meta.unbox(init_policy(CFG, jax.random.key(0)))
    toks = jax.random.randint(jax.random.key(1), (2, 21), 0, CFG.vocab_size)
    full, chunked = jax.jit(lambda p: (policy_logprobs(CFG, p, toks, 0), policy_logprobs(CFG, p, toks, 8)))(params)
    for f, c in zip(full, chunked):
        np.testing.assert_allclose(np.asarray(c)[:, 1:], np.asarray(f)[:, 1:], rtol=1e-5, atol=1e-5)


def test_checkpoint_sources_load_onto_mesh(tmp_path):
    from internlm2_jax.hf_io import save_hf
    from internlm2_jax.train.optimizer import OptimizerConfig, make_optimizer
    from internlm2_jax.train.causal_lm import causal_lm_trainer

    mesh = default_mesh()
    a_sh, c_sh = actor_shardings(CFG, mesh), critic_shardings(CFG, mesh)
    tx = make_optimizer(OptimizerConfig(peak_lr=1e-3, warmup_steps=0))
    # A pretraining / SFT workdir: the runner's TrainState under <workdir>/checkpoints/<step>/state.
    from internlm2_jax.checkpointing import CheckpointConfig, Checkpointer

    state = causal_lm_trainer(CFG, tx, mesh).init_state(jax.random.key(3))
    ck = Checkpointer(str(tmp_path / "sft" / "checkpoints"), CheckpointConfig(async_save=False))
    ck.save(7, state, force=True)
    ck.close()
    assert source_kind(str(tmp_path / "sft")) == "orbax"
    assert _same(load_policy(str(tmp_path / "sft"), CFG, a_sh), state.params)
    rm_from_sft = load_reward(str(tmp_path / "sft"), CFG, c_sh)  # policy source → fresh RM, zero head
    assert _same(rm_from_sft["backbone"]["layers"], state.params["layers"]) and not np.any(rm_from_sft["v_head"])
    # HF folder.
    save_hf(CFG, state.params, str(tmp_path / "hf"))
    assert source_kind(str(tmp_path / "hf")) == "hf" and _same(load_policy(str(tmp_path / "hf"), CFG, a_sh), state.params)
    # RM saved with Orbax and as msgpack: both read back as RMs (head kept).
    rm = init_reward_params(CFG, jax.random.key(4))
    rm["v_head"] = rm["v_head"] + 0.5
    save_params_orbax(str(tmp_path / "rm"), 2, rm, meta={"kind": "reward_model"})
    save_msgpack(str(tmp_path / "rm.msgpack"), rm)
    for src in (str(tmp_path / "rm"), str(tmp_path / "rm.msgpack")):
        got = load_reward(src, CFG, c_sh)
        assert _same(got, rm) and got["v_head"].sharding == c_sh["v_head"], src
    with pytest.raises(FileNotFoundError, match="not an HF folder"):
        source_kind(str(tmp_path / "nothing"))


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    from internlm2_jax.data.tokenizer_training import train_tokenizer
    from internlm2_jax.tokenizer import Tokenizer

    path = train_tokenizer(TEXTS, str(tmp_path_factory.mktemp("tok") / "tiny"), vocab_size=384)
    return Tokenizer(path)


def test_prompts_reward_token_and_rm_scoring_format(tmp_path, sp_tokenizer):
    tok = sp_tokenizer
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Add 2 and 3.", "category": "math"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "Be helpful."}]}) + "\n")
    recs = read_prompts(str(path))
    assert recs[0] == {"messages": [{"role": "user", "content": "Add 2 and 3."}], "category": "math"}
    assert recs[1]["category"] is None
    rid = default_reward_token_id(tok)
    assert tok.sp.id_to_piece(rid) == "[UNUSED_TOKEN_1]"
    items = make_prompt_items(recs, tok, DEFAULT_CONDITIONS)
    scorer = RewardModelScorer(CFG, None, rid, end_ids=turn_end_ids(tok), strip_ids=tok.stop_ids)
    for item, rec in zip(items, recs):
        content = "then 7 and 8 give 15."
        sampled = tok.encode(content) + [tok.im_end_id]  # what the actor emits: text, then the stop id
        want = encode_for_reward(tok, rec["messages"] + [{"role": "assistant", "content": content}],
                                 rec["category"], DEFAULT_CONDITIONS, rid)  # the RM's training format
        assert scorer.sequence(item, sampled) == want
        assert want[-3:-1] == [tok.im_end_id] + tok.encode("\n")


def test_ppo_on_sentencepiece_prompts_from_hf_actor_and_orbax_rm(tmp_path, sp_tokenizer):
    from experiments.ppo import train_ppo
    from internlm2_jax.hf_io import save_hf
    from internlm2_jax.rlhf.rl_trainer import RLConfig

    tok = sp_tokenizer
    cfg = get_preset("tiny", dtype="float32", vocab_size=tok.vocab_size, num_hidden_layers=1)
    actor = nn.meta.unbox(init_policy(cfg, jax.random.key(0)))
    save_hf(cfg, actor, str(tmp_path / "sft_hf"))
    rm = init_reward_params(cfg, jax.random.key(1), backbone=actor)
    rm["v_head"] = jax.random.normal(jax.random.key(2), rm["v_head"].shape) * 0.1
    save_params_orbax(str(tmp_path / "rm"), 1, rm)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t[:30], "category": c}) + "\n"
                               for t, c in zip(TEXTS[:4], ("helpful", "math", "code", "harmless"))))
    out = train_ppo(str(tmp_path / "ppo"), model=cfg, iterations=1, actor_init=str(tmp_path / "sft_hf"),
                    reward="rm:" + str(tmp_path / "rm"), prompts=[str(prompts)], tokenizer=tok.path,
                    ppo=RLConfig(batch_size=4, max_prompt_len=64, max_new_tokens=4, critic_warmup_iters=0,
                                 ptx_coef=0.0), actor_lr=1e-3, critic_lr=1e-3)
    assert np.isfinite(out["final_reward"]) and out["final_reward"] != 0.0
    rows = [json.loads(line) for line in open(tmp_path / "ppo" / "rollouts.jsonl")]
    assert len(rows) == 4 and {r["category"] for r in rows} == {"helpful", "math", "code", "harmless"}
    saved = load_policy(str(tmp_path / "ppo"), cfg, actor_shardings(cfg, default_mesh()))
    assert not _same(saved, actor)  # the trained actor was written with Orbax and reads back


def test_real_path_ppo_has_ptx_loss_and_clipping(tmp_path, sp_tokenizer):
    """The report's recipe on the sentencepiece path: ptx batches from the pretraining input pipeline (non-zero
    pretraining loss), and several PPO epochs × minibatches per rollout, so the ratio moves and clipping acts."""
    from experiments.ppo import train_ppo
    from internlm2_jax.input import InputConfig
    from internlm2_jax.rlhf.rl_trainer import RLConfig
    from internlm2_jax.train.metrics_log import read_metrics

    tok = sp_tokenizer
    cfg = get_preset("tiny", dtype="float32", vocab_size=tok.vocab_size, num_hidden_layers=1)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t[:30], "category": "helpful"}) + "\n" for t in TEXTS[:8]))
    pretrain = InputConfig(sources={"web": f"jsonl:{corpus}"}, seq_len=48, global_batch_size=4, read_threads=0,
                           prefetch_batches=0)
    train_ppo(str(tmp_path / "ppo"), model=cfg, iterations=2, reward="target:e", prompts=[str(prompts)],
              tokenizer=tok.path, pretrain_data=pretrain, actor_lr=1e-2, critic_lr=1e-3,
              ppo=RLConfig(batch_size=4, max_prompt_len=64, max_new_tokens=6, critic_warmup_iters=0, ptx_coef=0.5,
                           ppo_epochs=2, num_minibatches=2))
    rows = read_metrics(str(tmp_path / "ppo"))
    assert len(rows) == 2 and all(r["pretrain_loss"] > 0 for r in rows), rows
    assert max(r["clip_frac"] for r in rows) > 0, rows


def test_ppo_and_rm_steps_equal_on_a_sharded_mesh():
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE)}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "workers", "rlhf_sharded.py")], capture_output=True,
                          text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RLHF SHARDED OK" in proc.stdout
