"""dsv4_jax.ops: the implementation choice (``Kernels``, ``use``, ``current``), and every op function under
both choices against its kernel's plain-JAX ``reference`` on small random inputs (Pallas in interpret mode
off the GPU): the Pallas choice runs the kernel, the XLA choice the model's plain-JAX math, and both mean
what the kernel's reference means."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny
from flax import nnx

from dsv4_jax import ops
from dsv4_jax.model.compression import CompressorState, span_of
from dsv4_jax.model.config import CSA, HASH_MOE
from dsv4_jax.model.metadata import build_metadata
from dsv4_jax.model.transformer import DeepseekV4ForCausalLM, _stateless_logits
from dsv4_jax.ops import moe as ops_moe
from kernels_pallas import compressor as cp
from kernels_pallas import expert_rows as er
from kernels_pallas import hc_pre as hp
from kernels_pallas import indexer as ix
from kernels_pallas import sparse_attention as sa
from kernels_pallas import topk as tk
from kernels_pallas.testing import cuda_plugin_installed, h100_compile_only_sharding
from test_kernel_sparse_attention import make_prefill_inputs

CHOICES = ["xla", "pallas"]
EPS = 1e-6


def assert_close(got, want, rtol):
    got, want = np.asarray(jnp.asarray(got, jnp.float32)), np.asarray(jnp.asarray(want, jnp.float32))
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= rtol * max(np.abs(want).max(), 1e-30)


def jaxpr_text(fn, *args) -> str:
    """The jaxpr of ``fn`` traced now (a fresh function each call: jax caches traces by function, and the
    choice is read at trace time)."""
    return str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


# ----- the choice ---------------------------------------------------------------------------------------


def test_kernels_validates_and_resolves_overrides():
    k = ops.Kernels("pallas", overrides=(("routed_experts", "xla"),))
    assert (k.of("routed_experts"), k.of("topk")) == ("xla", "pallas")
    assert hash(k) == hash(ops.Kernels("pallas", overrides=[["routed_experts", "xla"]]))  # lists normalised
    assert ops.Kernels.parse("pallas") == ops.Kernels("pallas") and ops.Kernels.parse(k) is k
    with pytest.raises(ValueError, match=r"^kernels 'cuda' is not one of \('xla', 'pallas'\)$"):
        ops.Kernels("cuda")
    with pytest.raises(ValueError, match=r"^kernels override names op 'attention'; expected one of \("):
        ops.Kernels("xla", overrides=(("attention", "pallas"),))
    with pytest.raises(ValueError, match="kernels 'triton' is not one of"):
        ops.Kernels("xla", overrides=(("topk", "triton"),))


def test_use_sets_current_for_its_block_only():
    assert ops.current() == ops.Kernels("xla")
    with ops.use("pallas"):
        assert ops.current() == ops.Kernels("pallas")
        with ops.use(ops.Kernels("pallas", overrides=(("topk", "xla"),))):
            assert ops.current().of("topk") == "xla"
        assert ops.current() == ops.Kernels("pallas")
    assert ops.current() == ops.Kernels("xla")


def test_an_override_keeps_that_op_on_xla():
    scores = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 64))
    n = jnp.full((1, 3), 50)
    topk = functools.partial(ops.topk, k=4)
    with ops.use("pallas"):
        assert "pallas_call" in jaxpr_text(topk, scores, n)
    with ops.use(ops.Kernels("pallas", overrides=(("topk", "xla"),))):
        assert "pallas_call" not in jaxpr_text(topk, scores, n)


def test_stateless_forward_traces_per_choice():
    """``model(input_ids)`` takes the current choice as a static argument: a forward under another choice
    is another trace (never a stale one), and its jaxpr runs that choice's kernels."""
    model = DeepseekV4ForCausalLM(tiny(num_hidden_layers=1, layer_types=(CSA,), mlp_layer_types=(HASH_MOE,)),
                                  rngs=nnx.Rngs(0))
    ids = np.random.RandomState(0).randint(0, 256, (1, 9))
    before = _stateless_logits._cache_size()
    xla = np.asarray(model(ids))
    assert _stateless_logits._cache_size() == before + 1
    with ops.use("pallas"):
        pallas = np.asarray(model(ids))
    assert _stateless_logits._cache_size() == before + 2
    np.testing.assert_allclose(pallas, xla, atol=1e-4 * np.abs(xla).max())
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(ids, jnp.int32)
    assert "pallas_call" in str(_stateless_logits.trace(graphdef, state, ids, ops.Kernels("pallas")).jaxpr)
    assert "pallas_call" not in str(_stateless_logits.trace(graphdef, state, ids, ops.Kernels("xla")).jaxpr)


