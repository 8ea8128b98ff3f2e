"""Grouped matmul kernel for the routed experts (kernels_pallas/grouped_matmul.py) against ragged_dot_general.

CPU: the Mosaic GPU kernel in Pallas' GPU interpret mode, outputs poisoned (NaN) before the run, so an
unwritten row fails, on fresh random inputs per case, plus a CUDA cross-lowering check at the Flash expert
shapes (which runs Mosaic GPU's layout inference); FP4 weights (every code, ue8m0 and fp32 scales) the same
way. GPU (skipped elsewhere): the compiled kernel at real sizes, bf16 and FP4. CPU also: the MoE layer's
"pallas" path, with this kernel or the few-rows one (grouped_gemv), against its XLA path; and the FP4 expert
format the three expert kernels share (kernels_pallas/common.py): the references' dequantisation against the
released format's, the kernels' in-register decoding against the references' on every byte.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import released_format
from dsv4_jax import ops
from dsv4_jax.ops.moe import routed_experts
from dsv4_jax.weights import quantization
from kernels_pallas import common
from kernels_pallas import grouped_matmul as gm
from kernels_pallas.testing import lower_for_h100
from scripts import kernel_cases

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (runs the compiled kernel)")

SMALL = gm.TuningConfig(block_m=16, block_n=64, block_k=64, max_concurrent_steps=2)


def make_inputs(seed, M, K, N, sizes):
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (M, K), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (len(sizes), N, K), jnp.float32).astype(jnp.bfloat16)
    return x, w, jnp.asarray(sizes, jnp.int32)


def fp4_inputs(seed, M, K, N, sizes, scale_dtype):
    """``make_inputs`` with FP4 experts (kernel_cases.fp4_experts): x bf16 [M, K], w int8 [G, N, K/2], w_scales
    [G, N, K/32] in scale_dtype, group_sizes int32 [G]."""
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (M, K), jnp.float32).astype(jnp.bfloat16)
    return x, *kernel_cases.fp4_experts(kw, len(sizes), N, K, scale_dtype), jnp.asarray(sizes, jnp.int32)


# max |err| / max |ref| of the kernels in CPU interpret mode (bf16 outputs of fp32 sums summed in another order):
# measured 0-7.76e-4 (M 40); 10x (grouped_gemv has its own, in its file). The model paths and the GPU keep
# rtol 1e-2 (one bf16 rounding apart at most).
CPU_TOL = 8e-3
# The share of output elements that differ from the reference at all, CPU interpret mode. Kernel and reference
# round fp32 sums of the same products, summed in another order, to bf16: an element moves to the neighbouring
# bf16 value only where its sum lies at a rounding boundary. Measured 1 of 5120 elements (this kernel, M 40) and
# 1 of 3840 (grouped_gemv, M 40), none in the other cases; 10x the larger share, at least one element. An fp16
# accumulator or a bf16-rounded partial sum changes 5-42% of them while staying inside the max-error bounds.
CPU_DIFFER = 2.6e-3


def assert_close(out, ref, tol=None, differ=None):
    """out, ref [M, N]: within ``tol`` (max abs err / max |ref|, printed) and, with ``differ``, at most that share
    of the elements (at least one) not equal to the reference; without ``tol`` the model paths' / GPU's bound."""
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), "kernel left unwritten (NaN) rows"
    err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)
    n_differ = int((out != ref).sum())
    print(f"max abs err / max |ref| {err:.3g}; {n_differ} of {out.size} elements differ")
    if differ is not None:
        assert n_differ <= max(1.0, differ * out.size), f"{n_differ} of {out.size} elements differ"
    if tol is not None:
        assert err <= tol
    else:  # bf16 output of an fp32 accumulation: one bf16 rounding apart at most.
        np.testing.assert_allclose(out, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


def assert_fp4_ptx_equals_bit_arithmetic(case: dict, reference, close) -> None:
    """A GPU twin of an FP4 bench case under ``fp4_ptx``: the bit-arithmetic kernel's outputs bit for bit (the
    same bf16 tiles into the same dots; the PTX text is checked on the CPU in test_kernel_expert_rows.py), and
    ``reference``'s within ``close``."""
    args = case["args"](jax.random.PRNGKey(0))
    ptx = jax.jit(functools.partial(case["pallas"], poison_outputs=True,
                                    tuning=dataclasses.replace(case["tuning"], fp4_ptx=True)))(*args)
    bits = jax.jit(functools.partial(case["pallas"], tuning=dataclasses.replace(case["tuning"], fp4_ptx=False)))(*args)
    np.testing.assert_array_equal(np.asarray(ptx, np.float32), np.asarray(bits, np.float32))
    close(ptx, jax.jit(reference)(*args))


