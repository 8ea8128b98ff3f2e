"""Metadata: the sliding window's decode layout (``dsv4_jax.model.sliding_window.WindowMeta``, C == 1)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny
from dsv4_jax.model.metadata import build_metadata
from dsv4_jax.model.sliding_window import window_keys

W = 8


def ring_after(t: int) -> np.ndarray:
    """The window ring [W] after positions 0 .. t were written at slot pos % W (-1 = never written)."""
    ring = np.full(W, -1)
    for p in range(t + 1):
        ring[p % W] = p
    return ring


@pytest.mark.parametrize("start", [0, 1, W - 1, W, 5 * W + 3])
def test_decode_window_is_the_written_ring_in_slot_order(start):
    """A one-token chunk at position t = start: key s is ring slot s after the token's write, and the mask
    keeps exactly the slots that hold positions max(0, t - W + 1) .. t. Second row: t = 2 * start + 1."""
    starts = np.array([start, 2 * start + 1])
    meta = build_metadata(tiny(sliding_window=W), jnp.asarray(starts), jnp.ones(2, jnp.int32), 1, 128)
    assert meta.window.ring_order is None
    mask = np.asarray(meta.window.key_mask)
    assert mask.shape == (2, 1, W)
    np.testing.assert_array_equal(np.asarray(meta.window.ring_write_slot)[:, 0], starts % W)

    # window_keys on a ring of positions (as of t - 1) and the token's position as its kv
    before = jnp.asarray(np.stack([ring_after(t - 1) for t in starts])[..., None])
    keys, written = window_keys(before, jnp.asarray(starts)[:, None, None], meta.window, 1)
    assert keys.shape == (2, 1, W, 1)
    for b, t in enumerate(starts):
        ring = ring_after(t)
        want = (ring >= max(0, t - W + 1)) & (ring <= t)
        np.testing.assert_array_equal(mask[b, 0], want, err_msg=f"t = {t}")
        np.testing.assert_array_equal(np.asarray(written)[b, :, 0], ring)
        np.testing.assert_array_equal(np.asarray(keys)[b, 0, :, 0], ring)


def test_decode_step_computes_rope_tables_once():
    """The metadata step's values are buffers the layers read, not expressions XLA re-derives inside each
    consumer fusion: the compiled decode step evaluates cos once per RoPE table the metadata builds (main,
    compress, and each compression rate's entry angles). Without the barrier that ends ``build_metadata``
    this tiny model's step held 22."""
    import re

    import jax
    from dsv4_jax.model.cache import init_cache
    from dsv4_jax.runtime.engine import DeviceSteps, split_weights
    from dsv4_jax.weights.random_init import random_model
    from dsv4_jax.runtime.sampling import SamplingParams, sampling_args

    cfg = tiny()
    graphdef, state_def, weights = split_weights(random_model(cfg, jnp.float32))
    B, capacity = 2, 32
    greedy = SamplingParams()
    hlo = DeviceSteps(graphdef, state_def, capacity).decode.lower(
        weights, init_cache(cfg, B, capacity, jnp.float32), jnp.zeros((B,), jnp.int32), jnp.full((B,), 9, jnp.int32),
        jnp.ones((B,), bool), jax.random.PRNGKey(0), *sampling_args(greedy), filters=greedy.filters).compile().as_text()
    n_cos = len(re.findall(r"\bcosine\(", hlo))
    assert n_cos == 2 + len(cfg.compress_rates), n_cos
