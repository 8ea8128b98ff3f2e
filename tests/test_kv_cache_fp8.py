"""The FP8 K=V cache (``kv_cache_dtype="fp8"``, dsv4_jax/model/kv_rows.py): the quantiser against an independent
numpy reference, bit for bit; logits against the model-dtype cache within e4m3's bound; the engine's greedy tokens
on a ragged batch and its caches against a fresh prefill; the metadata rule is in tests/test_engine.py, the kernel
on FP8 keys in tests/test_kernel_sparse_attention.py, the planner's bytes in tests/test_plan.py.

The logit bound. The cache rounds each no-RoPE value once onto e4m3 (3 mantissa bits, round to nearest): a
relative error of at most U = 2^-4 (2^-10 x its block's scale in e4m3's subnormal range); the RoPE channels stay
at bf16. Bound: no position's logits move, as a vector, by more than that relative error of one stored value,
||logits_fp8 - logits|| <= U ||logits||, where no discrete choice can flip (hash routing, every compressed entry
picked): the model is then a smooth function of the rows. Where the learned router's or the indexer's top-k can
flip, a position can move further (the demo model's own bf16 rounding moves single positions by 11%), so there
the bound is on all positions' logits together.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny
from dsv4_jax.model import kv_rows
from dsv4_jax.model.cache import Fp8LayerCache, LayerCache, init_cache
from dsv4_jax.model.config import CSA, HASH_MOE, HCA, SLIDING
from dsv4_jax.model.spec import field_axes
from dsv4_jax.model.transformer import DeepseekV4ForCausalLM, InputError
from dsv4_jax.runtime.engine import Engine
from dsv4_jax.runtime.sampling import SamplingParams, sampling_args

U = 2.0 ** -4  # e4m3's largest relative rounding error in its normal range


# ----- an independent numpy quantiser ---------------------------------------------------------------------
def e4m3_magnitudes() -> np.ndarray:
    """The finite non-negative e4m3 values by code 0..126 (0x7F is NaN): exponent field e, mantissa m; subnormal
    (e = 0) m/8 * 2^-6, else (1 + m/8) * 2^(e - 7)."""
    e, m = np.arange(127) >> 3, np.arange(127) & 7
    return np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))


def nearest_e4m3(y: np.ndarray) -> np.ndarray:
    """|y| <= 448 (float64) -> e4m3 codes (sign bit 7): the nearest value, a tie to the even code."""
    grid = e4m3_magnitudes()
    a = np.abs(y)
    hi = np.clip(np.searchsorted(grid, a), 1, 126)
    lo = hi - 1
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    code = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return (code | (np.signbit(y) << 7)).astype(np.uint8)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even (on the float32 bits)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def reference_quantise(rows: np.ndarray, rope_dim: int):
    """float32 rows [..., D] -> (nope codes uint8, rope bf16 bits uint16, scale bytes uint8, dequantised float64):
    per 64 no-RoPE channels the smallest k in [-126, 127] with max |x| <= 448 * 2^k (0 for a zero block)."""
    x = rows.astype(np.float64)
    nope, rope = x[..., :-rope_dim], x[..., -rope_dim:]
    dn = nope.shape[-1]
    nb = -(-dn // 64)
    blocks = np.pad(nope, [(0, 0)] * (nope.ndim - 1) + [(0, nb * 64 - dn)]).reshape(*nope.shape[:-1], nb, 64)
    amax = np.abs(blocks).max(-1)
    k = np.ceil(np.log2(np.where(amax > 0, amax, 448.0) / 448.0))
    k = np.where(448.0 * 2.0 ** k < amax, k + 1, k)  # exact comparisons fix log2's guess
    k = np.where(448.0 * 2.0 ** (k - 1) >= amax, k - 1, k)
    k = np.maximum(np.where(amax > 0, k, 0), -126)
    codes = nearest_e4m3(blocks / 2.0 ** k[..., None])
    values = e4m3_magnitudes()[codes & 0x7F] * np.where(codes >> 7, -1.0, 1.0) * 2.0 ** k[..., None]
    flat = (*nope.shape[:-1], nb * 64)
    return (codes.reshape(flat)[..., :dn], bf16_bits(rope), (k + 127).astype(np.uint8),
            values.reshape(flat)[..., :dn])


def hard_rows(D: int, R: int) -> np.ndarray:
    """float32 rows [6, 2, D]: normal values at block scales 2^-30 .. 2^30, a zero block, e4m3 ties (midpoints of
    neighbouring values, normal and subnormal), a block whose largest value is exactly 448 x 2^3 and one just
    above it, values deep in e4m3's subnormal range of their block, negative zero."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 2, D)) * 2.0 ** rng.integers(-30, 31, (6, 2, 1))
    dn = D - R
    g = e4m3_magnitudes()
    ties = (g[:-1] + g[1:]) / 2
    x[0, 0, :dn] = 0.0
    x[0, 1, :dn] = np.resize(np.concatenate([ties, -ties]), dn)
    x[0, 1, 0] = 448.0  # the block's scale is 1, so the midpoints stay midpoints
    x[1, 0, :dn] = np.resize([448.0 * 8, -3.0, 1e-3, -0.0], dn)
    x[1, 1, :dn] = np.resize([np.nextafter(np.float32(448.0 * 8), np.float32(np.inf)), 2.0 ** -9, 5e-6], dn)
    return x.astype(np.float32)