# ----- the ops against their kernels' references -------------------------------------------------------


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("layer", ["csa", "hca", "sliding"])
def test_sparse_attention(choice, layer):
    B, C, H, D, W, N = 2, 16, 4, 32, 8, 12
    K = N if layer == "hca" else 4
    q, wk, wm, ent, ids, sinks = make_prefill_inputs(jax.random.PRNGKey(len(layer)), B, C, H, D, W, K, N,
                                                     starts=[0, 30], lens=[16, 11],
                                                     hca_ratio=8 if layer == "hca" else None, dtype=jnp.float32)
    if layer == "sliding":
        want = sa.reference_prefill(q, wk, wm, ent, jnp.full_like(ids, -1), sinks, 0.3)
        ent = ids = None
    else:
        want = sa.reference_prefill(q, wk, wm, ent, ids, sinks, 0.3)
    with ops.use(choice):
        got = ops.sparse_attention(q, wk, wm, ent, ids, sinks, 0.3, shared_entries=layer == "hca")
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("C", [1, 9])
def test_indexer_scores_and_topk(choice, C):
    """Scores of every visible entry equal the reference's (the rest are never picked); the top-k picks
    the reference's set (Pallas in ascending id order)."""
    B, HI, DI, N, k = 2, 8, 16, 40, 6
    kq, kk, kw = jax.random.split(jax.random.PRNGKey(C), 3)
    q = jax.random.normal(kq, (B, C, HI, DI), jnp.float32)
    keys = jax.random.normal(kk, (B, N, DI), jnp.float32)
    w = jax.random.uniform(kw, (B, C, HI), jnp.float32)
    n_visible = jnp.asarray(np.random.RandomState(C).randint(0, N + 1, (B, C)), jnp.int32)
    want = ix.reference_prefill(q, keys, w, n_visible)
    with ops.use(choice):
        scores = ops.indexer_scores(q, keys, w, n_visible)
        picks = ops.topk(scores, n_visible, k)
    visible = np.arange(N) < np.asarray(n_visible)[..., None]
    got_visible = np.where(visible, np.asarray(scores), 0.0)
    assert_close(got_visible, np.where(visible, np.asarray(want), 0.0), 1e-5)
    assert picks.shape == (B, C, k) and picks.dtype == jnp.int32
    want_picks = tk.reference(want, n_visible, k)
    np.testing.assert_array_equal(np.sort(np.asarray(picks), -1), np.sort(np.asarray(want_picks), -1))


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_compressor_prefill(choice, kind):
    """A prompt's first chunk from an empty state: the entries of its closing windows."""
    cfg = tiny()
    m, overlap = (cfg.csa_compress_rate, True) if kind == "csa" else (cfg.hca_compress_rate, False)
    D, B, S = cfg.head_dim, 2, 16
    width = 2 * D if overlap else D
    rng = np.random.default_rng(3)
    kv, gate = (jnp.asarray(rng.standard_normal((B, S, width), np.float32) * s) for s in (1.0, 2.0))
    ape, w = jnp.asarray(0.5 * rng.standard_normal((m, width), np.float32)), jnp.ones((D,), jnp.float32)
    meta = build_metadata(cfg, jnp.zeros((B,), jnp.int32), jnp.full((B,), S), S, 64).compression[m]
    span = span_of(cfg, m)
    state = CompressorState(kv=jnp.zeros((B, span, width)), gate=jnp.zeros((B, span, width)))
    with ops.use(choice):
        entries, new_state = ops.compressor_prefill(kv, gate, state, meta, ape, w, eps=EPS, overlap=overlap,
                                                    out_dtype=jnp.float32)
    nW = S // m
    want = cp.reference_prefill(kv, gate, ape, w, meta.entry_cos[:, :nW], meta.entry_sin[:, :nW], ratio=m,
                                overlap=overlap, eps=EPS)
    assert_close(entries[:, :nW], want, 1e-5)
    np.testing.assert_array_equal(np.asarray(new_state.kv[:, (S - span) % span]), np.asarray(kv[:, S - span]))


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_compressor_decode_step(choice, kind):
    """One token per row, rows that close a window and rows that do not: the cache rows written and the
    state ring equal the reference decode step's."""
    cfg = tiny()
    m, overlap = (cfg.csa_compress_rate, True) if kind == "csa" else (cfg.hca_compress_rate, False)
    D, span = cfg.head_dim, span_of(cfg, m)
    width = 2 * D if overlap else D
    pos = jnp.asarray([m - 1, 2 * m - 1, m + 1, 5 * m - 1], jnp.int32)
    B, N = len(pos), 64 // m
    rng = np.random.default_rng(4)
    randn = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
    kv, gate, ape, w = randn(B, 1, width), randn(B, 1, width), 0.5 * randn(m, width), 1.0 + 0.1 * randn(D)
    state = CompressorState(kv=randn(B, span, width), gate=randn(B, span, width))
    cache = randn(B, N, D)
    meta = build_metadata(cfg, pos, jnp.ones((B,), jnp.int32), 1, 64).compression[m]
    with ops.use(choice):
        got_cache, got_state = ops.compressor_decode_step(kv, gate, state, cache, meta, ape, w, eps=EPS,
                                                          overlap=overlap)
    rows = np.asarray(meta.entry_write_index[:, 0])
    entry, want_kv, want_gate, _ = cp.reference_decode_step(
        kv[:, 0], gate[:, 0], state.kv, state.gate, meta.state_write_slot[:, 0], meta.entry_write_index[:, 0], ape,
        w, meta.entry_cos[:, 0], meta.entry_sin[:, 0], cache, ratio=m, overlap=overlap, eps=EPS)
    closing = rows < N
    assert closing.any() and not closing.all()
    np.testing.assert_array_equal(np.asarray(got_state.kv), np.asarray(want_kv))
    np.testing.assert_array_equal(np.asarray(got_state.gate), np.asarray(want_gate))
    assert_close(np.asarray(got_cache)[closing, rows[closing]], np.asarray(entry)[closing], 1e-5)
    untouched = np.ones((B, N), bool)
    untouched[closing, rows[closing]] = False
    np.testing.assert_array_equal(np.asarray(got_cache)[untouched], np.asarray(cache)[untouched])


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("T", [2, 40])
def test_hc_pre(choice, T):
    """A few tokens (the norm in the kernel) and more (the norm after it), bf16 streams."""
    n, d = 4, 64
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(T), 4)
    streams = jax.random.normal(k1, (1, T, n, d), jnp.float32).astype(jnp.bfloat16)
    fn = 0.02 * jax.random.normal(k2, ((2 + n) * n, n * d), jnp.float32)
    base, scale = 0.5 * jax.random.normal(k3, ((2 + n) * n,)), jnp.asarray([1.0, 1.2, 0.8])
    norm_weight = 1.0 + 0.5 * jax.random.normal(k4, (d,))
    kw = dict(rms_eps=EPS, hc_eps=EPS, iters=20)
    with ops.use(choice):
        got = ops.hc_pre(streams, fn, base, scale, norm_weight, norm_eps=EPS, **kw)
    want = hp.reference(streams, fn, base, scale, norm_weight=norm_weight, norm_eps=EPS, **kw)
    assert got[0].dtype == want[0].dtype == jnp.bfloat16
    assert_close(got[0], want[0], 2 ** -7)  # one bf16 rounding of the same fp32 sum
    assert_close(got[1], want[1], 1e-5)
    assert_close(got[2], want[2], 1e-5)