def write_counts(monkeypatch, module, fn, *args, **kw) -> np.ndarray:
    """How many times the kernel behind ``fn`` (an entry point of ``module``) writes each output element, float32
    in the output's shape: traced afresh in interpret mode with the kernel's stores replaced by an increment of
    the elements they would write (``plt.store`` where the module has the Triton backend, else the Mosaic GPU
    ``copy_smem_to_gmem``). Interpret mode runs the programs one after another, so a row that one program
    writes beyond its own and a later one rewrites looks right in the output (on a GPU the two race); its
    count says 2."""
    def bump(seen):
        return jnp.where(jnp.isnan(seen), 0, seen) + 1  # fresh outputs start as NaN

    if hasattr(module, "plt"):
        real = module.plt

        def store(ref, val, *, mask=None, **_):
            real.store(ref, bump(real.load(ref, mask=mask, other=0)), mask=mask)

        monkeypatch.setattr(module, "plt", types.SimpleNamespace(load=real.load, store=store))
    else:
        def copy_smem_to_gmem(src, dst, *_, **__):
            dst[...] = bump(dst[...])

        monkeypatch.setattr(module.plgpu, "copy_smem_to_gmem", copy_smem_to_gmem)
    run = functools.partial(getattr(fn, "__wrapped__", fn), interpret=True, **kw)
    return np.asarray(jax.jit(run)(*args), np.float32)


@pytest.mark.parametrize("M,sizes", [
    (40, [7, 0, 20, 3, 6, 4]),     # tiles straddle group boundaries, an empty group
    (48, [16, 16, 16]),            # boundaries on tile edges
    (5, [0, 0, 5, 0]),             # fewer rows than one tile, one group
    (30, [3, 9, 0, 0]),            # rows past sum(group_sizes) are 0 (padding rows)
    (1, [0, 1]),                   # a single row (decode, batch 1, k = 1)
    (64, [0, 0, 0, 0]),            # nothing routed: all zeros
])
def test_interpret_matches_reference(M, sizes):
    x, w, gs = make_inputs(M + len(sizes), M, 128, 128, sizes)
    out = gm.grouped_matmul(x, w, gs, interpret=True, poison_outputs=True, tuning=SMALL)
    assert_close(out, gm.reference(x, w, gs), CPU_TOL, CPU_DIFFER)


@pytest.mark.parametrize("M,sizes,scale_dtype", [
    (40, [7, 0, 20, 3, 6, 4], jnp.float8_e8m0fnu),  # tiles straddle group boundaries, an empty group
    (30, [3, 9, 0, 0], jnp.float32),                 # rows past sum(group_sizes) are 0 (padding rows)
    (1, [0, 1], jnp.float8_e8m0fnu),                 # a single row
    (64, [0, 0, 0, 0], jnp.float32),                 # nothing routed: all zeros
], ids=["ragged", "padding", "one_row", "empty"])
def test_fp4_interpret_matches_reference(M, sizes, scale_dtype):
    """FP4 weights (every code, scales 2^-8 .. 2^-3 per 1 x 32 block) dequantised into shared memory per K step
    against the reference on the whole dequantised experts: the same bf16 weights and products, summed in
    another order (x's columns interleaved per 32)."""
    x, w, w_scales, gs = fp4_inputs(M + len(sizes), M, 128, 128, sizes, scale_dtype)
    out = gm.grouped_matmul(x, w, gs, w_scales=w_scales, interpret=True, poison_outputs=True, tuning=SMALL)
    assert out.dtype == jnp.bfloat16
    assert_close(out, gm.reference(x, w, gs, w_scales), CPU_TOL, CPU_DIFFER)


@pytest.mark.parametrize("M,sizes", [(40, [7, 0, 20, 3, 6, 4]), (30, [3, 9, 0, 0])])
def test_interpret_writes_every_row_once(monkeypatch, M, sizes):
    """Each output element of the routed rows is written by exactly one tile (a tile straddling a group boundary
    stores only its group's rows); the rows past sum(group_sizes) are zeroed after the kernel."""
    x, w, gs = make_inputs(M + len(sizes), M, 128, 128, sizes)
    assert (write_counts(monkeypatch, gm, gm.grouped_matmul, x, w, gs, tuning=SMALL)[: sum(sizes)] == 1).all()


