"""Few-rows grouped matmul for decode's routed experts (kernels_pallas/grouped_gemv.py) against ragged_dot.

CPU: the Triton kernel in Pallas interpret mode, outputs poisoned (NaN) before the run, on fresh random
inputs per case; the tile table against a direct enumeration; a CUDA lowering check at the Flash decode
shapes. GPU (skipped elsewhere): the compiled kernel at real sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.moe import routed_experts
from kernels_pallas import grouped_gemv as gg
from kernels_pallas.testing import lower_for_h100

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (runs the compiled kernel)")

SMALL = dict(block_n=32, block_k=32)


def make_inputs(seed, M, K, N, sizes):
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (M, K), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (len(sizes), N, K), jnp.float32).astype(jnp.bfloat16)
    return x, w, jnp.asarray(sizes, jnp.int32)


def assert_close(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), "kernel left unwritten (NaN) rows"
    np.testing.assert_allclose(out, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


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
    got = gg.grouped_gemv(x, w, gs, interpret=True, poison_outputs=True, **SMALL)
    assert_close(got, gg.reference(x, w, gs))


@pytest.mark.parametrize("sizes,block_m", [([0, 1, 1, 0, 4], 16), ([7, 0, 20, 3, 6, 4], 16), ([33, 0, 1], 16),
                                           ([5, 5], 4), ([0, 0, 0], 16)])
def test_group_tiles_cover_every_row_once_within_its_group(sizes, block_m):
    M = sum(sizes) + 3
    table = np.asarray(gg.group_tiles(jnp.asarray(sizes, jnp.int32), M, block_m))
    start = np.cumsum(sizes) - sizes
    want = [(g, start[g] + j, min(block_m, s - j)) for g, s in enumerate(sizes) for j in range(0, s, block_m)]
    live = [tuple(int(v) for v in col) for col in table.T if col[2] > 0]
    assert live == want
    assert (table[2, len(want):] == 0).all(), "tiles with work must come first"


def test_bad_shapes_are_errors():
    x, w, gs = make_inputs(0, 16, 96, 128, [16])
    with pytest.raises(ValueError, match="multiples"):
        gg.grouped_gemv(x, w, gs, block_k=64, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        gg.grouped_gemv(x, w, gs, block_n=48, interpret=True)
    with pytest.raises(ValueError, match="expected x"):
        gg.grouped_gemv(x.astype(jnp.float32), w, gs, interpret=True)


@pytest.mark.parametrize("M,N,K", [(6, 4096, 4096), (192, 4096, 2048)])
def test_lowers_for_h100(M, N, K):
    args = (jax.ShapeDtypeStruct((M, K), jnp.bfloat16), jax.ShapeDtypeStruct((256, N, K), jnp.bfloat16),
            jax.ShapeDtypeStruct((256,), jnp.int32))
    assert "triton" in lower_for_h100(gg.grouped_gemv, *args).lower()


def test_moe_decode_kernel_path_matches_xla_in_interpret_mode():
    """routed_experts with fewer routed rows than experts (decode) takes this kernel on the pallas path."""
    T, k, E, d, F = 2, 3, 8, 64, 32
    key = jax.random.split(jax.random.PRNGKey(5), 4)
    x = jax.random.normal(key[0], (T, d), jnp.float32).astype(jnp.bfloat16)
    idx = jax.random.randint(key[1], (T, k), 0, E)
    weights = jax.random.uniform(key[2], (T, k))
    gate_up = (0.1 * jax.random.normal(key[3], (E, 2 * F, d))).astype(jnp.bfloat16)
    down = (0.1 * jax.random.normal(key[0], (E, d, F))).astype(jnp.bfloat16)
    want = routed_experts(x, idx, weights, gate_up, down, 10.0)
    got = routed_experts(x, idx, weights, gate_up, down, 10.0, kernels="pallas")
    assert_close(got, want)


@on_gpu
@pytest.mark.parametrize("case", gg.bench_cases(), ids=lambda c: c["name"])
def test_gpu_bench_cases_match_reference(case):
    x, w, gs = case["args"](jax.random.PRNGKey(0))
    assert_close(jax.jit(gg.grouped_gemv)(x, w, gs), jax.jit(gg.reference)(x, w, gs))
