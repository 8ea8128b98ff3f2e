"""Sparse sink attention decode kernel (kernels_pallas/sparse_attention.py) against its plain-jnp reference.

CPU: the Pallas kernel in interpret mode on ragged inputs, written into NaN-poisoned aliased outputs, plus a
CUDA cross-lowering check at the real Flash/Pro decode shapes. GPU (skipped elsewhere): the compiled kernel
against the reference at real sizes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.attention import gather_entries, sink_attention
from kernels_pallas import sparse_attention as sa
from kernels_pallas.testing import lower_for_h100

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (runs the compiled kernel)")


def make_inputs(key, B, H, D, Wk, K, N, *, win_counts=None, ent_counts=None, holes=0.0, garbage=False,
                hca=False):
    """Random bf16 decode inputs with per-row validity.

    win_counts[b]: number of valid window rows of row b (scattered at random positions, like a ring buffer).
    ent_counts[b]: number of valid entry_idx of row b (distinct entries, at random slots of the K list, the
      rest -1); ``holes`` additionally knocks out that fraction of them. hca: entry_idx = arange(K) masked to
      -1 from ent_counts[b] on (the HCA layout, K == N). garbage: NaN in every window row and entry row that
      no valid index reaches, so a kernel that reads (or multiplies by) unused rows fails.
    """
    ks = jax.random.split(key, 8)
    q = jax.random.normal(ks[0], (B, H, D), jnp.float32).astype(jnp.bfloat16)
    window_kv = jax.random.normal(ks[1], (B, Wk, D), jnp.float32).astype(jnp.bfloat16)
    entries = jax.random.normal(ks[2], (B, N, D), jnp.float32).astype(jnp.bfloat16)
    sinks = jax.random.normal(ks[3], (H,), jnp.float32)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(ks[4])).ravel()[-1])
    win_counts = [Wk] * B if win_counts is None else win_counts
    ent_counts = [K] * B if ent_counts is None else ent_counts
    valid = np.zeros((B, Wk), bool)
    idx = np.full((B, K), -1, np.int32)
    for b in range(B):
        valid[b, rng.permutation(Wk)[: win_counts[b]]] = True
        n = ent_counts[b]
        if hca:
            idx[b, :n] = np.arange(n)
        else:
            idx[b, rng.permutation(K)[:n]] = rng.permutation(N)[:n]
        if holes:
            idx[b, rng.random(K) < holes] = -1
    if garbage:
        used = np.zeros((B, N), bool)
        for b in range(B):
            used[b, idx[b][idx[b] >= 0]] = True
        window_kv = jnp.where(jnp.asarray(valid)[:, :, None], window_kv, jnp.nan).astype(jnp.bfloat16)
        entries = jnp.where(jnp.asarray(used)[:, :, None], entries, jnp.nan).astype(jnp.bfloat16)
    return q, window_kv, jnp.asarray(valid), entries, jnp.asarray(idx), sinks


def check_close(out, ref, *, what=""):
    out = np.asarray(out.astype(jnp.float32))
    ref = np.asarray(ref.astype(jnp.float32))
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.isfinite(ref).all(), "reference produced non-finite values"
    assert np.isfinite(out).all(), f"{what}: {np.sum(~np.isfinite(out))} non-finite output elements"
    err = np.abs(out - ref)
    scale = np.abs(ref).max()
    assert err.max() <= 2e-2 * scale, f"{what}: max abs err {err.max():.3g} vs max|ref| {scale:.3g}"
    rel = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)
    assert rel <= 1e-2, f"{what}: relative Frobenius error {rel:.3g}"


# name -> (seed, dims (B, H, D, Wk, K, N), input options, kernel options)
CASES = {
    # rows: single valid key (window), no valid key at all, window not full + few entries, entries only,
    # full window + some entries; odd head count 5 (padded to 16 inside the wrapper); automatic split-K.
    "ragged_h5": (1, (5, 5, 64, 20, 40, 50),
                  dict(win_counts=[1, 0, 7, 0, 20], ent_counts=[0, 0, 3, 40, 17], holes=0.2), dict(block_k=16)),
    # same kind of rows, 12 heads, one split (final output written by the kernel itself), NaN in unused rows.
    "ragged_h12_one_split": (2, (4, 12, 64, 33, 24, 40),
                             dict(win_counts=[33, 0, 5, 1], ent_counts=[24, 1, 0, 10], garbage=True),
                             dict(block_k=16, num_splits=1)),
    # explicit 3 splits over 5-7 blocks, several splits end up empty for the short rows; NaN garbage.
    "three_splits_garbage": (3, (3, 16, 64, 32, 64, 80),
                             dict(win_counts=[2, 32, 17], ent_counts=[64, 0, 21], holes=0.1, garbage=True),
                             dict(block_k=16, num_splits=3)),
    # HCA layout: entry_idx = arange(N) masked to -1 beyond the visible count (K == N).
    "hca_prefix": (4, (3, 8, 64, 16, 96, 96), dict(win_counts=[16, 9, 0], ent_counts=[96, 37, 1], hca=True),
                   dict(block_k=32)),
    # real head dim 512 with the window of 129 (not a multiple of the key block), 2 head blocks of 16.
    "d512_w129": (5, (2, 32, 512, 129, 64, 200), dict(win_counts=[129, 60], ent_counts=[50, 64], holes=0.1),
                  dict(block_h=16, block_k=32)),
    # real Flash head count and dim at tiny batch / top-k: block_h 32 (the large-batch default), default block_k.
    "flash_heads_d512": (6, (2, 64, 512, 128, 64, 256), dict(win_counts=[128, 3], ent_counts=[64, 30]),
                         dict(block_h=32)),
    # all defaults (block_h 16 at this batch, block_k 64, automatic splits).
    "defaults_d512": (9, (2, 16, 512, 128, 128, 200), dict(win_counts=[100, 128], ent_counts=[128, 77], holes=0.05),
                      {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_interpret_matches_reference(name):
    seed, dims, opts, kw = CASES[name]
    q, wkv, wval, ent, idx, sinks = make_inputs(jax.random.PRNGKey(seed), *dims, **opts)
    scale = dims[2] ** -0.5
    ref = sa.reference(q, wkv, wval, ent, idx, sinks, scale)
    out = sa.sparse_attention_decode(q, wkv, wval, ent, idx, sinks, scale, interpret=True, poison_outputs=True,
                                     **kw)
    check_close(out, ref, what=name)
    # rows without any valid key return exactly zero (sink only)
    empty = ~(np.asarray(wval).any(1) | (np.asarray(idx) >= 0).any(1))
    assert np.all(np.asarray(out)[empty] == 0)


def test_interpret_split_counts_agree():
    """The same inputs through 1, 2, 5 splits and the automatic choice give the same answer."""
    dims = (3, 16, 64, 40, 48, 60)
    q, wkv, wval, ent, idx, sinks = make_inputs(jax.random.PRNGKey(7), *dims, win_counts=[40, 13, 0],
                                                ent_counts=[48, 5, 20], holes=0.25)
    ref = sa.reference(q, wkv, wval, ent, idx, sinks, 0.125)
    for s in (1, 2, 5, None):
        out = sa.sparse_attention_decode(q, wkv, wval, ent, idx, sinks, 0.125, block_k=16, num_splits=s,
                                         interpret=True, poison_outputs=True)
        check_close(out, ref, what=f"num_splits={s}")


def test_reference_matches_model_sink_attention():
    """``reference`` is the model's ``sink_attention`` for one query (window + per-query gathered entries)."""
    B, H, D, Wk, K, N = 3, 6, 32, 12, 10, 30
    q, wkv, wval, ent, idx, sinks = make_inputs(jax.random.PRNGKey(8), B, H, D, Wk, K, N,
                                                win_counts=[12, 4, 0], ent_counts=[10, 3, 0])
    comp, comp_valid = gather_entries(ent, idx[:, None, :])
    model = sink_attention(q[:, None], wkv[:, None], wval[:, None], comp, comp_valid, sinks, 0.2)[:, 0]
    ref = sa.reference(q, wkv, wval, ent, idx, sinks, 0.2)
    np.testing.assert_allclose(np.asarray(ref, np.float32), np.asarray(model, np.float32), atol=1e-2, rtol=1e-2)