def experts_reference(x, idx, weights, gate_up, down, limit):
    """Per token, the weighted sum of its experts' clamped SwiGLU MLPs, each product by ``er.reference``
    (row t against matrix ids[t]), with the activation rounded to the weights' dtype as the ops do."""
    T, k = idx.shape
    rows = jnp.repeat(x.astype(gate_up.dtype), k, axis=0)
    h = er.reference(rows, gate_up, idx.reshape(-1)).astype(jnp.float32)
    F = h.shape[-1] // 2
    act = jax.nn.silu(jnp.minimum(h[:, :F], limit)) * jnp.clip(h[:, F:], -limit, limit)
    y = er.reference(act.astype(gate_up.dtype), down, idx.reshape(-1)).astype(jnp.float32)
    return jnp.einsum("tkd,tk->td", y.reshape(T, k, -1), weights)


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("T,dtype", [(1, jnp.bfloat16), (3, jnp.bfloat16), (24, jnp.bfloat16), (3, jnp.float32)])
def test_routed_experts(choice, T, dtype):
    """One token (Pallas: expert_rows), few rows per expert (grouped_gemv), many (grouped_matmul), and fp32
    weights (XLA under either choice)."""
    E, k, d, F = 8, 2, 128, 64  # grouped_matmul's blocks: multiples of 64 and 128
    ks = jax.random.split(jax.random.PRNGKey(T), 5)
    x = jax.random.normal(ks[0], (T, d), jnp.float32).astype(dtype)
    idx = jnp.stack([jax.random.permutation(kk, E)[:k] for kk in jax.random.split(ks[1], T)]).astype(jnp.int32)
    weights = jax.random.uniform(ks[2], (T, k))
    gate_up = (jax.random.normal(ks[3], (E, 2 * F, d)) / np.sqrt(d)).astype(dtype)
    down = (jax.random.normal(ks[4], (E, d, F)) / np.sqrt(F)).astype(dtype)
    run = functools.partial(ops.routed_experts, limit=1.0)
    with ops.use(choice):
        got = run(x, idx, weights, gate_up, down)
        text = jaxpr_text(run, x, idx, weights, gate_up, down)
    with ops.use("xla"):
        xla_text = jaxpr_text(run, x, idx, weights, gate_up, down)
    assert (text != xla_text) == (choice == "pallas" and dtype == jnp.bfloat16)  # fp32 weights keep XLA
    assert_close(got, experts_reference(x, idx, weights, gate_up, down, 1.0), 2 ** -6 if dtype == jnp.bfloat16
                 else 1e-5)


