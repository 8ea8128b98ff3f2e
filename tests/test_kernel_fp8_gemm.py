"""The W8A8 linear (kernels_pallas/fp8_gemm.py): activation quantisation against an independent numpy
``act_quant``, bit for bit; the Pallas kernel against its plain-JAX simulation (``reference``); the simulation
against a float64 numpy one and against the bf16 linear on the dequantised weight (fp8_linear.reference); the
ops layer's opt-in "fp8_gemm" choice, alone and in a released model's prefill.

CPU: Pallas interpret mode into poisoned outputs on random e4m3 weights (every finite code, a random power of two
per 128 x 128 block) and activations whose 1 x 128 blocks span powers of two (so a row's or a block's scale
taken for another's shows); M, N and K ragged and whole, row and column tiles, groups; bad inputs; every Flash
FP8 linear lowered for an H100 at prefill sizes, a cubin compiled for sm_90 per static configuration and its
tensor-core instruction; the benchmark's cases traced. GPU (skipped elsewhere): the compiled kernel at every
Flash FP8 linear at 2048 rows.
"""

from __future__ import annotations

import functools
import re
from unittest import mock

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from conftest import tiny
from test_kernel_fp8_linear import assert_close  # its bf16 check: one bf16 spacing beyond the fp32 bound
from test_kernels_in_model import upcast
from dsv4_jax import ops
from dsv4_jax.model.config import CSA, HASH_MOE, DeepseekV4Config
from dsv4_jax.model.transformer import stateless_forward
from dsv4_jax.ops import Kernels, dense
from dsv4_jax.weights.params import dequantized
from dsv4_jax.weights.quant_array import QuantArray
from dsv4_jax.weights.random_init import released_model
from kernels_pallas import fp8_gemm as fg
from kernels_pallas import fp8_linear as fl
from kernels_pallas.testing import compile_for_h100, lower_for_h100
from scripts import kernel_cases

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (runs the compiled kernel)")
E4M3 = ml_dtypes.float8_e4m3fn

# Kernel against reference, CPU interpret mode, max |err| / max |ref| of the fp32 sums (the same exact e4m3
# products and power-of-two scalings added in another order within each K block): measured up to 1.7e-7
# (fp32 outputs); 10x. bf16 outputs are those sums rounded: each within one bf16 spacing of the reference beyond
# that bound (measured up to 0.86: neighbouring bf16 numbers).
CPU_FP32_TOL = 2e-6
# The reference (fp32 output) against numpy's float64 block-by-block sum: measured up to 8.6e-8; the 1e-6 floor.
NUMPY_TOL = 1e-6
# GPU, bf16 outputs: the bound of the other kernels' GPU twins until GPU data gives a measured one.
GPU_TOL = 2 ** -7


