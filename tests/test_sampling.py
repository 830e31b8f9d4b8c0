"""Sort-free sampler: kept sets vs a numpy sort-based reference, draw frequencies, greedy rows, no sort op
in the HLO, and per-row keys."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internlm2_jax import get_preset, init_params
from internlm2_jax.generate import _generate_jit, _knobs, _stop_array
from internlm2_jax.sampling import BLOCK, CANDIDATE_BLOCKS, kept_mask, sample_logits, sample_rows

# (vocab, block, max_blocks): the real vocabulary with the default blocks; a small one whose blocks and
# candidate budget are scaled down so peaked rows search a few gathered blocks and flat rows first narrow
# over the whole vocabulary; a vocabulary that is not a multiple of the block; one of only a few blocks.
SHAPES = [(92544, BLOCK, CANDIDATE_BLOCKS), (2048, 16, 8), (1000, 16, 8), (37, 8, 2)]
T = np.array([1.0, 1.0, 0.7, 2.0, 0.0, 1.0, 1.0, 1.3, 1.0, 0.5], np.float32)
K = np.array([0, 5, 50, 0, 3, 1, 20, 0, 10**6, 7], np.int32)
P = np.array([0.9, 1.0, 0.5, 0.3, 0.9, 0.9, 0.95, 1.0, 0.0, 0.8], np.float32)


def reference_mask(x: np.ndarray, temperature, top_k, top_p, margin: float = 0.0) -> np.ndarray:
    """The old sort-based semantics in float64 on the sampler's fp32 scaled logits `x * (1 / t)`: top-k keeps
    values >= the k-th largest; top-p the smallest most-likely prefix (after top-k) whose mass reaches p, plus
    every logit equal to its smallest member (only the top logits for p <= 0). `margin` shifts p."""
    out = np.zeros(x.shape, bool)
    for r, row in enumerate(x):
        if temperature[r] <= 0:
            out[r, np.argmax(row)] = True
            continue
        s = (row.astype(np.float32) * (np.float32(1) / np.float32(temperature[r]))).astype(np.float64)
        d = np.sort(s)[::-1]
        cut = d[top_k[r] - 1] if 0 < top_k[r] < len(s) else -np.inf
        if top_p[r] < 1:
            pr = np.where(d >= cut, np.exp(d - d[0]), 0.0)
            before = np.cumsum(pr / pr.sum()) - pr / pr.sum()
            cut = d[(before < top_p[r] + margin) & (d >= cut)].min() if top_p[r] > 0 else d[0]
        out[r] = s >= cut
    return out


def check_kept(got: np.ndarray, x: np.ndarray, t, k, p, tol: float = 1e-5) -> None:
    """Exactly the reference, except where a prefix mass lies within `tol` of p (fp32 sums may then decide
    either way, as the sort-based code's did): there, between the references at p -/+ tol."""
    want, fewer, more = (reference_mask(x, t, k, p, margin) for margin in (0.0, -tol, tol))
    for r in range(len(x)):
        if np.array_equal(fewer[r], more[r]):
            assert np.array_equal(got[r], want[r]), f"row {r}: kept {got[r].sum()} vs reference {want[r].sum()}"
        else:
            assert (fewer[r] <= got[r]).all() and (got[r] <= more[r]).all(), f"row {r}"
            assert np.array_equal(got[r], x[r] * np.float32(1 / t[r]) >= (x[r] * np.float32(1 / t[r]))[got[r]].min())


def _logits(rng, b: int, v: int, scale: float) -> np.ndarray:
    x = (rng.normal(size=(b, v)) * scale).astype(np.float32)
    x[1] = np.round(x[1] * 2) / 2  # many exact ties
    x[9, : min(v, 40)] = x[9].max()  # a tied maximum
    return x


@pytest.mark.parametrize("v,block,max_blocks", SHAPES)
def test_kept_set_matches_sort_reference(v, block, max_blocks):
    fn = jax.jit(functools.partial(kept_mask, block=block, max_blocks=max_blocks))
    rng = np.random.default_rng(v)
    for scale in (0.3, 3.0, 8.0):  # flat (whole-vocabulary narrowing), medium, peaked (few gathered blocks)
        x = _logits(rng, len(T), v, scale)
        check_kept(np.asarray(fn(jnp.asarray(x), T, K, P)), x, T, K, P)


def test_kept_set_all_ties():
    x = np.zeros((4, 4096), np.float32)
    x[1, :10] = 1.0
    x[2, ::2] = -1e-30  # distinct floats within 1e-30 of 0: bisection by value alone would never finish
    x[3] = np.round(np.random.default_rng(0).normal(size=4096))
    t, k, p = np.ones(4, np.float32), np.array([0, 50, 50, 3000], np.int32), np.array([0.9, 1.0, 0.5, 0.9], np.float32)
    got = np.asarray(jax.jit(functools.partial(kept_mask, block=16, max_blocks=8))(jnp.asarray(x), t, k, p))
    check_kept(got, x, t, k, p)


@pytest.mark.parametrize("v,block,max_blocks,scale",
                         [(64, 8, 2, 1.5), (2048, 16, 8, 0.7), (92544, BLOCK, CANDIDATE_BLOCKS, 6.0)])
def test_draw_frequencies_match_renormalised_distribution(v, block, max_blocks, scale):
    rng = np.random.default_rng(1)
    row = (rng.normal(size=v) * scale).astype(np.float32)
    n_rows, calls = (4000, 1) if v < 10000 else (100, 20)
    fn = jax.jit(functools.partial(sample_rows, block=block, max_blocks=max_blocks))
    logits = jnp.asarray(np.broadcast_to(row, (n_rows, v)))
    for t, k, p in [(1.0, 0, 1.0), (1.0, 8, 1.0), (0.8, 0, 0.6), (1.2, 12, 0.9)]:
        knobs = (np.full(n_rows, t, np.float32), np.full(n_rows, k, np.int32), np.full(n_rows, p, np.float32))
        draws = np.concatenate([np.asarray(fn(logits, jax.random.split(jax.random.key(c), n_rows), *knobs))
                                for c in range(calls)])
        kept = reference_mask(row[None], *(a[:1] for a in knobs))[0]
        assert np.array_equal(kept, reference_mask(row[None], *(a[:1] for a in knobs), margin=1e-4)[0])
        s = row.astype(np.float64) / t
        prob = np.where(kept, np.exp(s - s.max()), 0.0)
        prob /= prob.sum()
        assert kept[draws].all(), "drew a token outside the kept set"
        n = len(draws)
        common = prob * n >= 5  # chi-square over well-populated tokens; the rest lumped together
        observed = np.bincount(draws, minlength=v)
        obs = np.append(observed[common], observed[~common].sum())
        exp = np.append(prob[common] * n, prob[~common].sum() * n)
        mask = exp > 0
        chi2, dof = float((((obs - exp) ** 2)[mask] / exp[mask]).sum()), int(mask.sum()) - 1
        assert chi2 < dof + 6 * np.sqrt(2 * max(dof, 1)) + 10, f"t={t} k={k} p={p}: chi2 {chi2:.1f}, dof {dof}"


def test_greedy_rows_are_argmax_and_ignore_other_rows():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 5000)).astype(np.float32)
    x[0, [7, 4000]] = 9.0  # tied maximum: the first index wins, as in jnp.argmax
    x[2, 123] = 9.0
    keys = jax.random.split(jax.random.key(0), 4)
    fn = jax.jit(sample_rows)
    greedy_t = np.array([0.0, 1.0, -1.0, 1.0], np.float32)
    a = np.asarray(fn(jnp.asarray(x), keys, greedy_t, np.array([0, 5, 0, 0], np.int32), np.full(4, 0.9, np.float32)))
    b = np.asarray(fn(jnp.asarray(x), keys, np.array([0.0, 3.0, 0.0, 0.2], np.float32),
                      np.array([9, 0, 1, 50], np.int32), np.array([0.1, 1.0, 0.5, 0.2], np.float32)))
    argmax = np.asarray(jnp.argmax(jnp.asarray(x), axis=-1))
    assert argmax[0] == 7 and argmax[2] == 123
    np.testing.assert_array_equal(a[[0, 2]], argmax[[0, 2]])
    np.testing.assert_array_equal(b[[0, 2]], argmax[[0, 2]])
    all_greedy = np.asarray(fn(jnp.asarray(x), keys, np.zeros(4, np.float32), np.zeros(4, np.int32),
                               np.ones(4, np.float32)))
    np.testing.assert_array_equal(all_greedy, argmax)