def test_fp4_interpret_writes_every_row_once(monkeypatch):
    sizes = [7, 0, 20, 3, 6, 4]
    x, w, w_scales, gs = fp4_inputs(1, 40, 128, 128, sizes, jnp.float8_e8m0fnu)
    counts = write_counts(monkeypatch, gm, gm.grouped_matmul, x, w, gs, w_scales=w_scales, tuning=SMALL)
    assert (counts[: sum(sizes)] == 1).all()


def test_interleave_blocks_pairs_each_byte_16_apart():
    """interleave_blocks (x's column order in the FP4 kernel): per 32-column block its even columns, then its
    odd ones, so x's column 32b + 2i + h lands where the kernel puts byte 16b + i's nibble h."""
    x = jnp.arange(2 * 64, dtype=jnp.float32).reshape(2, 64)
    want = [32 * b + 2 * i + h for b in range(2) for h in range(2) for i in range(16)]
    np.testing.assert_array_equal(np.asarray(gm.interleave_blocks(x))[1], 64 + np.asarray(want))


def test_bad_shapes_are_errors():
    x, w, gs = make_inputs(0, 16, 128, 128, [16])
    with pytest.raises(ValueError, match="multiples"):
        gm.grouped_matmul(x, w, gs, tuning=gm.TuningConfig(block_k=96), interpret=True)
    with pytest.raises(ValueError, match="expected x"):
        gm.grouped_matmul(x.astype(jnp.float32), w, gs, interpret=True)
    with pytest.raises(ValueError, match="max_concurrent_steps=0: expected a positive int"):
        gm.TuningConfig(max_concurrent_steps=0)


def test_fp4_bad_inputs_are_errors():
    x, w, w_scales, gs = fp4_inputs(0, 16, 192, 128, [16], jnp.float8_e8m0fnu)
    with pytest.raises(ValueError, match=r"grouped_matmul: x \(16, 192\) bfloat16, w \(1, 128, 64\) int8, w_scales "
                       r"\(1, 128, 6\) float8_e8m0fnu: expected x \[M, K\] bfloat16"):
        gm.grouped_matmul(x, w[:, :, :64], gs, w_scales=w_scales, interpret=True)
    with pytest.raises(ValueError, match=r"w_scales \(1, 128, 6\) bfloat16: expected"):
        gm.grouped_matmul(x, w, gs, w_scales=w_scales.astype(jnp.bfloat16), interpret=True)
    with pytest.raises(ValueError, match=r"FP4 takes block_k=64 \(got 96\)"):
        gm.grouped_matmul(x, w, gs, w_scales=w_scales, tuning=gm.TuningConfig(block_k=96), interpret=True)
    with pytest.raises(ValueError, match=r"block_n a multiple of 64 \(got 32\)"):
        gm.grouped_matmul(x, w, gs, w_scales=w_scales, tuning=gm.TuningConfig(block_n=32), interpret=True)


def test_fp4_dequantize_is_the_released_format():
    """common.dequantize_fp4 (the FP4 references' weights) is the released format's dequantiser
    (quantization.dequantise_fp4, numpy) bit for bit: on a weight quantised as the release stores it
    (released_format.quantise_fp4, ue8m0 scales), and on every byte with scales over six powers of two in ue8m0
    and fp32; in fp32 and rounded to bf16."""
    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32) * np.float32(0.02)
    cases = [released_format.quantise_fp4(w)]
    for dtype in (jnp.float8_e8m0fnu, jnp.float32):
        packed, scales = kernel_cases.fp4_experts(jax.random.PRNGKey(1), 2, 64, 256, dtype)
        assert len(np.unique(np.asarray(packed).view(np.uint8))) == 256
        cases.append((np.asarray(packed), np.asarray(scales)))
    for packed, scales in cases:
        want = quantization.dequantise_fp4(packed, scales)
        got = common.dequantize_fp4(jnp.asarray(packed), jnp.asarray(scales), jnp.float32)
        np.testing.assert_array_equal(np.asarray(got), want)
        got = common.dequantize_fp4(jnp.asarray(packed), jnp.asarray(scales), jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(got, np.float32), want.astype(jnp.bfloat16).astype(np.float32))