@pytest.mark.parametrize("chunk_rows", [1, 5, 16])
def test_ragged_dot_in_chunks(monkeypatch, chunk_rows):
    """Rows in chunks of 1, 5 (cutting groups) and 16 (more than the rows: one call) equal each row times its
    group's matrix (numpy, float64); empty groups, and rows past the groups (zeros) included."""
    G, N, K = 4, 6, 8
    sizes = np.array([3, 0, 5, 2], np.int32)  # 10 of 13 rows in groups
    monkeypatch.setattr(ops_moe, "RAGGED_DOT_CHUNK_BYTES", chunk_rows * 4 * G * K)
    x = np.random.RandomState(0).randn(13, K).astype(np.float32)
    w = np.random.RandomState(1).randn(G, N, K).astype(np.float32)
    got = np.asarray(ops_moe.ragged_dot_in_chunks(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes)))
    group = np.repeat(np.arange(G), sizes)
    want = np.zeros((13, N))
    want[:10] = np.einsum("mk,mnk->mn", x[:10].astype(np.float64), w[group].astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not cuda_plugin_installed(), reason="needs JAX's CUDA plugin (pip install -e '.[aot]')")
def test_ragged_dot_in_chunks_bounds_gpu_temporaries():
    """Compiled for an H100, the XLA path's ragged dot of the in-model GPU test's prefill (4 x 2300 tokens x 6
    experts over 64 experts of width 4096, fp32) keeps its temporaries to a few GB: unchunked, XLA's dense
    expansion takes 62 GB, and the test ran out of memory on an H200."""
    M, G, N, K = 4 * 2300 * 6, 64, 4096, 4096
    s = h100_compile_only_sharding()
    args = (jax.ShapeDtypeStruct((M, K), jnp.float32, sharding=s), jax.ShapeDtypeStruct((G, N, K), jnp.float32,
            sharding=s), jax.ShapeDtypeStruct((G,), jnp.int32, sharding=s))
    temp = jax.jit(ops_moe.ragged_dot_in_chunks).lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temp < 12e9, temp  # 7.7 GiB at 2 GiB chunks; unchunked 62 GB