def activations(key, M: int, GK: int, dtype=jnp.bfloat16) -> jax.Array:
    """x [M, GK]: normal values times a random power of two 2^-6 .. 2^6 per 1 x 128 block (distinct
    activation scales across rows and blocks); one all-zero block (the 1e-4 amax floor) where M > 1."""
    kx, ks = jax.random.split(key)
    blocks = -(-GK // 128)
    e = jax.random.randint(ks, (M, blocks), -6, 7)
    x = jax.random.normal(kx, (M, GK), jnp.float32) * jnp.repeat(jnp.ldexp(1.0, e), 128, axis=1)[:, :GK]
    if M > 1:
        x = x.at[1, :min(GK, 128)].set(0.0)
    return x.astype(dtype)


def inputs(key, M, N, K, groups=1):
    kx, kw = jax.random.split(key)
    _, w_q, w_scale = kernel_cases.fp8_linear_inputs(kw, 1, N, K, groups)
    return activations(kx, M, groups * K), w_q, w_scale


# ----------------------------------------------------------------------------------------------------------
# Activation quantisation
# ----------------------------------------------------------------------------------------------------------


def numpy_act_quant(x, groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek's ``act_quant`` (block 128, ue8m0) block by block in numpy: amax in fp32 clamped at 1e-4, the
    scale 2^ceil(log2(amax / 448)) with the log taken in float64 (exact for an fp32 power of two, and no fp32
    value lies within float64 rounding of another power of two), x / scale clipped to +-448, cast to e4m3."""
    x = np.asarray(x).astype(np.float32)
    M, GK = x.shape
    K = GK // groups
    q, scales = np.empty((M, GK), E4M3), []
    for g in range(groups):
        for k0 in range(0, K, 128):
            cols = slice(g * K + k0, g * K + min(k0 + 128, K))
            amax = np.maximum(np.abs(x[:, cols]).max(axis=1), np.float32(1e-4))
            scale = np.exp2(np.ceil(np.log2((amax / np.float32(448)).astype(np.float64)))).astype(np.float32)
            q[:, cols] = np.clip(x[:, cols] / scale[:, None], -448, 448).astype(E4M3)
            scales.append(scale)
    return q, np.stack(scales, axis=1)


def assert_quantised_like_numpy(x, groups: int = 1):
    q, s = fg.quantize_activations(x, groups)
    want_q, want_s = numpy_act_quant(x, groups)
    assert q.dtype == jnp.float8_e4m3fn and s.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(s), want_s)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), want_q.view(np.uint8))


@pytest.mark.parametrize("M,GK,groups,dtype", [(5, 400, 1, jnp.bfloat16), (3, 2 * 200, 2, jnp.float32),
                                                (4, 4 * 256, 4, jnp.bfloat16)])
def test_quantize_activations_is_act_quant(M, GK, groups, dtype):
    """Whole and ragged blocks, groups blocked on their own; bf16 and fp32 activations."""
    assert_quantised_like_numpy(activations(jax.random.PRNGKey(GK + M), M, GK, dtype), groups)


def test_quantize_activations_over_every_bf16_amax():
    """One block per positive finite bf16 value v (subnormals, the 1e-4 floor, powers of two and 448 * 2^k
    included): v itself, and 127 values v * u for u spread over [-1, 1] (every e4m3 code's neighbourhood)."""
    v = np.arange(1, 0x7F80, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
    u = np.linspace(-1, 1, 127, dtype=np.float32)
    x = np.concatenate([v[:, None], v[:, None] * u[None, :]], axis=1).astype(ml_dtypes.bfloat16)
    assert_quantised_like_numpy(jnp.asarray(x))


# ----------------------------------------------------------------------------------------------------------
# The simulation (reference)
# ----------------------------------------------------------------------------------------------------------


def numpy_w8a8(x_q, x_scales, w_q, w_scale, groups: int) -> np.ndarray:
    """float64: sum over K blocks of (x block * its row's scale) @ (w block * its scale)^T, per group."""
    x_q, w_q = np.asarray(x_q).astype(np.float64), np.asarray(w_q).astype(np.float64)
    x_s, w_s = np.asarray(x_scales, np.float64), np.asarray(w_scale, np.float64)
    N, K = w_q.shape
    n, kb = N // groups, -(-K // 128)
    out = np.zeros((x_q.shape[0], N))
    for g in range(groups):
        for b in range(kb):
            cols = slice(b * 128, min((b + 1) * 128, K))
            x = x_q[:, g * K:(g + 1) * K][:, cols] * x_s[:, g * kb + b, None]
            for r0 in range(g * n, (g + 1) * n, 16):  # weight rows r0 .. r0 + 15 share a scale row
                w = w_q[r0:r0 + 16, cols] * w_s[r0 // 128, b]
                out[:, r0:r0 + 16] += x @ w.T
    return out


def test_reference_is_the_blockwise_sum():
    """Ragged K blocks (200 = 128 + 72) and weight scale rows (2 groups of 160 outputs: N = 320)."""
    M, N, K, groups = 7, 320, 200, 2
    x, w_q, w_scale = inputs(jax.random.PRNGKey(M), M, N, K, groups)
    x_q, x_scales = fg.quantize_activations(x, groups)
    want = numpy_w8a8(x_q, x_scales, w_q, w_scale, groups)
    got = np.asarray(fg.reference(x_q, x_scales, w_q, w_scale, out_dtype=jnp.float32, groups=groups), np.float64)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"max abs err / max |numpy| {err:.3g}")
    assert err <= NUMPY_TOL


def test_reference_against_the_bf16_linear():
    """The simulation against x (bf16) @ the dequantised weight with fp32 accumulation (fp8_linear.reference,
    the model's path without activation quantisation): each output within the sum of its products' worst-case
    e4m3 rounding, sum_k |w_k| max(2^-4 |x_k|, 2^-10 s_k) (half an e4m3 spacing of x_k / s_k, times its block's
    scale s_k: relative 2^-4 for normals, 2^-10 absolute below e4m3's smallest normal 2^-6), plus 1e-6 of the
    largest output for the two fp32 sums. 4 groups, ragged K. Measured: up to 0.56 of that bound per element
    (0.35-0.70 on other shapes); max |err| / max |bf16 linear| 2.4% (2.4-3.4%), the cost of e4m3 activations."""
    M, N, K, groups = 6, 256, 200, 4
    x, w_q, w_scale = inputs(jax.random.PRNGKey(M + K), M, N, K, groups)
    x_q, x_scales = fg.quantize_activations(x, groups)
    got = np.asarray(fg.reference(x_q, x_scales, w_q, w_scale, out_dtype=jnp.float32, groups=groups), np.float64)
    want = np.asarray(fl.reference(x, w_q, w_scale, out_dtype=jnp.float32, groups=groups), np.float64)
    w = np.asarray(fl.dequantize(w_q, w_scale, jnp.float32), np.float64)
    s = np.repeat(np.asarray(x_scales, np.float64), 128, axis=1).reshape(M, groups, -1)[:, :, :K].reshape(M, -1)
    xe = np.maximum(2.0 ** -4 * np.abs(np.asarray(x, np.float64)), 2.0 ** -10 * s)
    bound = np.concatenate([xe[:, g * K:(g + 1) * K] @ np.abs(w[g * (N // groups):(g + 1) * (N // groups)]).T
                            for g in range(groups)], axis=1)
    scale = np.abs(want).max()
    err = np.abs(got - want)
    print(f"max abs err / max |bf16 linear| {err.max() / scale:.3g}; max err / elementwise bound "
          f"{(err / (bound + 1e-6 * scale)).max():.3g}")
    assert (err <= bound + 1e-6 * scale).all()


# ----------------------------------------------------------------------------------------------------------
# The kernel (interpret mode)
# ----------------------------------------------------------------------------------------------------------


def run_kernel(M, N, K, groups=1, tuning=None, out_dtype=jnp.float32, seed=0):
    x, w_q, w_scale = inputs(jax.random.PRNGKey(seed + M + N + K), M, N, K, groups)
    x_q, x_scales = fg.quantize_activations(x, groups)
    got = fg.fp8_gemm(x_q, x_scales, w_q, w_scale, out_dtype=out_dtype, groups=groups, tuning=tuning,
                      interpret=True, poison_outputs=True)
    return got, fg.reference(x_q, x_scales, w_q, w_scale, out_dtype=out_dtype, groups=groups)


@pytest.mark.parametrize("M,N,K,groups,tuning", [
    (70, 300, 400, 1, None),                                        # ragged M, N, K: every mask; 2 row tiles
    (64, 256, 384, 1, fg.TuningConfig(block_m=32, block_n=128)),   # whole blocks: no mask
    (33, 256, 640, 1, fg.TuningConfig(block_m=16, block_n=32)),    # 4 programs per weight scale row, 3 row tiles
    (5, 256, 200, 4, fg.TuningConfig(block_n=32)),                 # 4 groups of 64 outputs, ragged K
])  # 2 groups of 48 outputs (block_n 16): test_ops_linear_under_fp8_gemm
def test_interpret_matches_reference(M, N, K, groups, tuning):
    got, want = run_kernel(M, N, K, groups, tuning)
    assert_close(got, want, CPU_FP32_TOL)


def test_interpret_bf16_output():
    """5 rows of 4 groups, ragged K, bf16 output."""
    got, want = run_kernel(5, 256, 200, 4, fg.TuningConfig(block_n=32), out_dtype=jnp.bfloat16)
    assert_close(got, want, CPU_FP32_TOL)


def test_bad_inputs_are_errors():
    x, w_q, w_scale = inputs(jax.random.PRNGKey(0), 2, 256, 384)
    x_q, x_s = fg.quantize_activations(x)
    with pytest.raises(ValueError, match=r"x_q \(2, 384\), w_q \(256, 384\), groups=2: expected x_q \[M, groups\*K\]"):
        fg.fp8_gemm(x_q, x_s, w_q, w_scale, groups=2, interpret=True)
    with pytest.raises(ValueError, match="x_q bfloat16, x_scales float32, w_q float8_e4m3fn, w_scale float32: "
                                         "expected float8_e4m3fn, float32"):
        fg.fp8_gemm(x, x_s, w_q, w_scale, interpret=True)
    with pytest.raises(ValueError, match=r"x_scales \(2, 2\) for x_q \(2, 384\), w_q \(256, 384\), groups=1: "
                                         r"expected \(2, 3\)"):
        fg.fp8_gemm(x_q, x_s[:, :2], w_q, w_scale, interpret=True)
    with pytest.raises(ValueError, match=r"w_scale \(2, 2\) for .*: expected \(2, 3\)"):
        fg.fp8_gemm(x_q, x_s, w_q, w_scale[:, :2], interpret=True)
    with pytest.raises(ValueError, match="out_dtype float16: expected bfloat16 or float32"):
        fg.fp8_gemm(x_q, x_s, w_q, w_scale, out_dtype=jnp.float16, interpret=True)
    with pytest.raises(ValueError, match="groups=5 for N=96: expected a divisor of N leaving a multiple of 16"):
        x5, s5 = fg.quantize_activations(jnp.zeros((2, 5 * 384), jnp.bfloat16), 5)
        fg.fp8_gemm(x5, s5, w_q[:96], w_scale[:1], groups=5, interpret=True)
    with pytest.raises(ValueError, match=r"x \(2, 384\), groups=5: expected x \[M, groups\*K\]"):
        fg.quantize_activations(x, 5)
    with pytest.raises(ValueError, match="block_n=256: expected at most 128"):
        fg.TuningConfig(block_n=256)
    with pytest.raises(ValueError, match="num_stages=0: expected a positive int"):
        fg.TuningConfig(num_stages=0)


# ----------------------------------------------------------------------------------------------------------
# Flash shapes: lowering and sm_90 compilation; the GPU twin
# ----------------------------------------------------------------------------------------------------------


FLASH_SHAPES = kernel_cases.fp8_linear_shapes(DeepseekV4Config.flash())
PREFILL_ROWS = (2048, 16384)


def flash_args(M, N, K, groups):
    """The kernel's operands as ShapeDtypeStructs: x_q, x_scales, w_q, w_scale."""
    S, kb = jax.ShapeDtypeStruct, -(-K // fg.BLOCK)
    return (S((M, groups * K), jnp.float8_e4m3fn), S((M, groups * kb), jnp.float32), S((N, K), jnp.float8_e4m3fn),
            S((-(-N // fg.BLOCK), kb), jnp.float32))


@pytest.mark.parametrize("label", sorted(FLASH_SHAPES))
def test_lowers_for_h100(label):
    """``quantized_linear`` (the quantisation in XLA, the kernel in Triton IR) at both prefill sizes."""
    N, K, groups = FLASH_SHAPES[label]
    for M in PREFILL_ROWS:
        x = jax.ShapeDtypeStruct((M, groups * K), jnp.bfloat16)
        w_q, w_scale = flash_args(M, N, K, groups)[2:]
        text = lower_for_h100(functools.partial(fg.quantized_linear, groups=groups), x, w_q, w_scale)
        assert "triton" in text.lower()


@pytest.mark.parametrize("shape,M,out_dtype", [
    (FLASH_SHAPES["q_b_proj"], 16384, jnp.bfloat16), (FLASH_SHAPES["o_a_proj"], 2048, jnp.bfloat16),
    (FLASH_SHAPES["o_b_proj"], 2048, jnp.float32), ((300, 400, 1), 70, jnp.bfloat16),  # ragged: every mask
], ids=["q_b", "o_a", "o_b", "ragged"])
def test_compiles_for_sm90(shape, M, out_dtype):
    """A cubin for sm_90 per static configuration (groups, fp32 output, masks); bound 120 s per kernel as
    tests/test_kernels_compile.py's. And the cubin's tensor-core instruction: FP8 ``wgmma`` on e4m3 operands,
    which Triton emits only for a dot marked to accumulate imprecisely (fp8_gemm's lowering mark; without it,
    f16 ``mma.sync`` on converted tiles)."""
    pytest.importorskip("triton")
    import triton

    N, K, groups = shape
    compiled, real = [], triton.compile
    with mock.patch.object(triton, "compile", lambda *a, **k: compiled.append(real(*a, **k)) or compiled[-1]):
        seconds = compile_for_h100(functools.partial(fg.fp8_gemm, groups=groups, out_dtype=out_dtype),
                                   *flash_args(M, N, K, groups))
    mma = {m for c in compiled for m in re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\.[\w.]+", c.asm["ptx"])}
    print(f"N={N} K={K} groups={groups} M={M}: Triton compile for sm_90 {seconds}; {mma}")
    assert seconds and max(seconds.values()) < 120
    assert mma and all(m.startswith("wgmma.mma_async") and m.endswith(".f32.e4m3.e4m3") for m in mma), mma


def test_bench_cases_trace():
    """Every benchmark case's kernel, reference and baselines trace at its shapes (the GPU session's command
    runs them; no GPU here)."""
    for case in kernel_cases.bench_cases("fp8_gemm"):
        args = jax.eval_shape(case["args"], jax.random.PRNGKey(0))
        want = jax.ShapeDtypeStruct((case["shapes"]["M"], case["shapes"]["N"]), jnp.bfloat16)
        for fn, kw, a in [(case["pallas"], case["kwargs"], args), (case["reference"], case["kwargs"], args),
                          *((b["fn"], b["kwargs"], jax.eval_shape(b["args"], jax.random.PRNGKey(0)))
                            for b in case["baselines"])]:
            assert jax.eval_shape(functools.partial(fn, **kw), *a) == want, (case["name"], fn)


def test_bench_rates_count_flops_against_their_own_roofline():
    """A baseline with FLOPs is reported against the larger of its copy floor and its matmul floor."""
    from scripts.bench_kernels import rates

    assert rates("b_", 2e12, 2.0, 4e12) == {"b_TBps": 1.0, "b_pct_of_copy": 25.0}
    got = rates("b_", 2e12, 2.0, 4e12, flops=1e15, mm=1e15)  # floors: copy 0.5 s, matmul 1 s
    assert got == {"b_TBps": 1.0, "b_pct_of_copy": 25.0, "b_TFLOPs": 500.0, "b_pct_of_roofline": 50.0}


@on_gpu
@pytest.mark.parametrize("case", [c for c in kernel_cases.bench_cases("fp8_gemm") if c["shapes"]["M"] == 2048],
                         ids=lambda c: c["name"])
def test_gpu_bench_cases_match_reference(case):
    x, w_q, w_scale = case["args"](jax.random.PRNGKey(0))
    kw = case["kwargs"]
    out = jax.jit(functools.partial(fg.quantized_linear, poison_outputs=True, **kw))(x, w_q, w_scale)
    want = jax.jit(functools.partial(kernel_cases.fp8_gemm_reference, **kw))(x, w_q, w_scale)
    g, w = np.asarray(out, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(g).all(), f"{np.sum(~np.isfinite(g))} unwritten or non-finite outputs"
    err = np.abs(g - w).max() / np.abs(w).max()
    print(f"{case['name']}: max abs err / max |ref| {err:.3g}")
    assert err <= GPU_TOL


# ----------------------------------------------------------------------------------------------------------
# In the model: the "fp8_gemm" choice of ops.dense
# ----------------------------------------------------------------------------------------------------------


W8A8 = Kernels("xla", overrides=(("linear", "fp8_gemm"),))
# A released random model with one CSA layer (every FP8 linear of the trunk: q_a, q_b, kv, the grouped o_a, o_b,
# the shared expert's, the indexer's q_b), K = 160 (a ragged FP8 block), routed by token id and the indexer
# picking every entry, so that no discrete choice turns a rounding difference into a different computation.
MODEL_CFG = tiny(hidden_size=160, num_hidden_layers=1, layer_types=(CSA,), mlp_layer_types=(HASH_MOE,), index_topk=16)


def prefill_logits(model, ids, kernels) -> np.ndarray:
    """The stateless prefill's logits [B, S, V] traced afresh under ``kernels`` (a new jit: no trace shared
    with another path or with a monkeypatched op)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids):
        with ops.use(kernels):
            return stateless_forward(nnx.merge(graphdef, state), ids)

    return np.asarray(forward(state, jnp.asarray(ids)), np.float32)


def test_kernels_choice_takes_fp8_gemm_for_linear_only():
    assert W8A8.of("linear") == "fp8_gemm" and W8A8.of("topk") == "xla"
    with pytest.raises(ValueError, match=r"^kernels 'fp8_gemm' is not one of \('xla', 'pallas'\)$"):
        Kernels("fp8_gemm")
    with pytest.raises(ValueError, match=r"^kernels 'fp8_gemm' is not one of \('xla', 'pallas'\)$"):
        Kernels("pallas", overrides=(("topk", "fp8_gemm"),))


@pytest.mark.parametrize("groups", [1, 2])
def test_ops_linear_under_fp8_gemm(groups):
    """ops.dense under ``W8A8``: 66 rows [2, 33, ...] of an FP8 QuantArray weight (ue8m0 scales) go through
    ``quantized_linear`` and equal the simulation; 64 rows take the "pallas" path; under "xla" no FP8 kernel
    runs. groups = 2: ``grouped_linear``, x [2, 33, 2, K]."""
    N, K = 96, 160
    x, w_q, w_scale = inputs(jax.random.PRNGKey(groups), 66, N, K, groups)
    weight = QuantArray.fp8(w_q, w_scale.astype(jnp.float8_e8m0fnu))
    x = x.reshape(2, 33, groups, K) if groups > 1 else x.reshape(2, 33, K)

    def run(x):
        return dense.grouped_linear(x, weight, N // groups) if groups > 1 else dense.linear(x, weight)

    def jaxpr(x) -> str:  # traced afresh (jax caches traces by function; the choice is read while tracing)
        return str(jax.make_jaxpr(lambda x: run(x))(x))

    with ops.use(W8A8):
        got = run(x)
        assert "dsv4_fp8_gemm" in jaxpr(x)
        assert "dsv4_fp8_linear" in jaxpr(x[:, :32])  # the weight-only kernel at 64 rows, as under "pallas"
    assert "dsv4_fp8" not in jaxpr(x)
    want = fg.reference(*fg.quantize_activations(x.reshape(66, groups * K), groups), w_q, w_scale, groups=groups)
    assert got.shape == (*x.shape[:-1], N // groups) if groups > 1 else (2, 33, N)
    assert_close(got.reshape(66, N), want, CPU_FP32_TOL)


def test_model_prefill_with_fp8_activations(monkeypatch):
    """bf16 prefill of 2 x 33 tokens (66 rows: above the weight-only kernel's 64) under ``W8A8``: every FP8
    linear, o_a with its 2 groups, goes through ``quantized_linear``. Against the dequantised model (the default
    path): both compared with the fp32 logits of the same weights, the FP8 activations' error is at most 16x the
    bf16 path's, the ratio of e4m3's unit roundoff (2^-4) to bf16's (2^-8). Measured 7.4-12.1x on three prompt
    sets (this one: 12.1x); between the two paths, max |difference| 10-11% of the largest logit, while the
    bf16 path is 0.8-1.5% from the fp32 logits: a direct bound between them would say little."""
    model = released_model(MODEL_CFG, jnp.bfloat16, seed=3)
    plain = dequantized(model)
    ids = np.random.default_rng(0).integers(0, MODEL_CFG.vocab_size, (2, 33))
    calls, real = [], dense.quantized_linear
    monkeypatch.setattr(dense, "quantized_linear", lambda *a, **k: calls.append(k["groups"]) or real(*a, **k))
    got = prefill_logits(model, ids, W8A8)
    assert sorted(set(calls)) == [1, 2] and len(calls) == 9, calls
    assert np.isfinite(got).all()
    want, fp32 = prefill_logits(plain, ids, "xla"), prefill_logits(upcast(plain), ids, "xla")
    err = {name: np.abs(v - fp32).max() / np.abs(fp32).max() for name, v in (("w8a8", got), ("bf16", want))}
    print(f"vs fp32 logits: fp8 activations {err['w8a8']:.4f}, bf16 {err['bf16']:.4f} "
          f"({err['w8a8'] / err['bf16']:.1f}x); fp8 activations vs dequantised "
          f"{np.abs(got - want).max() / np.abs(want).max():.4f}")
    assert err["w8a8"] <= 16 * err["bf16"]