def _abstract(B, H, D, Wk, K, N):
    sds = jax.ShapeDtypeStruct
    return (sds((B, H, D), jnp.bfloat16), sds((B, Wk, D), jnp.bfloat16), sds((B, Wk), jnp.bool_),
            sds((B, N, D), jnp.bfloat16), sds((B, K), jnp.int32), sds((H,), jnp.float32))


@pytest.mark.parametrize("B,H,K,Wk,splits", [
    (32, 64, 512, 128, None),   # Flash CSA decode (auto: block_h 16, one split)
    (128, 64, 1024, 128, None),  # Flash, large batch (block_h 32, one split, kernel writes the output)
    (1, 64, 1024, 129, None),   # batch 1: split-K over 18 key blocks, window + 1
    (8, 128, 512, 128, None),   # Pro head count (5 splits)
    (4, 64, 8192, 128, 4),      # HCA: arange(N) index list over all 8192 entries
])
def test_lowers_for_h100(B, H, K, Wk, splits):
    D, N = 512, 8192
    fn = functools.partial(sa.sparse_attention_decode, scale=D ** -0.5, num_splits=splits)
    text = lower_for_h100(fn, *_abstract(B, H, D, Wk, K, N))
    assert "triton" in text.lower()


# ------------------------------------------------------------------------------------------------------------
# GPU: compiled kernel at real sizes
# ------------------------------------------------------------------------------------------------------------


