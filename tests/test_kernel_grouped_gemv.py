"""Few-rows grouped matmul for decode's routed experts (kernels_pallas/grouped_gemv.py) against ragged_dot.

CPU: the Triton kernel in Pallas interpret mode, outputs poisoned (NaN) before the run, on fresh random
inputs per case; the kernel's tile lookup against a direct enumeration; a CUDA lowering check at the Flash decode
shapes; FP4 weights (every code, ue8m0 and fp32 scales) the same way, and their kernel compiled for sm_90. GPU
(skipped elsewhere): the compiled kernel at real sizes, bf16 and FP4. The MoE layer's choice between this
kernel and grouped_matmul is tested in test_kernel_grouped_matmul.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import grouped_gemv as gg
from kernels_pallas.testing import compile_for_h100, lower_for_h100
from scripts import kernel_cases
from test_kernel_grouped_matmul import (CPU_DIFFER, assert_close, assert_fp4_ptx_equals_bit_arithmetic, fp4_inputs,
                                       make_inputs, write_counts)

# CPU interpret mode: measured 0-4.82e-5 of max |ref| (M 40); 10x.
CPU_TOL = 5e-4

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (runs the compiled kernel)")

SMALL = gg.TuningConfig(block_n=32, block_k=32)
FP4_SMALL = gg.TuningConfig(block_n=32, block_k=64)  # two K steps at K = 128


@pytest.mark.parametrize("M,sizes", [
    (6, [0, 1, 1, 0, 4]),          # decode, batch 1: a few rows per expert, unused experts
    (40, [7, 0, 20, 3, 6, 4]),     # a group over one 16-row tile (20 rows: two tiles of one matrix)
    (48, [16, 16, 16]),            # groups of exactly one tile
    (30, [3, 9, 0, 0]),            # rows past sum(group_sizes) are 0 (padding rows)
    (1, [0, 1]),                   # a single row
    (64, [0, 0, 0, 0]),            # nothing routed: all zeros
])
def test_interpret_matches_reference(M, sizes):
    x, w, gs = make_inputs(M * 7 + len(sizes), M, 128, 96, sizes)
    got = gg.grouped_gemv(x, w, gs, interpret=True, poison_outputs=True, tuning=SMALL)
    assert_close(got, gg.reference(x, w, gs), CPU_TOL, CPU_DIFFER)


@pytest.mark.parametrize("M,sizes", [(40, [7, 0, 20, 3, 6, 4]), (30, [3, 9, 0, 0]), (6, [0, 1, 1, 0, 4])])
def test_interpret_writes_every_output_once(monkeypatch, M, sizes):
    """Each output element is written by exactly one program: its group's tile, or a zero tile past
    sum(group_sizes)."""
    x, w, gs = make_inputs(M, M, 128, 96, sizes)
    assert (write_counts(monkeypatch, gg, gg.grouped_gemv, x, w, gs, tuning=SMALL) == 1).all()


@pytest.mark.parametrize("M,sizes,scale_dtype", [
    (6, [0, 1, 1, 0, 4], jnp.float8_e8m0fnu),   # decode, batch 1, unused experts
    (40, [7, 0, 20, 3, 6, 4], jnp.float32),      # a group over one 16-row tile
    (30, [3, 9, 0, 0], jnp.float8_e8m0fnu),      # rows past sum(group_sizes) are 0
    (1, [0, 1], jnp.float32),                    # a single row
    (64, [0, 0, 0, 0], jnp.float8_e8m0fnu),      # nothing routed: all zeros
], ids=["decode", "ragged", "padding", "one_row", "empty"])
def test_fp4_interpret_matches_reference(M, sizes, scale_dtype):
    """FP4 weights (every code, scales 2^-8 .. 2^-3 per 1 x 32 block) dequantised in the kernel against the
    reference on the whole dequantised experts (measured 0 apart: the same bf16 weights)."""
    x, w, w_scales, gs = fp4_inputs(M * 7 + len(sizes), M, 128, 96, sizes, scale_dtype)
    got = gg.grouped_gemv(x, w, gs, w_scales=w_scales, interpret=True, poison_outputs=True, tuning=FP4_SMALL)
    assert got.dtype == jnp.bfloat16
    assert_close(got, gg.reference(x, w, gs, w_scales), CPU_TOL, CPU_DIFFER)


def test_fp4_interpret_writes_every_output_once(monkeypatch):
    x, w, w_scales, gs = fp4_inputs(40, 40, 128, 96, [7, 0, 20, 3, 6, 4], jnp.float8_e8m0fnu)
    counts = write_counts(monkeypatch, gg, gg.grouped_gemv, x, w, gs, w_scales=w_scales, tuning=FP4_SMALL)
    assert (counts == 1).all()


@pytest.mark.parametrize("sizes,block_m", [([0, 1, 1, 0, 4], 16), ([7, 0, 20, 3, 6, 4], 16), ([33, 0, 1], 16),
                                           ([5, 5], 4), ([0, 0, 0], 16)])
def test_tiles_cover_every_row_once_within_its_group(sizes, block_m):
    """tile_of (the kernel's own tile lookup) against a direct enumeration: tiles with work first, in group
    order, then empty ones."""
    n = 2 * (sum(sizes) + 3) + len(sizes)
    g, row0, rows = (np.asarray(a) for a in jax.vmap(lambda t: gg.tile_of(jnp.asarray(sizes, jnp.int32), t, block_m))(
        jnp.arange(n, dtype=jnp.int32)))
    start = np.cumsum(sizes) - sizes
    want = [(gi, start[gi] + j, min(block_m, s - j)) for gi, s in enumerate(sizes) for j in range(0, s, block_m)]
    assert [(int(a), int(b), int(c)) for a, b, c in zip(g, row0, rows) if c > 0] == want
    assert (rows[len(want):] == 0).all() and (rows[: len(want)] > 0).all()


def test_bad_shapes_are_errors():
    x, w, gs = make_inputs(0, 16, 96, 128, [16])
    with pytest.raises(ValueError, match="multiples"):
        gg.grouped_gemv(x, w, gs, tuning=gg.TuningConfig(block_k=64), interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        gg.TuningConfig(block_n=48)
    with pytest.raises(ValueError, match="block_m=8 must be a power of two >= 16"):
        gg.TuningConfig(block_m=8)
    with pytest.raises(ValueError, match="expected x"):
        gg.grouped_gemv(x.astype(jnp.float32), w, gs, interpret=True)


def test_fp4_bad_inputs_are_errors():
    """The checks are expert_rows' (common.check_fp4, tested there in full): one case through this kernel."""
    x, w, w_scales, gs = fp4_inputs(0, 16, 128, 96, [16], jnp.float8_e8m0fnu)
    with pytest.raises(ValueError, match=r"grouped_gemv: x \(16, 128\) bfloat16, w \(1, 96, 64\) int8, w_scales "
                       r"\(1, 96, 2\) float8_e8m0fnu: expected x \[M, K\] bfloat16"):
        gg.grouped_gemv(x, w, gs, w_scales=w_scales[:, :, :2], interpret=True)


@pytest.mark.parametrize("M,N,K", [(6, 4096, 4096), (192, 4096, 2048)])
def test_lowers_for_h100(M, N, K):
    args = (jax.ShapeDtypeStruct((M, K), jnp.bfloat16), jax.ShapeDtypeStruct((256, N, K), jnp.bfloat16),
            jax.ShapeDtypeStruct((256,), jnp.int32))
    assert "triton" in lower_for_h100(gg.grouped_gemv, *args).lower()


@pytest.mark.parametrize("scale_dtype", [jnp.float8_e8m0fnu, jnp.float32], ids=["ue8m0", "fp32"])
def test_fp4_compiles_for_sm90(scale_dtype):
    """A cubin for sm_90 of the FP4 kernel at the Flash decode shape (ue8m0 or fp32 scales: two static
    configurations); bound 120 s as tests/test_kernels_compile.py's."""
    pytest.importorskip("triton")
    [c] = [c for c in kernel_cases.bench_cases("grouped_gemv") if c["name"] == "fp4 gate_up T=8"]
    x, w, gs, w_scales = jax.eval_shape(c["args"], jax.random.PRNGKey(0))
    seconds = compile_for_h100(c["pallas"], x, w, gs, jax.ShapeDtypeStruct(w_scales.shape, scale_dtype))
    print(f"{jnp.dtype(scale_dtype)}: Triton compile for sm_90 {seconds}")
    assert seconds and max(seconds.values()) < 120


@on_gpu
@pytest.mark.parametrize("case", kernel_cases.bench_cases("grouped_gemv"), ids=lambda c: c["name"])
def test_gpu_bench_cases_match_reference(case):
    args = case["args"](jax.random.PRNGKey(0))
    out = jax.jit(functools.partial(case["pallas"], poison_outputs=True))(*args)
    assert_close(out, jax.jit(gg.reference)(*args))


@on_gpu
@pytest.mark.parametrize("case", [c for c in kernel_cases.bench_cases("grouped_gemv") if c["name"].startswith("fp4")],
                         ids=lambda c: c["name"])
def test_gpu_fp4_ptx_equals_bit_arithmetic(case):
    assert_fp4_ptx_equals_bit_arithmetic(case, gg.reference, assert_close)
