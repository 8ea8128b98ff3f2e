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