@pytest.mark.parametrize("D,R", [(512, 64), (32, 16), (64, 16)], ids=["flash_448", "partial_16", "partial_48"])
def test_quantise_equals_the_numpy_reference_bit_for_bit(D, R):
    rows = hard_rows(D, R)
    nope, rope, scale = kv_rows.quantise(jnp.asarray(rows), R)
    want_codes, want_rope, want_scale, want_values = reference_quantise(rows, R)
    np.testing.assert_array_equal(np.asarray(nope).view(np.uint8), want_codes)
    np.testing.assert_array_equal(np.asarray(rope).view(np.uint16), want_rope)
    np.testing.assert_array_equal(np.asarray(scale), want_scale)
    for dtype in (jnp.float32, jnp.bfloat16):  # exact in both: a 3-bit mantissa times a power of two
        back = np.asarray(kv_rows.dequantise(nope, rope, scale, dtype), np.float64)
        np.testing.assert_array_equal(back[..., :D - R], want_values)
        np.testing.assert_array_equal(back[..., D - R:], np.asarray(rope, np.float64))
    # the rounding bound of the module docstring, element by element
    err = np.abs(want_values - rows[..., :D - R])
    s = np.repeat(2.0 ** (want_scale.astype(np.float64) - 127), 64, axis=-1)[..., :D - R]
    normal = np.abs(rows[..., :D - R]) >= 2.0 ** -6 * s
    assert (err[normal] <= U * np.abs(rows[..., :D - R])[normal]).all()
    assert (err[~normal] <= 2.0 ** -10 * s[~normal]).all()


def test_empty_fp8_rows_read_as_zero_and_declare_their_axes():
    cache = init_cache(tiny(), 2, 16, jnp.float32, "fp8")
    assert [type(c) for c in cache] == [Fp8LayerCache] * 5
    assert isinstance(cache[2].compressed_kv, kv_rows.Fp8Entries) and isinstance(cache[0].window_kv, kv_rows.Fp8Window)
    assert cache[2].window_kv.shape == (2, 8, 32) and cache[2].compressed_kv.shape == (2, 4, 32)
    assert not np.asarray(kv_rows.read_rows(cache[2].compressed_kv, jnp.float32)).any()
    assert cache[2].index_keys.dtype == jnp.float32  # the indexer's keys stay in the model dtype
    assert type(init_cache(tiny(), 2, 16, jnp.float32)[0]) is LayerCache
    for kind, seq in ((kv_rows.Fp8Window, "window"), (kv_rows.Fp8Entries, "cache_seq")):
        assert field_axes(kind) == {f: ("batch", seq, "kv") for f in ("nope", "rope", "scale")}