def test_fp4_tile_decodes_every_byte():
    """common.fp4_tile (the Triton kernels' in-register decoding: bit arithmetic) against dequantize_fp4 (a
    table), bit for bit in bf16: every byte in every row, under ue8m0 exponent bytes 2 .. 240 (2^-125 .. 2^113,
    the documented range; an fp16 subnormal times the smallest still a normal fp32) and under fp32 scales that
    are not powers of two (products rounded alike)."""
    rows = 240
    packed = jnp.tile(jnp.arange(256, dtype=jnp.uint8).view(jnp.int8), (rows, 1))  # [240, 256]: every byte a row
    blocks = 256 // 16
    exponent_bytes = jnp.arange(rows * blocks, dtype=jnp.int32) % 239 + 2  # 2 .. 240, each block its own
    ue8m0 = exponent_bytes.reshape(rows, blocks).astype(jnp.uint8)
    fp32 = jax.random.uniform(jax.random.PRNGKey(0), (rows, blocks), jnp.float32, 1e-3, 1e3)
    for operand, scales in ((ue8m0, lax.bitcast_convert_type(ue8m0, jnp.float8_e8m0fnu)), (fp32, fp32)):
        got = common.fp4_tile(packed, operand)
        want = common.dequantize_fp4(packed, scales, jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("M,N,K,poison", [(6, 4096, 4096, False), (768, 4096, 4096, False),
                                           (24576, 4096, 2048, False), (768, 4096, 4096, True)])
def test_lowers_for_h100(M, N, K, poison):
    args = (jax.ShapeDtypeStruct((M, K), jnp.bfloat16), jax.ShapeDtypeStruct((256, N, K), jnp.bfloat16),
            jax.ShapeDtypeStruct((256,), jnp.int32))
    assert "mosaic_gpu" in lower_for_h100(functools.partial(gm.grouped_matmul, poison_outputs=poison), *args)


@pytest.mark.parametrize("M,N,K,scale_dtype,poison", [(768, 4096, 4096, jnp.float8_e8m0fnu, False),
                                                       (24576, 4096, 2048, jnp.float32, False),
                                                       (768, 4096, 4096, jnp.float8_e8m0fnu, True)])
def test_fp4_lowers_for_h100(M, N, K, scale_dtype, poison):
    """The FP4 kernel through Mosaic GPU's layout inference and lowering for an H100 (the decoding's register
    layouts, the broadcast scales, the dequantised tile's shared-memory layout for wgmma)."""
    S = jax.ShapeDtypeStruct
    args = (S((M, K), jnp.bfloat16), S((256, N, K // 2), jnp.int8), S((256,), jnp.int32),
            S((256, N, K // 32), scale_dtype))
    run = lambda x, w, gs, s: gm.grouped_matmul(x, w, gs, w_scales=s, poison_outputs=poison)
    assert "mosaic_gpu" in lower_for_h100(run, *args)


@pytest.mark.parametrize("T,k,E,d,F,seed", [
    (24, 2, 4, 128, 64, 3),  # 12 rows per expert: this kernel; the XLA path is ragged_dot
    (2, 3, 8, 64, 32, 5),    # under 1 row per expert (decode): the few-rows kernel; XLA gathers matrices
])
def test_moe_kernel_paths_match_xla_in_interpret_mode(T, k, E, d, F, seed):
    """routed_experts under ops.use("pallas") (interpret mode on CPU) equals the XLA path, on both sides of
    the rows-per-expert rule that picks grouped_matmul or grouped_gemv."""
    key = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(key[0], (T, d), jnp.float32).astype(jnp.bfloat16)
    idx = jax.random.randint(key[1], (T, k), 0, E)
    weights = jax.random.uniform(key[2], (T, k))
    gate_up = (0.1 * jax.random.normal(key[3], (E, 2 * F, d))).astype(jnp.bfloat16)
    down = (0.1 * jax.random.normal(key[0], (E, d, F))).astype(jnp.bfloat16)
    want = routed_experts(x, idx, weights, gate_up, down, 10.0)
    with ops.use("pallas"):
        got = routed_experts(x, idx, weights, gate_up, down, 10.0)
    assert_close(got, want)


@on_gpu
@pytest.mark.parametrize("case", kernel_cases.bench_cases("grouped_matmul"), ids=lambda c: c["name"])
def test_gpu_bench_cases_match_reference(case):
    args = case["args"](jax.random.PRNGKey(0))
    out = jax.jit(functools.partial(case["pallas"], poison_outputs=True))(*args)
    assert_close(out, jax.jit(gm.reference)(*args))