def test_each_row_draws_with_its_own_key():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 92544)).astype(np.float32) * 6
    keys = jax.random.split(jax.random.key(5), 4)
    t, k, p = np.ones(4, np.float32), np.array([0, 40, 0, 0], np.int32), np.array([0.9, 1.0, 0.8, 1.0], np.float32)
    fn = jax.jit(sample_rows)
    base = np.asarray(fn(jnp.asarray(x), keys, t, k, p))
    x2 = x.copy()
    x2[3] = rng.normal(size=92544) * 0.1  # a flat row: the batch now searches the whole vocabulary
    changed = np.asarray(fn(jnp.asarray(x2), keys, t, k, np.array([0.9, 1.0, 0.8, 0.95], np.float32)))
    np.testing.assert_array_equal(changed[:3], base[:3])
    other_keys = jnp.concatenate([keys[:3], jax.random.split(jax.random.key(99), 1)])
    np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(x), other_keys, t, k, p))[:3], base[:3])
    # A row alone with its key draws what it drew in the batch.
    alone = np.asarray(fn(jnp.asarray(x[1:2]), keys[1:2], t[1:2], k[1:2], p[1:2]))
    assert alone[0] == base[1]
    # sample_logits (scalar knobs, one key) is sample_rows with the key split per row.
    via = np.asarray(sample_logits(jnp.asarray(x), jax.random.key(5), temperature=1.0, top_p=0.9))
    np.testing.assert_array_equal(via, np.asarray(fn(jnp.asarray(x), keys, t, np.zeros(4, np.int32),
                                                      np.full(4, 0.9, np.float32))))


_SORT_OP = re.compile(r"\b(stablehlo|mhlo|chlo)\.(sort|top_k)\b|\bsort\(|\btopk\b|TopK", re.IGNORECASE)


def test_no_sort_in_hlo():
    b, v = 8, 92544
    args = (jnp.zeros((b, v)), jax.random.split(jax.random.key(0), b), jnp.ones(b), jnp.zeros(b, jnp.int32),
            jnp.full(b, 0.9))
    lowered = jax.jit(sample_rows).lower(*args)
    for text in (lowered.as_text(), lowered.compile().as_text()):
        assert not _SORT_OP.search(text), _SORT_OP.search(text).group(0)
    cfg = get_preset("tiny", dtype="float32")
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
    greedy = _generate_jit.lower(cfg, params, jnp.zeros((2, 16), jnp.int32), jnp.full((2,), 3, jnp.int32),
                                 jax.random.key(0), _stop_array((2,)), _knobs(0.0, 0, 1.0, 1.0, None),
                                 max_new_tokens=4, pad_id=0)
    for text in (greedy.as_text(), greedy.compile().as_text()):
        assert not _SORT_OP.search(text), _SORT_OP.search(text).group(0)
