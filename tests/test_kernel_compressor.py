"""KV compressor kernels (kernels_pallas/compressor.py) against their plain-jnp references and the model.

CPU: the references against the model's ``compress_chunk`` (so the kernels compute what the model computes),
the Pallas kernels in interpret mode on fresh random inputs written into NaN-poisoned aliased outputs, the
model's kernel path (``dsv4_jax.ops.compressor.pallas_*``, used under ``ops.use("pallas")``) against
``compress_chunk`` on ragged engine-style chunks, and a CUDA cross-lowering check at the real Flash shapes. GPU (skipped elsewhere): the compiled kernels against the
references at real sizes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny

from dsv4_jax.model.compression import CompressorState, span_of
from dsv4_jax.model.metadata import build_metadata, padded_chunk_len
from dsv4_jax.ops.compressor import compress_chunk, pallas_chunk_entries, pallas_decode_step, write_entries
from kernels_pallas import compressor as cp
from kernels_pallas.testing import lower_for_h100
from scripts import kernel_cases
from scripts.kernel_cases import compressor_decode_inputs as decode_inputs
from scripts.kernel_cases import compressor_prefill_inputs as prefill_inputs

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (runs the compiled kernel)")
EPS = 1e-6


@functools.lru_cache(maxsize=None)
def _jit(fn, **kw):
    return jax.jit(functools.partial(fn, **kw))


def ref_prefill(*args, **kw):
    return _jit(cp.reference_prefill, **kw)(*args)


def ref_decode(*args, **kw):
    return _jit(cp.reference_decode_step, **kw)(*args)


def max_rel_err(out, ref):
    out = np.asarray(jnp.asarray(out, jnp.float32))
    ref = np.asarray(jnp.asarray(ref, jnp.float32))
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.isfinite(ref).all(), "reference produced non-finite values"
    assert np.isfinite(out).all(), f"{np.sum(~np.isfinite(out))} non-finite (unwritten?) output elements"
    err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)) if ref.size else 0.0
    print(f"max abs err / max|ref| {err:.3g}")
    return err


# max |err| / max |ref| of the kernels in CPU interpret mode: kernel and reference upcast bf16 projections
# identically and accumulate in fp32, so they agree at fp32 rounding whatever the input dtype: measured 0-2.98e-7
# over the prefill cases (csa_m8_steps, bf16) and 1.09e-7-1.99e-7 over the decode cases; 10x. The GPU twins keep
# the bounds measured on an H200.
CPU_TOL = 3e-6


def randn(rng, shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape, np.float32))


def model_params(rng, m, D, overlap):
    C = 2 * D if overlap else D
    return randn(rng, (m, C), 0.5), 1.0 + randn(rng, (D,), 0.1)


# ------------------------------------------------------------------------------------------------------------
# The references are the model's compressor
# ------------------------------------------------------------------------------------------------------------

# (name, layer kind) -> (ratio, head dim, overlap) on tiny(): CSA m=4 D=32 overlap, HCA m=8 D=32,
# the indexer's compressor m=4 D_I=16 overlap (rope on all 16 channels).
TINY = tiny()
MODEL_KINDS = {
    "csa": (TINY.csa_compress_rate, TINY.head_dim, True),
    "hca": (TINY.hca_compress_rate, TINY.head_dim, False),
    "indexer": (TINY.csa_compress_rate, TINY.index_head_dim, True),
}


@functools.partial(jax.jit, static_argnames=("m", "overlap", "capacity"))
def _model_chunk(kv, gate, state, start, n_new, ape, w, m, overlap, capacity):
    """The model's compress_chunk on a chunk with per-row start positions (padded like the engine does)."""
    B, C_len, _ = kv.shape
    C_pad = padded_chunk_len(TINY, C_len)
    pad = ((0, 0), (0, C_pad - C_len), (0, 0))
    meta = build_metadata(TINY, start, n_new, C_pad, capacity).compression[m]
    entries, new_state = compress_chunk(jnp.pad(kv, pad), jnp.pad(gate, pad), state, meta, ape, w, EPS, overlap,
                                        jnp.float32)
    return entries, new_state, meta


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
@pytest.mark.parametrize("S", [3, 29, 64])
def test_reference_prefill_matches_model(kind, S):
    m, D, overlap = MODEL_KINDS[kind]
    B, C = 2, (2 * D if overlap else D)
    rng = np.random.default_rng(100 * S + len(kind))
    kv, gate = randn(rng, (B, S, C)), randn(rng, (B, S, C), 2.0)
    ape, w = model_params(rng, m, D, overlap)
    span = span_of(TINY, m)
    state = CompressorState(kv=jnp.full((B, span, C), 7.0), gate=jnp.full((B, span, C), 3.0))  # not read
    start = jnp.zeros((B,), jnp.int32)
    entries, _, meta = _model_chunk(kv, gate, state, start, jnp.full((B,), S), ape, w, m=m, overlap=overlap,
                                    capacity=256)
    nW = S // m
    cos, sin = meta.entry_cos[:, :nW], meta.entry_sin[:, :nW]
    ref = ref_prefill(kv, gate, ape, w, cos, sin, ratio=m, overlap=overlap, eps=EPS)
    assert ref.shape == (B, nW, D)
    assert np.all(np.asarray(meta.entry_write_index[:, :nW]) == np.arange(nW))  # exactly these windows close
    assert np.all(np.asarray(meta.entry_write_index[:, nW:]) == 256 // m)
    if nW:
        assert max_rel_err(ref, entries[:, :nW]) <= 1e-5


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_reference_decode_matches_model(kind):
    """One decode step per row from a random ring: rows that close (incl. window 0) and rows that do not."""
    m, D, overlap = MODEL_KINDS[kind]
    span = span_of(TINY, m)
    C = 2 * D if overlap else D
    pos = np.array([m - 1, 2 * m - 1, 0, m, 5 * m - 1, 7 * m + 2, 3 * m - 1], np.int32)
    B = len(pos)
    rng = np.random.default_rng(7 + len(kind))
    kv_new, gate_new = randn(rng, (B, C)), randn(rng, (B, C), 2.0)
    state = CompressorState(kv=randn(rng, (B, span, C)), gate=randn(rng, (B, span, C), 2.0))
    ape, w = model_params(rng, m, D, overlap)
    entries, new_state, meta = _model_chunk(kv_new[:, None], gate_new[:, None], state, jnp.asarray(pos),
                                            jnp.ones((B,), jnp.int32), ape, w, m=m, overlap=overlap,
                                            capacity=1024)
    index = meta.entry_write_index[:, 0]
    closes_model = np.asarray(index) < 1024 // m
    cos, sin = meta.entry_cos[:, 0], meta.entry_sin[:, 0]
    cache = randn(rng, (B, 1024 // m, D))
    entry, new_kv, new_gate, new_cache = ref_decode(kv_new, gate_new, state.kv, state.gate,
                                                    meta.state_write_slot[:, 0], index, ape, w, cos, sin, cache,
                                                    ratio=m, overlap=overlap, eps=EPS)
    np.testing.assert_array_equal(closes_model, (pos + 1) % m == 0)
    np.testing.assert_array_equal(np.asarray(new_kv), np.asarray(new_state.kv))
    np.testing.assert_array_equal(np.asarray(new_gate), np.asarray(new_state.gate))
    assert max_rel_err(entry[closes_model], entries[closes_model, 0]) <= 1e-5
    assert np.all(np.asarray(entry)[~closes_model] == 0)
    np.testing.assert_array_equal(np.asarray(new_cache), np.asarray(write_entries(cache, entry[:, None], meta)))


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_reference_decode_steps_rebuild_prefill(kind):
    """Token-by-token decode from an empty ring emits exactly the prefill entries (prefill == decode)."""
    m, D, overlap = MODEL_KINDS[kind]
    R = TINY.qk_rope_head_dim
    span = span_of(TINY, m)
    C = 2 * D if overlap else D
    B, S = 2, 3 * m + 1
    rng = np.random.default_rng(11 + m)
    kv, gate = randn(rng, (B, S, C)), randn(rng, (B, S, C), 2.0)
    ape, w = model_params(rng, m, D, overlap)
    cos, sin = kernel_cases.rope_angles(rng, (B, S // m, R // 2))
    prefill = ref_prefill(kv, gate, ape, w, cos, sin, ratio=m, overlap=overlap, eps=EPS)
    skv = sg = jnp.zeros((B, span, C))
    cache = jnp.zeros((B, S // m, D))
    got = []
    step = _jit(cp.reference_decode_step, ratio=m, overlap=overlap, eps=EPS)
    for t in range(S):
        wi = min((t + 1) // m - 1, S // m - 1)
        slot, index = kernel_cases.compressor_decode_indices(jnp.full((B,), t), m, overlap, S // m)
        entry, skv, sg, cache = step(kv[:, t], gate[:, t], skv, sg, slot, index, ape, w, cos[:, max(wi, 0)],
                                     sin[:, max(wi, 0)], cache)
        if (t + 1) % m == 0:
            got.append(entry)
        else:
            assert np.all(np.asarray(entry) == 0)
    assert max_rel_err(jnp.stack(got, axis=1), prefill) <= 1e-5
    np.testing.assert_array_equal(np.asarray(cache), np.asarray(jnp.stack(got, axis=1)))


# ------------------------------------------------------------------------------------------------------------
# Kernels in interpret mode against the references
# ------------------------------------------------------------------------------------------------------------

P = cp.PrefillTuningConfig  # (Wb, Ts, num_warps, slot_rows)
# name -> (seed, B, S, m, D, R, overlap, dtype, tuning (None: choose_prefill_tuning))
PREFILL_CASES = {
    # CSA layout, S not a multiple of m (3 trailing tokens), odd window count 16 -> one partial block of 32
    "csa_d32_s67": (1, 2, 67, 4, 32, 16, True, jnp.float32, None),
    # CSA, bf16, blocks of 4 windows, last block partial (nW = 13), [Wb, Ts, D] tile layout instead of slot rows
    "csa_d64_bf16_wb4_tiles": (2, 3, 53, 4, 64, 16, True, jnp.bfloat16, P(4, 4, num_warps=4, slot_rows=False)),
    # HCA-like m=8, no overlap, odd S
    "hca_m8_d64": (3, 2, 45, 8, 64, 16, False, jnp.float32, None),
    # HCA m=16 with the multi-step online softmax (4 slot steps of 4) and 2 windows per block
    "hca_m16_steps": (4, 2, 70, 16, 32, 16, False, jnp.float32, P(2, 4, num_warps=4, slot_rows=True)),
    # the same through the tile layout, 2 steps of 8
    "hca_m16_steps_tiles": (11, 3, 50, 16, 32, 16, False, jnp.bfloat16, P(1, 8, num_warps=4, slot_rows=False)),
    # overlap with several slot steps (m=8 in steps of 2): a- and b-halves folded step by step
    "csa_m8_steps": (5, 2, 41, 8, 32, 16, True, jnp.bfloat16, P(1, 2, num_warps=4, slot_rows=True)),
    # rope on every channel (indexer-like D = R)
    "indexer_d16_full_rope": (6, 2, 30, 4, 16, 16, True, jnp.float32, None),
    # S < m: no entries at all
    "short_no_entries": (7, 2, 3, 4, 32, 16, True, jnp.float32, None),
    # real widths at small S: CSA D=512 (kv width 1024), HCA m=128 D=512 with its default 32-slot steps
    "csa_real_d512": (8, 1, 37, 4, 512, 64, True, jnp.bfloat16, None),
    "hca_real_m128_d512": (9, 2, 300, 128, 512, 64, False, jnp.float32, None),
    # the 16-slot steps HCA takes with more windows than half the SMs (choose_prefill_tuning)
    "hca_real_16_slot_steps": (12, 2, 300, 128, 512, 64, False, jnp.bfloat16, P(1, 16, num_warps=8, slot_rows=False)),
    # the indexer's compressor width D_I = 128
    "indexer_real_d128": (10, 2, 41, 4, 128, 64, True, jnp.float32, None),
}


@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_prefill_interpret_matches_reference(name):
    seed, B, S, m, D, R, overlap, dtype, tuning = PREFILL_CASES[name]
    args = prefill_inputs(jax.random.PRNGKey(seed), B, S, m, D, R, overlap, dtype=dtype)
    ref = ref_prefill(*args, ratio=m, overlap=overlap, eps=EPS)
    out = cp.compress_prefill(*args, ratio=m, overlap=overlap, eps=EPS, tuning=tuning, interpret=True,
                              poison_outputs=True)
    assert out.shape == (B, S // m, D) and out.dtype == jnp.float32
    assert max_rel_err(out, ref) <= CPU_TOL, name


# The tiling choices the model's kernels compiled with before the choice became a TuningConfig, frozen: any
# change to them changes the model's HLO. A grid of the model's (m, D) (Flash CSA 4/512, HCA 128/512, the
# indexer's 4/128; the tiny model's 4/32, 8/32, 4/16) and the test widths 8/64, 16/32, every batch of BATCHES
# and every token count S >= m of TOKENS. Rows: (m, D, batches, lo, hi, (Wb, Ts, warps, slot rows)) for the
# token counts lo <= S <= hi.
BATCHES = (1, 2, 3, 4, 8, 16, 32)
TOKENS = (4, 8, 12, 16, 32, 64, 128, 256, 1024, 2048, 2816, 4096, 8192, 8576, 16384, 32768)
PREFILL_TILINGS = [
    (4, 512, BATCHES, 4, 32768, (1, 4, 4, True)),  # CSA: unchanged by the window count
    # HCA: 32-slot steps at 16 warps while 2 * B * S/m <= 132 SMs (B = 1, S = 8K: 64 windows; B = 3, S = 2816:
    # exactly half the SMs), then 16-slot steps at 4 warps (B = 1, S = 8576: 67 windows; 16K, the engine's chunk)
    (128, 512, (1,), 128, 8192, (1, 32, 16, False)),
    (128, 512, (1,), 8576, 32768, (1, 16, 4, False)),
    (128, 512, (2,), 128, 4096, (1, 32, 16, False)),
    (128, 512, (2,), 8192, 32768, (1, 16, 4, False)),
    (128, 512, (3,), 128, 2816, (1, 32, 16, False)),
    (128, 512, (3,), 4096, 32768, (1, 16, 4, False)),
    (128, 512, (4,), 128, 2048, (1, 32, 16, False)),
    (128, 512, (4,), 2816, 32768, (1, 16, 4, False)),
    (128, 512, (8,), 128, 1024, (1, 32, 16, False)),
    (128, 512, (8,), 2048, 32768, (1, 16, 4, False)),
    (128, 512, (16, 32), 128, 256, (1, 32, 16, False)),
    (128, 512, (16, 32), 1024, 32768, (1, 16, 4, False)),
    # the indexer's compressor: up to 8 windows per program
    (4, 128, BATCHES, 4, 4, (1, 4, 4, True)),
    (4, 128, BATCHES, 8, 8, (2, 4, 4, True)),
    (4, 128, BATCHES, 12, 16, (4, 4, 4, True)),
    (4, 128, BATCHES, 32, 32768, (8, 4, 8, True)),
    (4, 32, BATCHES, 4, 4, (1, 4, 4, True)),
    (4, 32, BATCHES, 8, 8, (2, 4, 4, True)),
    (4, 32, BATCHES, 12, 16, (4, 4, 4, True)),
    (4, 32, BATCHES, 32, 32, (8, 4, 4, True)),
    (4, 32, BATCHES, 64, 64, (16, 4, 4, True)),
    (4, 32, BATCHES, 128, 32768, (32, 4, 8, True)),
    (8, 32, BATCHES, 8, 12, (1, 8, 4, True)),
    (8, 32, BATCHES, 16, 16, (2, 8, 4, True)),
    (8, 32, BATCHES, 32, 32, (4, 8, 4, True)),
    (8, 32, BATCHES, 64, 64, (8, 8, 4, True)),
    (8, 32, BATCHES, 128, 32768, (16, 8, 8, True)),
    (4, 16, BATCHES, 4, 4, (1, 4, 4, True)),
    (4, 16, BATCHES, 8, 8, (2, 4, 4, True)),
    (4, 16, BATCHES, 12, 16, (4, 4, 4, True)),
    (4, 16, BATCHES, 32, 32, (8, 4, 4, True)),
    (4, 16, BATCHES, 64, 64, (16, 4, 4, True)),
    (4, 16, BATCHES, 128, 128, (32, 4, 4, True)),
    (4, 16, BATCHES, 256, 32768, (64, 4, 8, True)),
    (8, 64, BATCHES, 8, 12, (1, 8, 4, True)),
    (8, 64, BATCHES, 16, 16, (2, 8, 4, True)),
    (8, 64, BATCHES, 32, 32, (4, 8, 4, True)),
    (8, 64, BATCHES, 64, 32768, (8, 8, 8, True)),
    (16, 32, BATCHES, 16, 16, (1, 16, 4, False)),
    (16, 32, BATCHES, 32, 32, (2, 16, 4, False)),
    (16, 32, BATCHES, 64, 64, (4, 16, 4, False)),
    (16, 32, BATCHES, 128, 32768, (8, 16, 8, False)),
]
# (m, D) -> (Ts, warps, slot rows) of the decode step, as PREFILL_TILINGS
DECODE_TILINGS = {
    (4, 16): (4, 4, True), (4, 32): (4, 4, True), (4, 64): (4, 4, True), (4, 128): (4, 4, True),
    (4, 512): (4, 4, True), (8, 16): (8, 4, True), (8, 32): (8, 4, True), (8, 64): (8, 4, True),
    (8, 128): (8, 4, True), (8, 512): (8, 4, True), (16, 16): (16, 4, False), (16, 32): (16, 4, False),
    (16, 64): (16, 4, False), (16, 128): (16, 4, False), (16, 512): (16, 8, False), (128, 16): (128, 4, False),
    (128, 32): (128, 8, False), (128, 64): (128, 16, False), (128, 128): (128, 16, False),
    (128, 512): (32, 16, False),
}


def test_prefill_tuning_choice_is_frozen():
    """choose_prefill_tuning gives the frozen tilings on the whole grid (which the rows cover exactly once)."""
    covered = []
    for m, D, batches, lo, hi, tiling in PREFILL_TILINGS:
        for B in batches:
            for S in (S for S in TOKENS if lo <= S <= hi):
                assert cp.choose_prefill_tuning(B, S // m, m, D) == P(*tiling), (m, D, B, S)
                covered.append((m, D, B, S))
    pairs = {(m, D) for m, D, *_ in PREFILL_TILINGS}
    grid = [(m, D, B, S) for m, D in pairs for B in BATCHES for S in TOKENS if S >= m]
    assert sorted(covered) == sorted(grid)


def test_decode_tuning_choice_is_frozen():
    for (m, D), tiling in DECODE_TILINGS.items():
        assert cp.choose_decode_tuning(m, D) == cp.DecodeTuningConfig(*tiling), (m, D)


def test_tuning_config_errors():
    with pytest.raises(ValueError, match="windows_per_block=3 must be a power of two"):
        P(3, 4, num_warps=4, slot_rows=True)
    with pytest.raises(ValueError, match="slot_rows=1: expected a bool"):
        cp.DecodeTuningConfig(4, 4, slot_rows=1)
    with pytest.raises(ValueError, match="num_warps=0: expected a positive int"):
        cp.DecodeTuningConfig(4, 0, slot_rows=True)
    args = prefill_inputs(jax.random.PRNGKey(0), 1, 16, 4, 16, 16, True)
    with pytest.raises(ValueError, match="slots_per_step=8 must divide m=4"):
        cp.compress_prefill(*args, ratio=4, overlap=True, eps=EPS, tuning=P(1, 8, num_warps=4, slot_rows=True),
                            interpret=True)


def test_prefill_interpret_bf16_output():
    args = prefill_inputs(jax.random.PRNGKey(12), 2, 24, 4, 32, 16, True, dtype=jnp.bfloat16)
    ref = ref_prefill(*args, ratio=4, overlap=True, eps=EPS)
    out = cp.compress_prefill(*args, ratio=4, overlap=True, eps=EPS, out_dtype=jnp.bfloat16, interpret=True,
                              poison_outputs=True)
    assert out.dtype == jnp.bfloat16
    assert max_rel_err(out, ref) <= 1e-2  # one bf16 rounding of the output: measured 2.98e-3


def _decode_positions(m, B, seed):
    """Positions mixing closing rows (incl. window 0: pos = m-1) and non-closing ones (incl. pos 0)."""
    rng = np.random.default_rng(seed)
    base = [m - 1, 0, 2 * m - 1, m, 3 * m - 2, 6 * m - 1]
    extra = list(rng.integers(0, 50 * m, max(0, B - len(base))))
    return jnp.asarray((base + extra)[:B], jnp.int32)


Dc = cp.DecodeTuningConfig  # (Ts, num_warps, slot_rows)
# name -> (seed, B, m, D, R, overlap, new-token dtype, tuning (None: choose_decode_tuning))
DECODE_CASES = {
    "csa_d32": (21, 7, 4, 32, 16, True, jnp.float32, None),
    "hca_m8_d64": (22, 6, 8, 64, 16, False, jnp.float32, None),
    "hca_m16_steps": (23, 8, 16, 32, 16, False, jnp.float32, Dc(4, 4, slot_rows=True)),
    "csa_m8_steps_bf16": (24, 6, 8, 32, 16, True, jnp.bfloat16, Dc(2, 4, slot_rows=True)),
    "csa_m8_steps_tiles": (28, 6, 8, 32, 16, True, jnp.float32, Dc(4, 4, slot_rows=False)),
    "indexer_d16_full_rope": (25, 6, 4, 16, 16, True, jnp.float32, None),
    "csa_real_d512": (26, 6, 4, 512, 64, True, jnp.float32, None),
    "hca_real_m128_d512": (27, 3, 128, 512, 64, False, jnp.float32, None),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_interpret_matches_reference(name):
    seed, B, m, D, R, overlap, dtype, tuning = DECODE_CASES[name]
    pos = np.asarray(_decode_positions(m, B, seed))
    args = list(decode_inputs(jax.random.PRNGKey(seed), B, m, D, R, overlap, dtype=dtype, positions=pos))
    # NaN in every ring slot the step must not read (slots of positions < 0, i.e. the missing w = 0 a-half,
    # and the whole ring of rows that do not close): the kernel has to mask them, not just weight them 0.
    span = cp._span(m, overlap)
    tok = pos[:, None] + 1 - span + np.arange(span)[None, :]
    closes = (pos + 1) % m == 0
    needed = np.zeros((B, span), bool)
    for b in range(B):
        if closes[b]:
            needed[b, tok[b][tok[b] >= 0] % span] = True
    needed[np.arange(B), pos % span] = False  # the new token's slot is overwritten by the step
    nan_mask = jnp.asarray(~needed)[:, :, None]
    args[2] = jnp.where(nan_mask, jnp.nan, args[2])
    args[3] = jnp.where(nan_mask, jnp.nan, args[3])
    ref = ref_decode(*args, ratio=m, overlap=overlap, eps=EPS)
    # the reference itself gathers the NaN slots of non-closing rows: compare closing rows there
    out = cp.compress_decode_step(*args, ratio=m, overlap=overlap, eps=EPS, tuning=tuning, interpret=True,
                                  poison_outputs=True)
    entry, new_kv, new_gate, new_cache = out
    np.testing.assert_array_equal(np.asarray(args[5]) < args[10].shape[1], closes)
    assert np.all(np.asarray(entry)[~closes] == 0)
    assert max_rel_err(entry[closes], ref[0][closes]) <= CPU_TOL, name
    np.testing.assert_array_equal(np.asarray(new_kv), np.asarray(ref[1]))
    np.testing.assert_array_equal(np.asarray(new_gate), np.asarray(ref[2]))
    # closing rows write their entry into cache row w, every other cache element is unchanged
    want = np.asarray(args[10]).copy()
    want[closes, np.asarray(args[5])[closes]] = np.asarray(entry)[closes]
    np.testing.assert_array_equal(np.asarray(new_cache), want)
    assert closes.any() and not closes.all()


@pytest.mark.parametrize("m,overlap", [(4, True), (8, False)])
def test_decode_interpret_writes_entries_into_cache(m, overlap):
    """entry_index: each closing row's entry lands in its cache row, a row closing no window (N: not closing,
    or a closing row of the batch sitting out) writes nothing and emits 0; every other cache element is
    unchanged, and the ring and entries are the reference's."""
    B, D, R, N = 5, 64, 16, 12
    args = list(decode_inputs(jax.random.PRNGKey(m), B, m, D, R, overlap, all_close=False))
    pos = np.where(np.arange(B) < 2, (np.arange(B) + 3) * m - 1, np.asarray(args[4]))  # rows 0, 1 close
    closes = (pos + 1) % m == 0
    index = np.where(closes & (pos < N * m), (pos + 1) // m - 1, N).astype(np.int32)  # the window it closes
    index[0] = N  # a closing row that does not write (a row of the batch sitting out)
    args[4], args[5] = jnp.asarray(pos % cp._span(m, overlap), jnp.int32), jnp.asarray(index)
    args[10] = cache = jax.random.normal(jax.random.PRNGKey(7), (B, N, D), jnp.float32)
    kw = dict(ratio=m, overlap=overlap, eps=EPS)
    entry, new_kv, new_gate, new_cache = cp.compress_decode_step(*args, **kw, interpret=True, poison_outputs=True)
    ref = ref_decode(*args, **kw)
    np.testing.assert_array_equal(np.asarray(new_kv), np.asarray(ref[1]))
    np.testing.assert_array_equal(np.asarray(new_gate), np.asarray(ref[2]))
    assert max_rel_err(entry, ref[0]) <= CPU_TOL
    want = np.asarray(cache).copy()
    for b in range(B):
        if index[b] < N:
            want[b, index[b]] = np.asarray(entry)[b]
    assert closes[:2].all() and (index < N).sum() == closes.sum() - 1
    assert np.all(np.asarray(entry)[index == N] == 0) and np.asarray(entry)[1].any()
    np.testing.assert_array_equal(np.asarray(new_cache), want)
    with pytest.raises(ValueError, match=r"cache_rows \(5, 12, 64\), write_slot \(5,\), entry_index \(1, 5\)"):
        cp.compress_decode_step(*args[:5], args[5][None], *args[6:], **kw, interpret=True)


def test_decode_interpret_all_rows_close_without_nan():
    """Every row closes; plain random ring (the bench layout)."""
    args = decode_inputs(jax.random.PRNGKey(31), 4, 4, 64, 16, True)
    ref = ref_decode(*args, ratio=4, overlap=True, eps=EPS)
    out = cp.compress_decode_step(*args, ratio=4, overlap=True, eps=EPS, interpret=True, poison_outputs=True)
    assert bool((args[5] < args[10].shape[1]).all()) and np.asarray(out[0]).any(axis=1).all()
    assert max_rel_err(out[0], ref[0]) <= CPU_TOL
    assert max_rel_err(out[3], ref[3]) <= CPU_TOL


# ------------------------------------------------------------------------------------------------------------
# The model's kernel path (dsv4_jax.ops.compressor.pallas_*) against compress_chunk
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["chunk", "decode"])
@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_model_kernel_path_matches_compress_chunk(kind, phase):
    """Ragged rows as the engine runs them, starting at every residue mod m (so a chunk's windows begin with
    tokens from the state ring, and the CSA a-half of window 0 does not exist). chunk: 12 tokens (padded to 16)
    with 0- and 1-token rows through ``pallas_chunk_entries``; decode: one token per row through
    ``pallas_decode_step``, rows that close a window and rows that do not, one closing row sitting out. The
    entries of every window that closes equal ``compress_chunk``'s (1e-5); decode writes them into the
    compressed cache itself (every other cache row unchanged) and its state ring equals ``compress_chunk``'s
    exactly (the row sitting out keeps its ring and its cache); interpret mode off the GPU."""
    m, D, overlap = MODEL_KINDS[kind]
    span = span_of(TINY, m)
    C = 2 * D if overlap else D
    rng = np.random.default_rng(50 + len(kind) + len(phase))
    ape, w = model_params(rng, m, D, overlap)
    starts = jnp.asarray([0, 1, 2, m - 1, m + 2, 2 * m - 1, 3 * m - 1], jnp.int32)
    if phase == "chunk":
        length, n_new = 12, jnp.asarray([12, 12, 7, 0, 1, 12, 9], jnp.int32)
    else:
        length, n_new = 1, jnp.asarray([1, 1, 1, 1, 1, 0, 1], jnp.int32)
    B = len(starts)
    kv, gate = randn(rng, (B, length, C)), randn(rng, (B, length, C), 2.0)
    state = CompressorState(kv=randn(rng, (B, span, C)), gate=randn(rng, (B, span, C), 2.0))
    ref, ref_state, meta = _model_chunk(kv, gate, state, starts, n_new, ape, w, m=m, overlap=overlap, capacity=256)
    pad = ((0, 0), (0, padded_chunk_len(TINY, length) - length), (0, 0))
    kv, gate = jnp.pad(kv, pad), jnp.pad(gate, pad)
    if phase == "chunk":
        got = pallas_chunk_entries(kv, gate, state, meta, ape, w, EPS, overlap, jnp.float32)
    else:
        cache = randn(rng, (B, 256 // m, D))
        got_cache, got_state = pallas_decode_step(kv, gate, state, cache, meta, ape, w, EPS, overlap)
        np.testing.assert_array_equal(np.asarray(got_state.kv), np.asarray(ref_state.kv))
        np.testing.assert_array_equal(np.asarray(got_state.gate), np.asarray(ref_state.gate))
        row = np.asarray(meta.entry_write_index)[:, 0]
        written = np.zeros(cache.shape[:2], bool)
        written[np.arange(B)[row < cache.shape[1]], row[row < cache.shape[1]]] = True
        np.testing.assert_array_equal(np.asarray(got_cache)[~written], np.asarray(cache)[~written])
        got = np.zeros((B, 1, D), np.float32)
        got[row < cache.shape[1], 0] = np.asarray(got_cache)[written]
    closes = np.asarray(meta.entry_write_index) < 256 // m
    assert closes.any() and not closes.all()
    assert max_rel_err(np.asarray(got)[closes], np.asarray(ref)[closes]) <= 1e-5


# ------------------------------------------------------------------------------------------------------------
# CUDA lowering at the real Flash shapes
# ------------------------------------------------------------------------------------------------------------


def _prefill_abstract(B, S, m, D, R, overlap, dtype=jnp.bfloat16):
    sds = jax.ShapeDtypeStruct
    C = 2 * D if overlap else D
    return (sds((B, S, C), dtype), sds((B, S, C), dtype), sds((m, C), jnp.float32), sds((D,), jnp.float32),
            sds((B, S // m, R // 2), jnp.float32), sds((B, S // m, R // 2), jnp.float32))


def _decode_abstract(B, m, D, R, overlap):
    sds = jax.ShapeDtypeStruct
    C = 2 * D if overlap else D
    span = cp._span(m, overlap)
    return (sds((B, C), jnp.float32), sds((B, C), jnp.float32), sds((B, span, C), jnp.float32),
            sds((B, span, C), jnp.float32), sds((B,), jnp.int32), sds((B,), jnp.int32), sds((m, C), jnp.float32),
            sds((D,), jnp.float32), sds((B, R // 2), jnp.float32), sds((B, R // 2), jnp.float32),
            sds((B, 32768 // m, D), jnp.bfloat16))


@pytest.mark.parametrize("B,S,m,D,overlap", [
    (1, 32768, 4, 512, True),     # Flash CSA compressor
    (1, 8192, 128, 512, False),   # Flash HCA compressor
    (4, 32768, 128, 512, False),  # HCA, batch 4
    (2, 8190, 4, 128, True),      # indexer compressor, S not a multiple of m
])
def test_prefill_lowers_for_h100(B, S, m, D, overlap):
    fn = functools.partial(cp.compress_prefill, ratio=m, overlap=overlap, eps=EPS)
    text = lower_for_h100(fn, *_prefill_abstract(B, S, m, D, 64, overlap))
    assert "triton" in text.lower()


@pytest.mark.parametrize("m,D,overlap", [(4, 512, True), (128, 512, False), (4, 128, True)])
def test_decode_lowers_for_h100(m, D, overlap):
    fn = functools.partial(cp.compress_decode_step, ratio=m, overlap=overlap, eps=EPS)
    text = lower_for_h100(fn, *_decode_abstract(32, m, D, 64, overlap))
    assert "triton" in text.lower()


# ------------------------------------------------------------------------------------------------------------
# GPU: compiled kernels at real sizes
# ------------------------------------------------------------------------------------------------------------


@on_gpu
@pytest.mark.parametrize("case", kernel_cases.bench_cases("compressor"), ids=lambda c: c["name"])
def test_gpu_bench_shapes_match_reference(case):
    inputs = case["args"](jax.random.PRNGKey(41))
    ref = jax.jit(functools.partial(case["reference"], **case["kwargs"]))(*inputs)
    out = jax.jit(functools.partial(case["pallas"], **case["kwargs"], poison_outputs=True))(*inputs)
    # bf16 projections are upcast identically by both, so agreement is at fp32 level (tolerance 1e-4, well
    # inside the 1e-2 a bf16 computation would need)
    assert max_rel_err(out, ref) <= 1e-4


@on_gpu
@pytest.mark.parametrize("B,S,m,D,overlap,dtype", [
    (3, 4099, 4, 512, True, jnp.float32),     # several rows, trailing tokens, fp32 projections
    (2, 1000, 128, 512, False, jnp.bfloat16),  # HCA with a partial trailing window
    (5, 777, 4, 128, True, jnp.bfloat16),     # indexer width
])
def test_gpu_prefill_ragged_match_reference(B, S, m, D, overlap, dtype):
    args = prefill_inputs(jax.random.PRNGKey(B * S), B, S, m, D, 64, overlap, dtype=dtype)
    ref = jax.jit(functools.partial(cp.reference_prefill, ratio=m, overlap=overlap, eps=EPS))(*args)
    out = cp.compress_prefill(*args, ratio=m, overlap=overlap, eps=EPS, poison_outputs=True)
    assert max_rel_err(out, ref) <= (1e-5 if dtype == jnp.float32 else 1e-4)


@on_gpu
@pytest.mark.parametrize("m,D,overlap", [(4, 512, True), (128, 512, False), (4, 128, True)])
def test_gpu_decode_mixed_rows_match_reference(m, D, overlap):
    B = 32
    args = decode_inputs(jax.random.PRNGKey(m + D), B, m, D, 64, overlap, positions=_decode_positions(m, B, m + D))
    ref = jax.jit(functools.partial(cp.reference_decode_step, ratio=m, overlap=overlap, eps=EPS))(*args)
    out = cp.compress_decode_step(*args, ratio=m, overlap=overlap, eps=EPS, poison_outputs=True)
    assert max_rel_err(out[0], ref[0]) <= 1e-5
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(ref[1]))
    assert max_rel_err(out[3], ref[3]) <= 1e-5