# ----- logits -----------------------------------------------------------------------------------------------
def step_logits(engine: Engine, ids: np.ndarray, prefill: int) -> np.ndarray:
    """ids [B, S]: a ``prefill``-token chunk, then one-token decode steps to the end; logits at every position
    [B, S, V], through the engine's jitted chunk step and its cache."""
    B, S = ids.shape
    cache = engine._new_cache(B)
    out = []
    for pos, n in [(0, prefill)] + [(p, 1) for p in range(prefill, S)]:
        logits, cache = engine.steps.chunk(engine.weights, cache, jnp.asarray(ids[:, pos:pos + n]),
                                           jnp.full((B,), pos, jnp.int32), jnp.full((B,), n, jnp.int32),
                                           last_only=False)
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)


def relative_error(got: np.ndarray, want: np.ndarray, axis=None) -> np.ndarray:
    return np.linalg.norm(got - want, axis=axis) / np.linalg.norm(want, axis=axis)


def test_logits_move_no_more_than_one_e4m3_rounding():
    """Every attention type, hash routing and top-k above the entry count (no discrete choice to flip): a
    40-token prefill (5 window blocks, CSA and HCA entries) then 7 decode steps crossing a CSA and an HCA window
    boundary, each position's logits within U of the model-dtype cache's (fp32 model)."""
    cfg = tiny(layer_types=(SLIDING, CSA, HCA, CSA, HCA), mlp_layer_types=(HASH_MOE,) * 5, index_topk=16)
    model = DeepseekV4ForCausalLM(cfg, rngs=nnx.Rngs(8))
    ids = np.random.RandomState(8).randint(0, cfg.vocab_size, (2, 47))
    want = step_logits(Engine(model, capacity=48), ids, 40)
    got = step_logits(Engine(model, capacity=48, kv_cache_dtype="fp8"), ids, 40)
    per_position = relative_error(got, want, axis=-1)
    print(f"per-position relative error: median {np.median(per_position):.4f}, max {per_position.max():.4f}")
    assert per_position.max() <= U  # measured 0.038 (median 0.019)


def test_demo_model_logits_within_one_e4m3_rounding():
    """The trained demo model (or its random weights without the shipped checkpoint), fp32, on English text:
    all logits of a 104-byte prefill (window 32, CSA entries above top-k, HCA entries) together within U of the
    model-dtype cache's."""
    from dsv4_jax.runtime.demo import demo_model

    model, tok = demo_model()
    text = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
            "want of a wife. However little known the feelings or views of such a man may be on his first entering")
    ids = np.array([tok.encode(text)[:104], tok.encode(text)[60:164]])
    want = step_logits(Engine(model, capacity=104), ids, 104)
    got = step_logits(Engine(model, capacity=104, kv_cache_dtype="fp8"), ids, 104)
    err = relative_error(got, want)
    print(f"relative error {err:.4f}; per position median {np.median(relative_error(got, want, -1)):.4f}")
    assert err <= U  # measured 0.0051 (trained weights; per position median 0.0018)


# ----- the engine ---------------------------------------------------------------------------------------------
def assert_rows_match(want, got):
    """Two stores of K=V rows (arrays, or FP8 records) hold the same rows. FP8 records byte for byte, except that
    two paths whose fp32 values differ in the last bits may round a value on an e4m3 or bf16 rounding boundary
    to neighbouring codes: at most 1 byte in 1,000 differs, and no dequantised value by more than one step of its
    format (e4m3: 2^-3 of its magnitude, or 2^-9 of its block's scale below e4m3's normal range; bf16: 2^-7 of its
    magnitude) plus the fp32 noise the arrays are allowed: within 1e-5 relative, 1e-6 absolute."""
    a, b = np.asarray(kv_rows.read_rows(want, jnp.float32)), np.asarray(kv_rows.read_rows(got, jnp.float32))
    if not isinstance(want, kv_rows.Fp8Rows):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        return
    differ = sum(int((np.asarray(x).view(np.uint8) != np.asarray(y).view(np.uint8)).sum())
                 for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)))
    size = sum(np.asarray(x).nbytes for x in jax.tree.leaves(want))
    assert differ * 1000 <= size, f"{differ} of {size} bytes differ"
    scale = np.repeat(np.asarray(kv_rows.scales(want.scale)), kv_rows.FP8_BLOCK, -1)[..., : want.nope.shape[-1]]
    step = np.concatenate([np.maximum(2.0 ** -3 * np.abs(a[..., : scale.shape[-1]]), 2.0 ** -9 * scale),
                           2.0 ** -7 * np.abs(a[..., scale.shape[-1]:])], axis=-1)
    assert (np.abs(b - a) <= step + 1e-6).all()