@on_gpu
@pytest.mark.parametrize("case", sa.bench_cases(), ids=lambda c: c["name"])
def test_gpu_bench_shapes_match_reference(case):
    inputs = case["args"](jax.random.PRNGKey(11))
    ref = jax.jit(functools.partial(case["reference"], **case["kwargs"]))(*inputs)
    out = jax.jit(functools.partial(case["pallas"], **case["kwargs"], poison_outputs=True))(*inputs)
    check_close(out, ref, what=case["name"])


@on_gpu
@pytest.mark.parametrize("B,H,K,splits", [(1, 64, 1024, None), (7, 128, 512, None), (32, 64, 512, 1),
                                          (32, 64, 512, 4), (3, 12, 512, None)])
def test_gpu_ragged_match_reference(B, H, K, splits):
    D, Wk, N = 512, 129, 4096
    rng = np.random.default_rng(B * 1000 + H + K)
    win_counts = list(rng.integers(0, Wk + 1, B))
    ent_counts = list(rng.integers(0, K + 1, B))
    win_counts[0], ent_counts[0] = 0, 0  # a row with no valid key
    if B > 1:
        win_counts[1], ent_counts[1] = 1, 0  # a row with a single key
    q, wkv, wval, ent, idx, sinks = make_inputs(jax.random.PRNGKey(B + K), B, H, D, Wk, K, N,
                                                win_counts=win_counts, ent_counts=ent_counts, holes=0.1,
                                                garbage=True)
    ref = jax.jit(sa.reference, static_argnums=6)(q, wkv, wval, ent, idx, sinks, D ** -0.5)
    out = sa.sparse_attention_decode(q, wkv, wval, ent, idx, sinks, D ** -0.5, num_splits=splits,
                                     poison_outputs=True)
    check_close(out, ref, what=f"B{B} H{H} K{K} splits={splits}")
    assert np.all(np.asarray(out[0]) == 0)


@on_gpu
def test_gpu_hca_prefix_matches_reference():
    B, H, D, Wk, N = 4, 64, 512, 128, 8192
    q, wkv, wval, ent, idx, sinks = make_inputs(jax.random.PRNGKey(12), B, H, D, Wk, N, N,
                                                ent_counts=[8192, 1000, 3, 0], hca=True)
    ref = jax.jit(sa.reference, static_argnums=6)(q, wkv, wval, ent, idx, sinks, D ** -0.5)
    out = sa.sparse_attention_decode(q, wkv, wval, ent, idx, sinks, D ** -0.5, poison_outputs=True)
    check_close(out, ref, what="hca")
