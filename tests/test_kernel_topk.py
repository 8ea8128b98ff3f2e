"""The top-k select (kernels_pallas/topk.py) against ``select_topk`` (one ``lax.top_k``).

CPU: the Pallas kernel in interpret mode, written into a poisoned aliased output, on rows with 0, 1, fewer
than k, exactly k and more pickable entries, ties at the k-th value, scores of every sign and magnitude
(the int32 order keys), non-finite scores; the chunked tournament for rows too long for the kernel; a CUDA
cross-lowering check at the real shapes. GPU (skipped elsewhere): the compiled kernel at real sizes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.ops.indexer import select_topk
from kernels_pallas import indexer as ix
from kernels_pallas import topk as tk
from kernels_pallas.testing import lower_for_h100
from tests.test_kernel_indexer import causal, prefill_inputs

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (runs the compiled kernel)")


def tie_free_scores(key, shape):
    """Distinct finite scores (a random permutation of a grid), so the top-k set is well defined."""
    N = shape[-1]
    rows = int(np.prod(shape[:-1]))
    perm = jax.vmap(lambda k: jax.random.permutation(k, N))(jax.random.split(key, rows))
    return (perm.astype(jnp.float32) / N - 0.5).reshape(shape) * 7.0


def check_topk(ids, scores, n_visible, k, *, what=""):
    """The set ``select_topk`` picks, ascending ids, -1 exactly where fewer than k entries are pickable."""
    ids = np.asarray(ids)
    ref = np.asarray(tk.reference(scores, n_visible, k))
    assert ids.shape == ref.shape and ids.dtype == np.int32, (ids.shape, ids.dtype, ref.shape)
    for r, (got, want) in enumerate(zip(ids.reshape(-1, k), ref.reshape(-1, k))):
        n_ok = np.sum(want >= 0)
        assert set(got[got >= 0]) == set(want[want >= 0]), f"{what}: row {r} selects a different set"
        assert np.all(got[n_ok:] == -1), f"{what}: row {r}: {got[n_ok:][got[n_ok:] != -1][:4]} after the picks"
        assert np.all(np.diff(got[:n_ok]) > 0), f"{what}: row {r} ids not ascending"


# name -> (seed, scores shape, n_visible, k)
SELECT_CASES = {
    # decode layout [B,N]: rows with 0, 1, fewer than k, exactly k and more visible entries; N padded to 1024.
    "decode_rows": (31, (6, 1000), [0, 1, 10, 64, 500, 1000], 64),
    # prefill layout [B,S,N], causal visibility.
    "prefill_rows": (32, (2, 9, 300), causal(9, 300, [0, 1100]), 32),
    # Flash decode row length (32K index keys at 128K context), ragged; k = 512.
    "flash_k512": (33, (3, 32768), [32768, 700, 300], 512),
    # Pro k = 1024 over N not a power of two.
    "pro_k1024": (34, (2, 20000), [20000, 1500], 1024),
    # k = N; k not a power of two (output padded inside).
    "k_is_n": (35, (3, 40), [40, 0, 17], 40),
    "k1": (36, (4, 17), [17, 1, 0, 9], 1),
}


@pytest.mark.parametrize("name", list(SELECT_CASES))
def test_select_interpret_matches_select_topk(name):
    seed, shape, nv, k = SELECT_CASES[name]
    scores = tie_free_scores(jax.random.PRNGKey(seed), shape)
    nv = jnp.asarray(nv, jnp.int32)
    ids = tk.topk_select(scores, nv, k, interpret=True, poison_outputs=True)
    check_topk(ids, scores, nv, k, what=name)


def test_select_order_keys_cover_every_sign_and_magnitude():
    """Scores of both signs spanning the float range (subnormals, +-0, +-max): the int32 keys order them."""
    mags = np.array([0.0, 1e-45, 1e-40, 1e-30, 1e-3, 0.5, 1.0, 3.0, 1e10, 1e30, 3.4e38], np.float32)
    vals = np.concatenate([mags, -mags[1:], [-0.0]]).astype(np.float32)
    rng = np.random.default_rng(37)
    rows = np.stack([rng.permutation(vals) for _ in range(5)])
    nv = jnp.full((5,), vals.size, jnp.int32)
    for k in (1, 5, 11, 17):
        ids = np.asarray(tk.topk_select(jnp.asarray(rows), nv, k, interpret=True, poison_outputs=True))
        for r in range(5):
            want = np.sort(rows[r])[::-1][:k]  # the k largest values (+0 and -0 differ only in sign)
            np.testing.assert_array_equal(np.sort(rows[r, ids[r]])[::-1], want, err_msg=f"k={k} row {r}")


def test_select_ties_at_the_kth_value_take_the_lowest_ids():
    """Many equal scores straddle the k-th place: the picks are ``lax.top_k``'s (lowest ids first)."""
    rng = np.random.default_rng(38)
    scores = rng.integers(0, 6, (4, 300)).astype(np.float32)  # each value ~50 times
    nv = jnp.asarray([300, 299, 150, 40], jnp.int32)
    for k in (7, 64, 100):
        ids = tk.topk_select(jnp.asarray(scores), nv, k, interpret=True, poison_outputs=True)
        check_topk(ids, jnp.asarray(scores), nv, k, what=f"ties k={k}")