def test_ragged_greedy_tokens_and_caches_equal_a_fresh_prefill():
    """Prompts of 37 / 5 / 20 tokens, greedy: the batch gives each prompt the tokens it gets alone. After a
    prefill and 10 decode steps, the caches (ring, compressed entries, indexer keys) equal those a fresh
    prefill of the same tokens writes (at the batch generate pads to, so the steps compile once)."""
    cfg = tiny()
    engine = Engine(DeepseekV4ForCausalLM(cfg, rngs=nnx.Rngs(7)), capacity=64, prefill_chunk=16,
                    kv_cache_dtype="fp8")
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(2, cfg.vocab_size, n)) for n in (37, 5, 20)]
    batch = engine.generate(prompts, max_new_tokens=10)
    for prompt, res in zip(prompts, batch):
        assert res.tokens == engine.generate([prompt], max_new_tokens=10)[0].tokens

    padded = prompts + [prompts[0][:1]]
    logits, cache, lens = engine.prefill(padded)
    greedy = SamplingParams()
    tokens, pos = jnp.asarray(np.asarray(logits).argmax(-1), jnp.int32), jnp.asarray(lens)
    key, sequences = jax.random.PRNGKey(0), [list(p) for p in padded]
    for _ in range(10):
        for b, t in enumerate(np.asarray(tokens)):
            sequences[b].append(int(t))
        tokens, pos, key, cache = engine.steps.decode(engine.weights, cache, tokens, pos, jnp.ones(4, bool), key,
                                                      *sampling_args(greedy), kernels=engine.kernels,
                                                      filters=greedy.filters)
    for seq, prompt, res in zip(sequences, prompts, batch):  # generate stops a row at EOS
        assert seq[len(prompt):len(prompt) + len(res.tokens)] == res.tokens
    _, fresh, _ = engine.prefill(sequences)
    for decoded, prefilled in zip(cache, fresh):
        for name in ("window_kv", "compressed_kv", "index_keys"):
            if getattr(decoded, name) is not None:
                assert_rows_match(getattr(prefilled, name), getattr(decoded, name))


def test_engine_rejects_an_unknown_kv_cache_dtype():
    with pytest.raises(InputError, match=r"^kv_cache_dtype 'fp16' must be one of auto, fp8$"):
        Engine(DeepseekV4ForCausalLM(tiny(num_hidden_layers=1, layer_types=(SLIDING,), mlp_layer_types=(HASH_MOE,))),
               capacity=16, kv_cache_dtype="fp16")


def test_write_rows_quantises_from_fp32_and_drops_rows_out_of_bounds():
    """``write_rows`` stores ``quantise``'s record at the index (an fp8 store computes its rows in fp32: one
    rounding) and drops an out-of-bounds row, as the cache writes of padding rely on."""
    store = kv_rows.empty_rows(kv_rows.Fp8Entries, (2, 4, 32), 16, jnp.float32, "fp8")
    assert kv_rows.compute_dtype(store) == jnp.float32
    assert kv_rows.compute_dtype(jnp.zeros(2, jnp.bfloat16)) == jnp.bfloat16
    rows = jnp.asarray(hard_rows(32, 16)[0, :, None])  # [2, 1, 32]
    written = kv_rows.write_rows(store, (jnp.arange(2)[:, None], jnp.array([[3], [9]])), rows)
    assert type(written) is kv_rows.Fp8Entries
    got = np.asarray(kv_rows.read_rows(written, jnp.float32))
    want = np.asarray(kv_rows.dequantise(*kv_rows.quantise(rows, 16), jnp.float32))
    np.testing.assert_array_equal(got[0, 3], want[0, 0])
    assert not np.delete(got[0], 3, axis=0).any() and not got[1].any()  # row 9 of sequence 1: dropped
