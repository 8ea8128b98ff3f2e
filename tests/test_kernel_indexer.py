"""Lightning-indexer kernels (kernels_pallas/indexer.py) against their plain-jnp references.

CPU: the decode and prefill Pallas kernels in interpret mode on ragged inputs, written into NaN-poisoned
aliased outputs (every element is compared, the -inf masked ones included), and a CUDA cross-lowering
check of each kernel at the real Flash shapes (the top-k after them: tests/test_kernel_topk.py). GPU (skipped
elsewhere): the compiled kernels at real sizes. tests/conftest.py defaults JAX_PLATFORMS to cpu, so on a GPU
machine run ``JAX_PLATFORMS=cuda python -m pytest tests/test_kernel_indexer.py -k gpu``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import indexer as ix
from kernels_pallas.testing import lower_for_h100
from scripts import kernel_cases

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (runs the compiled kernel)")


# Finite scores within tol * max|ref| (bf16 in, fp32 accumulate in kernel and reference alike). CPU interpret
# mode: measured 0 on every case but decode flash_heads (1.84e-7); 10x that. GPU: measured on an H200.
CPU_TOL = 2e-6
GPU_TOL = 1e-2


def check_scores(out, ref, *, tol, what=""):
    """Masked entries exactly -inf in both; finite entries within tol * max|ref| (printed: ``pytest -s``)."""
    out = np.asarray(out)
    ref = np.asarray(ref)
    assert out.shape == ref.shape and out.dtype == np.float32, (out.shape, out.dtype, ref.shape)
    masked = np.isneginf(ref)
    assert np.isfinite(ref[~masked]).all(), f"{what}: reference has non-finite visible scores"
    bad = masked & ~np.isneginf(out)
    assert not bad.any(), f"{what}: {bad.sum()} masked entries are not -inf (e.g. {out[bad][:4]})"
    fin = ~masked
    assert np.isfinite(out[fin]).all(), f"{what}: {np.sum(~np.isfinite(out[fin]))} non-finite visible scores"
    if fin.any():
        err = np.abs(out[fin] - ref[fin]).max()
        scale = np.abs(ref[fin]).max()
        print(f"{what}: max abs err / max|ref| {err / scale:.3g} (tolerance {tol:.3g})")
        assert err <= tol * scale, f"{what}: max abs err {err:.3g} vs max|ref| {scale:.3g}"


def decode_inputs(key, B, HI, DI, N, n_valid, *, garbage=False):
    """Random bf16 decode inputs; garbage: NaN in every key row at or beyond n_valid[b] (must never be read)."""
    q, keys, w, _ = kernel_cases.indexer_decode_inputs(key, B, HI, DI, N)
    n = jnp.asarray(n_valid, jnp.int32)
    if garbage:
        rows = jnp.arange(N)[None, :, None] < n[:, None, None]
        keys = jnp.where(rows, keys, jnp.nan).astype(jnp.bfloat16)
    return q, keys, w, n


def prefill_inputs(key, B, S, HI, DI, N, n_visible, *, garbage=False):
    """Random bf16 prefill inputs; garbage: NaN in key rows no query of the sequence can see."""
    q, keys, w, _ = kernel_cases.indexer_prefill_inputs(key, B, S, HI, DI, N)
    nv = jnp.asarray(n_visible, jnp.int32)
    if garbage:
        rows = jnp.arange(N)[None, :, None] < jnp.max(nv, axis=1)[:, None, None]
        keys = jnp.where(rows, keys, jnp.nan).astype(jnp.bfloat16)
    return q, keys, w, nv


def causal(S, N, offsets, rate=4):
    """n_visible [B,S] for chunks starting at ``offsets[b]`` (tokens already in the cache), capped at N."""
    return np.stack([np.minimum((o + np.arange(S) + 1) // rate, N) for o in offsets]).astype(np.int32)


# ------------------------------------------------------------------------------------------------------------
# Decode (interpret mode)
# ------------------------------------------------------------------------------------------------------------

# name -> (seed, (B, HI, DI, N), n_valid, input options, kernel options)
DECODE_CASES = {
    # odd head count 5 (padded to 16 in the wrapper), N = 100 not a multiple of the 32-key chunk, empty row,
    # single-entry row, full row, a row ending inside a block.
    # measured error 0
    "ragged_h5": (1, (5, 5, 32, 100), [0, 1, 100, 37, 64], {}, dict(block_k=16, blocks_per_program=2)),
    # NaN in every key row at or beyond n_valid: masked rows must never be read.
    # measured error 0
    "h12_garbage": (2, (3, 12, 64, 70), [70, 5, 0], dict(garbage=True), dict(block_k=32, blocks_per_program=1)),
    # real Flash heads / dim, default blocking (128-key blocks; blocks_per_program clipped to 3).
    # measured error 1.84e-7
    "flash_heads": (3, (2, 64, 128, 300), [300, 129], dict(garbage=True), {}),
    # head dim 48 is padded to 64; 17 heads padded to 32; many chunks.
    # measured error 0
    "d48_h17": (4, (2, 17, 48, 250), [1, 249], {}, dict(block_k=16, blocks_per_program=3)),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_interpret_matches_reference(name):
    seed, dims, n_valid, opts, kw = DECODE_CASES[name]
    q, keys, w, n = decode_inputs(jax.random.PRNGKey(seed), *dims, n_valid, **opts)
    ref = ix.reference_decode(q, jnp.nan_to_num(keys), w, n)
    out = ix.index_scores_decode(q, keys, w, n, interpret=True, poison_outputs=True,
                                 tuning=ix.DecodeTuningConfig(**kw))
    check_scores(out, ref, tol=CPU_TOL, what=name)
    assert np.array_equal(np.isneginf(np.asarray(out)), np.arange(dims[3])[None] >= np.asarray(n)[:, None])


# ------------------------------------------------------------------------------------------------------------
# Prefill (interpret mode)
# ------------------------------------------------------------------------------------------------------------


def _random_nv(seed, B, S, N):
    rng = np.random.default_rng(seed)
    nv = rng.integers(0, N + 1, (B, S)).astype(np.int32)
    nv[0, :3] = [0, 1, N]
    return nv


# name -> (seed, (B, S, HI, DI, N), n_visible, input options, kernel options)
PREFILL_CASES = {
    # causal chunks at offsets 0 and 23 (first rows see nothing), 5 heads, S and N not multiples of 16.
    # measured error 0
    "causal_h5": (11, (2, 45, 5, 32, 20), causal(45, 20, [0, 23]), dict(garbage=True),
                  dict(block_q=16, block_k=16)),
    # arbitrary (non-monotone) visibility incl. 0, 1 and N: the block maximum decides the skipping.
    # measured error 0
    "random_visibility": (12, (2, 40, 7, 64, 50), _random_nv(12, 2, 40, 50), {}, dict(block_q=16, block_k=32)),
    # real Flash heads / dim, default tiles (64 x 128), causal with a long prefix (all entries visible late).
    # measured error 0
    "flash_heads": (13, (1, 70, 64, 128, 40), causal(70, 40, [100]), dict(garbage=True), {}),
    # a single entry, 3 heads, head dim 16; mostly invisible rows.
    # measured error 0
    "single_entry": (14, (2, 16, 3, 16, 1), causal(16, 1, [0, 5]), {}, dict(block_q=16, block_k=16)),
    # head dim 40 (padded to 64), key tiles 16 over N = 33.
    # measured error 0
    "d40": (15, (1, 33, 4, 40, 33), causal(33, 33, [100]) - np.arange(33)[None] // 2, {},
            dict(block_q=32, block_k=16)),
}


@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_prefill_interpret_matches_reference(name):
    seed, dims, nv, opts, kw = PREFILL_CASES[name]
    q, keys, w, nv = prefill_inputs(jax.random.PRNGKey(seed), *dims, nv, **opts)
    ref = ix.reference_prefill(q, jnp.nan_to_num(keys), w, nv)
    out = ix.index_scores_prefill(q, keys, w, nv, interpret=True, poison_outputs=True,
                                  tuning=ix.PrefillTuningConfig(**kw))
    check_scores(out, ref, tol=CPU_TOL, what=name)
    N = dims[4]
    assert np.array_equal(np.isneginf(np.asarray(out)), np.arange(N)[None, None] >= np.asarray(nv)[..., None])


def test_decode_equals_prefill_of_one_query():
    """The decode kernel is the prefill kernel at S = 1 (same math, different blocking)."""
    q, keys, w, n = decode_inputs(jax.random.PRNGKey(21), 3, 8, 32, 90, [90, 0, 45])
    dec = ix.index_scores_decode(q, keys, w, n, tuning=ix.DecodeTuningConfig(block_k=32, blocks_per_program=2),
                                 interpret=True)
    pre = ix.index_scores_prefill(q[:, None], keys, w[:, None], n[:, None],
                                  tuning=ix.PrefillTuningConfig(block_q=16, block_k=32), interpret=True)[:, 0]
    with pytest.raises(ValueError, match="block_q=24 must be a power of two >= 16"):
        ix.PrefillTuningConfig(block_q=24)
    check_scores(dec, pre, tol=CPU_TOL, what="decode vs prefill")


# ------------------------------------------------------------------------------------------------------------
# CUDA lowering at the real Flash shapes (interpret mode does not catch what the Triton lowering rejects)
# ------------------------------------------------------------------------------------------------------------

sds = jax.ShapeDtypeStruct
HI, DI = kernel_cases.FLASH_HI, kernel_cases.FLASH_DI


@pytest.mark.parametrize("B,N,kw", [
    (32, 32768, {}),  # Flash 128K context, batch 32 (default blocking)
    (1, 32768, dict(tuning=ix.DecodeTuningConfig(block_k=64, blocks_per_program=8))),
    (7, 1000, dict(tuning=ix.DecodeTuningConfig(block_k=256, blocks_per_program=1, num_warps=8))),  # N % block
    (4, 4096, dict(poison_outputs=True)),
])
def test_decode_lowers_for_h100(B, N, kw):
    fn = functools.partial(ix.index_scores_decode, **kw)
    text = lower_for_h100(fn, sds((B, HI, DI), jnp.bfloat16), sds((B, N, DI), jnp.bfloat16),
                          sds((B, HI), jnp.float32), sds((B,), jnp.int32))
    assert "triton" in text.lower()


@pytest.mark.parametrize("B,S,N,kw", [
    (1, 8192, 2048, {}),
    (1, 32768, 8192, {}),
    (2, 1000, 333, dict(tuning=ix.PrefillTuningConfig(block_q=128, block_k=64, num_warps=8))),
    (1, 4096, 1024, dict(tuning=ix.PrefillTuningConfig(block_q=32, block_k=256), poison_outputs=True)),
])
def test_prefill_lowers_for_h100(B, S, N, kw):
    fn = functools.partial(ix.index_scores_prefill, **kw)
    text = lower_for_h100(fn, sds((B, S, HI, DI), jnp.bfloat16), sds((B, N, DI), jnp.bfloat16),
                          sds((B, S, HI), jnp.float32), sds((B, S), jnp.int32))
    assert "triton" in text.lower()



# ------------------------------------------------------------------------------------------------------------
# GPU: compiled kernels at real sizes
# ------------------------------------------------------------------------------------------------------------


@on_gpu
@pytest.mark.parametrize("B,N,full", [(32, 32768, True), (32, 32768, False), (3, 5000, False)])
def test_gpu_decode_matches_reference(B, N, full):
    q, keys, w, n = kernel_cases.indexer_decode_inputs(jax.random.PRNGKey(B + N), B, HI, DI, N, full=full)
    if not full:
        n = n.at[0].set(0).at[1].set(1)
        keys = jnp.where(jnp.arange(N)[None, :, None] < n[:, None, None], keys, jnp.nan).astype(keys.dtype)
    ref = jax.jit(ix.reference_decode)(q, jnp.nan_to_num(keys), w, n)
    out = ix.index_scores_decode(q, keys, w, n, poison_outputs=True)
    check_scores(out, ref, tol=GPU_TOL, what=f"decode B{B} N{N}")


@on_gpu
@pytest.mark.parametrize("S", [8192, 32768])
def test_gpu_prefill_matches_reference(S):
    """Full causal prefill at Flash sizes; the reference runs on query slices (it materialises [S,HI,N])."""
    N = S // 4
    q, keys, w, nv = kernel_cases.indexer_prefill_inputs(jax.random.PRNGKey(S), 1, S, HI, DI, N)
    out = np.asarray(ix.index_scores_prefill(q, keys, w, nv, poison_outputs=True))
    ref_fn = jax.jit(ix.reference_prefill)
    for lo in (0, S // 2 - 100, S - 512):
        sl = slice(lo, lo + 512)
        ref = ref_fn(q[:, sl], keys, w[:, sl], nv[:, sl])
        check_scores(out[:, sl], ref, tol=GPU_TOL, what=f"prefill S{S} rows {lo}:{lo + 512}")
    assert np.array_equal(np.isneginf(out), np.arange(N)[None, None] >= np.asarray(nv)[..., None])



@on_gpu
@pytest.mark.parametrize("case", kernel_cases.bench_cases("indexer"), ids=lambda c: c["name"])
def test_gpu_bench_cases_run(case):
    """Every bench case's Pallas callable runs at its real size (the comparisons are the tests above)."""
    inputs = case["args"](jax.random.PRNGKey(5))
    out = jax.block_until_ready(jax.jit(functools.partial(case["pallas"], **case["kwargs"]))(*inputs))
    assert np.isfinite(np.asarray(out, np.float32)).any()