def test_select_never_picks_non_finite():
    """NaN, +inf and -inf scores at visible positions are never picked (select_topk masks them first)."""
    scores = tie_free_scores(jax.random.PRNGKey(39), (3, 600))
    scores = scores.at[0, 5].set(jnp.nan).at[0, 7].set(jnp.inf).at[1, :590].set(-jnp.inf).at[2, 3].set(jnp.nan)
    nv = jnp.asarray([600, 600, 4], jnp.int32)
    ids = np.asarray(tk.topk_select(scores, nv, 20, interpret=True, poison_outputs=True))
    check_topk(ids, scores, nv, 20, what="non-finite")
    assert 5 not in ids[0] and 7 not in ids[0]
    assert np.sum(ids[1] >= 0) == 10 and np.sum(ids[2] >= 0) == 3 and 3 not in ids[2]


def test_tournament_for_rows_longer_than_the_kernel():
    """Rows over MAX_BLOCK entries take the chunked lax.top_k, with the same set and order contract."""
    N = tk.MAX_BLOCK + 3000
    scores = tie_free_scores(jax.random.PRNGKey(40), (2, N))
    nv = jnp.asarray([N, 5000], jnp.int32)
    check_topk(tk.topk_indices(scores, nv, 256), scores, nv, 256, what="tournament")
    small = tie_free_scores(jax.random.PRNGKey(41), (3, 1000))  # a multi-stage tournament with small chunks
    nv = jnp.asarray([1000, 10, 0], jnp.int32)
    check_topk(tk.tournament(small, nv, 64, chunk=128), small, nv, 64, what="small chunks")


def test_bad_arguments_raise():
    scores = jnp.zeros((2, 10))
    with pytest.raises(ValueError, match="k=11 must be in"):
        tk.topk_indices(scores, jnp.zeros((2,), jnp.int32), 11)
    with pytest.raises(ValueError, match="n_visible has shape"):
        tk.topk_indices(scores, jnp.zeros((3,), jnp.int32), 4)


def test_reference_is_select_topk():
    scores = tie_free_scores(jax.random.PRNGKey(42), (2, 3, 50))
    nv = jnp.asarray([[0, 5, 50], [20, 1, 49]], jnp.int32)
    np.testing.assert_array_equal(tk.reference(scores, nv, 8), select_topk(scores, nv, 8))
    np.testing.assert_array_equal(tk.reference(scores[:, 0], nv[:, 0], 8), select_topk(scores, nv, 8)[:, 0])


def test_scores_then_topk_end_to_end():
    """Indexer kernel scores -> top-k kernel pick the set reference scores -> select_topk pick (no near-ties)."""
    q, keys, w, nv = prefill_inputs(jax.random.PRNGKey(43), 1, 24, 8, 32, 64, causal(24, 64, [200]))
    out = ix.index_scores_prefill(q, keys, w, nv, tuning=ix.PrefillTuningConfig(block_q=16, block_k=32),
                                  interpret=True)
    ref = ix.reference_prefill(q, keys, w, nv)
    srt = -np.sort(-np.asarray(ref), axis=-1)
    assert np.all(np.abs(srt[..., 7] - srt[..., 8]) > 1e-4 * np.abs(srt[..., 0]) + 1e-6)  # no near-tie at k
    check_topk(tk.topk_indices(out, nv, 8, interpret=True), ref, nv, 8, what="end to end")


