"""Sampling: greedy, temperature, top-k, top-p and seeds, on explicit distributions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.runtime.sampling import SamplingParams, filter_logits, sample, sampling_args

LOGITS = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]], jnp.float32))


def kept(top_k, top_p):
    return np.isfinite(np.asarray(filter_logits(LOGITS, jnp.int32(top_k), jnp.float32(top_p))))[0].tolist()


def test_top_k_keeps_the_k_most_likely():
    assert kept(2, 1.0) == [False, True, False, True, False]
    assert kept(0, 1.0) == [True] * 5  # 0 = off


def test_top_p_keeps_the_smallest_nucleus():
    assert kept(0, 0.5) == [False, True, False, True, False]  # 0.4 + 0.3 >= 0.5
    assert kept(0, 0.4) == [False, True, False, False, False]  # the top token alone already covers it
    assert kept(0, 0.01) == [False, True, False, False, False]  # never empty
    assert kept(3, 0.9) == [False, True, False, True, True]  # both filters apply


def draw(temperature, top_k=0, top_p=1.0, seed=0, n=4000):
    logits = jnp.broadcast_to(LOGITS, (n, 5))
    key = jax.random.PRNGKey(seed)
    return np.asarray(sample(logits, key, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)))


def test_greedy_is_argmax():
    assert (draw(0.0) == 1).all()


def test_temperature_one_follows_the_distribution():
    freq = np.bincount(draw(1.0), minlength=5) / 4000
    np.testing.assert_allclose(freq, [0.05, 0.4, 0.1, 0.3, 0.15], atol=0.03)


def test_low_temperature_sharpens_and_filters_apply():
    assert (np.bincount(draw(0.1), minlength=5)[1] / 4000) > 0.9
    assert set(np.unique(draw(1.0, top_k=2))) == {1, 3}
    assert set(np.unique(draw(1.0, top_p=0.5))) == {1, 3}


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_unfiltered_sampling_matches_filters_switched_off(temperature):
    """filters=False (the engine's path when top_k = 0 and top_p = 1) draws exactly what the filter with both
    switched off draws, on a vocabulary-sized row with a long tail of tiny probabilities."""
    params = SamplingParams(temperature=temperature)
    assert not params.filters and SamplingParams(top_k=5).filters and SamplingParams(top_p=0.9).filters
    logits = jax.random.normal(jax.random.PRNGKey(7), (8, 129280), jnp.float32) * 4.0
    for seed in range(3):
        key = jax.random.PRNGKey(seed)
        np.testing.assert_array_equal(sample(logits, key, *sampling_args(params), filters=False),
                                      sample(logits, key, *sampling_args(params), filters=True))


def test_seed_reproducible_and_different_seeds_differ():
    np.testing.assert_array_equal(draw(1.0, seed=3), draw(1.0, seed=3))
    assert (draw(1.0, seed=3) != draw(1.0, seed=4)).any()


BAD_PARAMS = [({"temperature": -1.0}, "temperature -1.0"), ({"temperature": float("nan")}, "temperature nan"),
              ({"temperature": float("inf")}, "temperature inf"), ({"top_k": -2}, "top_k -2"),
              ({"top_p": 0.0}, "top_p 0.0"), ({"top_p": 1.5}, "top_p 1.5")]


@pytest.mark.parametrize("kw, msg", BAD_PARAMS)
def test_bad_sampling_params(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_verify_drafts_greedy_keeps_the_agreeing_prefix():
    """Greedy: drafts kept while they equal the target's argmax, then the argmax after the last kept one."""
    from dsv4_jax.runtime.sampling import verify_drafts

    target = jax.nn.one_hot(jnp.array([[3, 1, 4, 2]] * 3), 5) * 5.0  # argmax 3, 1, 4, 2 at the 4 positions
    drafts = jnp.array([[3, 1, 4], [3, 0, 4], [0, 1, 4]])
    n, tokens = verify_drafts(target, jnp.zeros((3, 3, 5)), drafts, jax.random.PRNGKey(0),
                              *sampling_args(SamplingParams()), filters=False)
    assert n.tolist() == [3, 1, 0]
    assert tokens[0].tolist() == [3, 1, 4, 2] and tokens[1, :2].tolist() == [3, 1] and tokens[2, 0] == 3


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4, top_p=0.9)])
def test_verify_drafts_emits_the_target_distribution(params):
    """Rejection sampling on explicit distributions, 200,000 rows: drafts drawn from q (far from p), the first
    emitted token (a kept draft or the residual's draw) has the target's distribution p within sampling noise
    (total variation < 0.006; drawing from q alone is 0.3 away), and so does the second where the first draft was
    kept; drafts kept at rate sum(min(p, q))."""
    from dsv4_jax.runtime.sampling import probabilities, verify_drafts

    rows, V = 200_000, 6
    p_logits = jnp.log(jnp.array([[0.3, 0.25, 0.2, 0.1, 0.1, 0.05], [0.1, 0.1, 0.4, 0.2, 0.1, 0.1],
                                  [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]]))
    q_logits = jnp.log(jnp.array([[0.05, 0.1, 0.1, 0.25, 0.3, 0.2], [0.3, 0.05, 0.05, 0.3, 0.2, 0.1]]))
    settings = sampling_args(params)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    drafts = jnp.stack([sample(jnp.broadcast_to(q_logits[i], (rows, V)), k, *settings, filters=params.filters)
                        for i, k in enumerate((k1, k2))], axis=1)
    n, tokens = verify_drafts(jnp.broadcast_to(p_logits, (rows, 3, V)), jnp.broadcast_to(q_logits, (rows, 2, V)),
                              drafts, k3, *settings, filters=params.filters)
    p = np.asarray(probabilities(p_logits, *settings, filters=params.filters))
    q = np.asarray(probabilities(q_logits, *settings, filters=params.filters))
    first = np.bincount(np.asarray(tokens[:, 0]), minlength=V) / rows
    assert 0.5 * np.abs(first - p[0]).sum() < 0.006, (first, p[0])
    assert 0.5 * np.abs(q[0] - p[0]).sum() > 0.3
    kept = np.asarray(n) >= 1
    second = np.bincount(np.asarray(tokens[kept, 1]), minlength=V) / kept.sum()
    assert 0.5 * np.abs(second - p[1]).sum() < 0.01, (second, p[1])
    assert abs(kept.mean() - np.minimum(p[0], q[0]).sum()) < 0.005
