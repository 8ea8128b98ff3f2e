"""A dense layer's product for a few rows (a decode step's tokens): each weight row read once, on CUDA cores.

    gemv(x [M, K], w [N, K], *, out_dtype) -> [M, N], fp32 accumulation, M <= MAX_ROWS

Meaning (``reference``): ``x @ w^T``, ``basic.linear``.

Why: at batch 1 a decode step's dense layers (attention projections, the shared expert, the indexer's and
compressor's projections) are matrix-vector products of 0.5-64 MB. XLA runs them as row reductions at
~66-70% of copy rate below ~16 MB (docs/performance.md, run 22), and the tensor-core ``expert_rows`` kernel
run on one matrix reached half of that (run 24): one row pays for a 16-row ``mma`` tile, and
``N / block_n`` programs walking all of K left most SMs idle.

Backend: the Pallas **Triton** backend. Grid ``(N / block_n,)``: a program owns ``block_n`` weight rows (a
few KB to 32 KB of loads in flight at once) and multiplies them elementwise with each of the M rows of x
in fp32, ``block_k`` columns at a time (the walk over K is unrolled at trace time, so every load of the
program can be issued before the first product); one sum over the columns at the end.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .common import triton_call

__all__ = ["gemv", "reference", "supported", "MAX_ROWS", "bench_cases"]

MAX_ROWS = 4  # one fp32 accumulator tile per row of x lives in registers


def reference(x, w, *, out_dtype=None):
    """x [M, K] @ w [N, K]^T -> [M, N] in out_dtype (default x's), fp32 accumulation."""
    out = jnp.einsum("mk,nk->mn", x, w, preferred_element_type=jnp.float32)
    return out.astype(out_dtype or x.dtype)


def supported(m: int, n: int, k: int) -> bool:
    """Shapes the kernel takes: a few rows; N and K powers of two (Triton block shapes), K >= 16."""
    return 1 <= m <= MAX_ROWS and n >= 1 and not n & (n - 1) and k >= 16 and not k & (k - 1)


def default_blocks(n: int, k: int) -> tuple[int, int]:
    """(block_n, block_k): ~16K weight elements (32 KB of bf16) per program, at most 1024 columns per step."""
    block_k = min(k, 1024)
    return min(n, max(1, 16384 // k)), block_k


def _kernel(x_ref, w_ref, o_ref, *, block_k: int):
    """x_ref [M, K]; w_ref [bn, K] (this program's rows); o_ref [M, bn]."""
    M, K = x_ref.shape
    acc = [jnp.zeros((w_ref.shape[0], block_k), jnp.float32) for _ in range(M)]
    for k0 in range(0, K, block_k):
        w = w_ref[:, pl.ds(k0, block_k)].astype(jnp.float32)
        for m in range(M):
            acc[m] = acc[m] + w * x_ref[pl.ds(m, 1), pl.ds(k0, block_k)].astype(jnp.float32)
    for m in range(M):
        o_ref[pl.ds(m, 1), :] = jnp.sum(acc[m], axis=1)[None, :].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_n", "block_k", "num_warps", "interpret",
                                             "poison_outputs"))
def gemv(x: jax.Array, w: jax.Array, *, out_dtype=None, block_n: int | None = None, block_k: int | None = None,
         num_warps: int = 4, interpret: bool = False, poison_outputs: bool = False) -> jax.Array:
    """x [M, K], w [N, K] of one dtype, M <= MAX_ROWS -> [M, N] in out_dtype (default x's). block_n / block_k
    (powers of two dividing N / K; default ``default_blocks``). poison_outputs: testing aid (outputs start
    as NaN)."""
    (M, K), (N, K2) = x.shape, w.shape
    if K2 != K or x.dtype != w.dtype or not supported(M, N, K):
        raise ValueError(f"gemv: x {x.shape} {x.dtype}, w {w.shape} {w.dtype}: expected x [M, K], w [N, K] of one "
                         f"dtype, 1 <= M <= {MAX_ROWS}, N and K powers of two, K >= 16")
    dn, dk = default_blocks(N, K)
    bn, bk = block_n or dn, block_k or dk
    if bn & (bn - 1) or bk & (bk - 1) or N % bn or K % bk:
        raise ValueError(f"gemv: block_n={bn}, block_k={bk}: expected powers of two dividing N={N}, K={K}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    return triton_call(
        functools.partial(_kernel, block_k=bk), [x, w],
        grid=(N // bn,),
        in_specs=[pl.BlockSpec((M, K), lambda n: (0, 0)), pl.BlockSpec((bn, K), lambda n: (n, 0))],
        out_shape=[jax.ShapeDtypeStruct((M, N), out_dtype)],
        out_specs=[pl.BlockSpec((M, bn), lambda n: (0, n))],
        num_warps=num_warps, num_stages=1, interpret=interpret, name=f"dsv4_gemv_n{bn}_k{bk}",
        poison=poison_outputs)[0]


# ----------------------------------------------------------------------------------------------------------
# Benchmarks (scripts/bench_kernels.py)
# ----------------------------------------------------------------------------------------------------------


def bench_cases():
    """The dense GEMVs of a batch-1 decode step of the Flash-width slice, one token, against XLA's. The timing
    loop re-reads one matrix, so those under the H200's 50 MB L2 may be served partly from it: the in-model
    profile (bench_generate --profile) is the measure that counts."""
    def case(n, k, name):
        def args(key):
            kx, kw = jax.random.split(key)
            return (jax.random.normal(kx, (1, k), jnp.bfloat16),
                    (0.02 * jax.random.normal(kw, (n, k))).astype(jnp.bfloat16))

        return {"name": name, "shapes": f"M=1 N={n} K={k}", "args": args, "reference": reference, "pallas": gemv,
                "bytes": 2 * (k + n * k + n), "flops": 2 * n * k}

    return [case(2048, 4096, "shared gate T=1"), case(4096, 2048, "shared down T=1"), case(1024, 4096, "q_a T=1"),
            case(512, 4096, "kv T=1"), case(8192, 1024, "indexer q_b T=1"), case(32768, 1024, "q_b T=1"),
            case(4096, 8192, "o_b T=1")]