@pytest.mark.parametrize("R,N,k,kw", [
    (32, 32768, 512, {}),  # Flash decode, batch 32, 128K context
    (2048, 8192, 512, {}),  # a 2048-token prefill chunk at the end of a 32K prompt
    (2, tk.MAX_BLOCK, 1024, {}),  # the longest row the kernel takes (32 warps)
    (3, 1000, 40, dict(poison_outputs=True, num_warps=4)),
])
def test_select_lowers_for_h100(R, N, k, kw):
    fn = functools.partial(tk.topk_select, k=k, **kw)
    text = lower_for_h100(fn, jax.ShapeDtypeStruct((R, N), jnp.float32), jax.ShapeDtypeStruct((R,), jnp.int32))
    assert "triton" in text.lower()


@on_gpu
@pytest.mark.parametrize("shape,k", [((32, 32768), 512), ((32, 32768), 1024), ((8, 8192), 512),
                                     ((1, 2048, 8192), 512), ((4, 20000), 1024)])
def test_gpu_select_matches_select_topk(shape, k):
    scores = tie_free_scores(jax.random.PRNGKey(k + shape[-1]), shape)
    N = shape[-1]
    nv = jax.random.randint(jax.random.PRNGKey(1), shape[:-1], 0, N + 1, jnp.int32)
    nv = nv.reshape(-1).at[0].set(N).at[1].set(k // 2).reshape(shape[:-1])
    ids = tk.topk_select(scores, nv, k, poison_outputs=True)
    check_topk(ids, scores, nv, k, what=f"topk {shape} k{k}")


@on_gpu
def test_gpu_select_ties():
    scores = jnp.asarray(np.random.default_rng(44).integers(0, 6, (32, 32768)).astype(np.float32))
    nv = jnp.full((32,), 32768, jnp.int32).at[3].set(100)
    check_topk(tk.topk_select(scores, nv, 512, poison_outputs=True), scores, nv, 512, what="gpu ties")


@pytest.mark.parametrize("segments", [2, 3, 8])
def test_segmented_matches_select_topk(segments):
    """Two rounds over slices of each row pick the one-round set, ties included (slices not dividing N,
    slices shorter than k, rows ending inside a slice, empty rows)."""
    rng = np.random.default_rng(45)
    scores = jnp.asarray(rng.integers(0, 40, (5, 1000)).astype(np.float32))  # ties at every value
    nv = jnp.asarray([1000, 999, 130, 0, 1], jnp.int32)
    for k in (16, 200):
        ids = tk.topk_indices(scores, nv, k, tuning=tk.TuningConfig(segments=segments), interpret=True)
        check_topk(ids, scores, nv, k, what=f"segments={segments} k={k}")


def test_auto_segments_and_default_path():
    """Few long rows are sliced (at most 8 slices, rows x slices within the SMs, slices >= 2k); many rows or
    short ones are not. The default path (8 slices here) picks select_topk's set."""
    assert [tk.auto_segments(r, n, k) for r, n, k in ((32, 32768, 512), (1, 32768, 512), (8, 1024, 512),
                                                      (2048, 8192, 512), (64, 32768, 1024))] == [4, 8, 1, 1, 2]
    assert tk.choose_tuning(2, 32768, 512) == tk.TuningConfig(segments=8, num_warps=8)
    assert tk.choose_tuning(2048, 8192, 512) == tk.TuningConfig(segments=1, num_warps=None)
    with pytest.raises(ValueError, match="segments=0: expected a positive int"):
        tk.TuningConfig(segments=0)
    scores = tie_free_scores(jax.random.PRNGKey(46), (2, 32768))
    nv = jnp.asarray([32768, 3000], jnp.int32)
    check_topk(tk.topk_indices(scores, nv, 512, interpret=True), scores, nv, 512, what="auto segments")


@on_gpu
@pytest.mark.parametrize("segments", [2, 4, 8])
def test_gpu_segmented_matches_select_topk(segments):
    scores = tie_free_scores(jax.random.PRNGKey(segments), (32, 32768))
    nv = jax.random.randint(jax.random.PRNGKey(2), (32,), 0, 32769, jnp.int32).at[0].set(32768).at[1].set(300)
    ids = tk.topk_indices(scores, nv, 512, tuning=tk.TuningConfig(segments=segments))
    check_topk(ids, scores, nv, 512, what=f"segments={segments}")