@pytest.mark.parametrize("choice", CHOICES)
def test_linear(choice):
    x, w = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 16)), jax.random.normal(jax.random.PRNGKey(1), (8, 16))
    with ops.use(choice):
        got = ops.linear(x, w, jnp.float32)
    assert_close(got, np.einsum("bti,oi->bto", np.asarray(x, np.float64), np.asarray(w, np.float64)), 1e-5)


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("rows", [1, 5, 80])
def test_linear_fp8_weight(choice, rows):
    """An FP8 QuantArray weight (the released 128 x 128 block-scaled format, on the device): both choices equal
    the product with the weight dequantised (exact), computed in float64; the Pallas choice runs the FP8 kernel
    up to FP8_KERNEL_MAX_ROWS rows and dequantises above. Measured error <= 1.6e-7 relative; bound 1e-6 (fp32
    accumulation of 384 products)."""
    from dsv4_jax.ops.dense import FP8_KERNEL_MAX_ROWS
    from dsv4_jax.weights import quantization
    from dsv4_jax.weights.quant_array import QuantArray
    kw, kx = jax.random.split(jax.random.PRNGKey(2))
    weight = QuantArray.fp8(*quantization.quantise_fp8_blocks(0.05 * jax.random.normal(kw, (200, 384))))
    x = jax.random.normal(kx, (1, rows, 384)).astype(jnp.bfloat16)
    run = functools.partial(ops.linear, out_dtype=jnp.float32)
    with ops.use(choice):
        got = run(x, weight)
        text = jaxpr_text(run, x, weight)
    assert ("pallas_call" in text) == (choice == "pallas" and rows <= FP8_KERNEL_MAX_ROWS)
    want = np.einsum("bti,oi->bto", np.asarray(x, np.float64), np.asarray(weight.dequantize(), np.float64))
    assert_close(got, want, 1e-6)


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("rows", [1, 80])
def test_grouped_linear_fp8_weight(choice, rows):
    """The attention output projection's block-diagonal form (x [..., G, in], weight [G * out, in]) with an FP8
    weight: both choices equal the grouped product with the weight dequantised, in float64; the Pallas choice
    runs the FP8 kernel in its ``groups`` form up to FP8_KERNEL_MAX_ROWS rows. The output is bf16 (x's dtype):
    bound one bf16 rounding, 2^-8 of the largest (measured 2.9e-3)."""
    from dsv4_jax.ops.dense import FP8_KERNEL_MAX_ROWS, grouped_linear
    from dsv4_jax.weights import quantization
    from dsv4_jax.weights.quant_array import QuantArray
    G, out, K = 2, 128, 256
    kw, kx = jax.random.split(jax.random.PRNGKey(3))
    weight = QuantArray.fp8(*quantization.quantise_fp8_blocks(0.05 * jax.random.normal(kw, (G * out, K))))
    x = jax.random.normal(kx, (1, rows, G, K)).astype(jnp.bfloat16)
    run = functools.partial(grouped_linear, out_per_group=out)
    with ops.use(choice):
        got = run(x, weight)
        text = jaxpr_text(run, x, weight)
    assert ("pallas_call" in text) == (choice == "pallas" and rows <= FP8_KERNEL_MAX_ROWS)
    w = np.asarray(weight.dequantize(), np.float64).reshape(G, out, K)
    assert got.dtype == jnp.bfloat16
    assert_close(got, np.einsum("btgi,goi->btgo", np.asarray(x, np.float64), w), 2 ** -8)
