"""The mHC Sinkhorn normalisation (DeepSeek-V4 §5) as one Pallas GPU kernel.

    sinkhorn(comb_logits [..., n, n] f32, iters, eps) -> comb [..., n, n] f32

Row softmax (+ eps), a column normalisation, then ``iters - 1`` rounds of row and column normalisation
(each ``x / (sum + eps)``). ``reference`` is ``dsv4_jax.hyper_connection.sinkhorn``, the definition.

Why a kernel: the matrix is n x n = 4 x 4 per token, but XLA launches the dependent row / column sums as
separate kernels (about 21 per Sinkhorn on an H200; 43 fusions on XLA:CPU). Every decoder layer runs two,
and a batch-1 decode step is bound by launches: on the 6-layer Flash-width slice this kernel takes the step
from 705 to 457 kernels (H200 profiles, docs/performance.md), though its own execution (5.7 us at 1 token)
is no shorter than the XLA kernels' sum (4.8 us). Step time in one run's A/B: 2.34 ms with it, 3.82 ms
without; that arm was slower than the 2.35 ms measured without it in an earlier run, so the size of the
gain is not settled.
One program does all iterations for a block of tokens in registers.

Backend: the Pallas **Triton** backend, the simplest possible program: each of the n * n matrix entries is
loaded as its own ``[block_t]`` vector of tokens (a strided masked load), and the whole normalisation is
elementwise arithmetic on those vectors, unrolled at trace time: no reductions, reshapes or matmuls. Tokens
past the end are masked on load and store.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dsv4_jax.hyper_connection import sinkhorn as reference

from .common import triton_call

__all__ = ["reference", "sinkhorn"]


def _kernel(x_ref, o_ref, *, n: int, iters: int, eps: float, block_t: int):
    """x_ref / o_ref [T, n * n] f32 (each token's matrix, row-major); one program owns ``block_t`` tokens."""
    T = x_ref.shape[0]
    start = pl.program_id(0) * block_t
    valid = start + jnp.arange(block_t, dtype=jnp.int32) < T

    def load(i, j):
        return plt.load(x_ref.at[pl.ds(start, block_t), jnp.int32(i * n + j)], mask=valid, other=0.0)

    x = [[load(i, j) for j in range(n)] for i in range(n)]
    # Row softmax, + eps (the reference's jax.nn.softmax: max-shifted exp over the row sum).
    c = []
    for i in range(n):
        m = functools.reduce(jnp.maximum, x[i])
        e = [jnp.exp(v - m) for v in x[i]]
        r = 1.0 / functools.reduce(jnp.add, e)
        c.append([v * r + eps for v in e])

    # One reciprocal per row / column, then multiplies: n IEEE fp32 divides (each a multi-instruction
    # sequence) per half-iteration instead of n * n; each entry stays within 1 ulp of the division.
    def columns(c):
        inv = [1.0 / (functools.reduce(jnp.add, [c[i][j] for i in range(n)]) + eps) for j in range(n)]
        return [[c[i][j] * inv[j] for j in range(n)] for i in range(n)]

    def rows(c):
        inv = [1.0 / (functools.reduce(jnp.add, c[i]) + eps) for i in range(n)]
        return [[c[i][j] * inv[i] for j in range(n)] for i in range(n)]

    c = columns(c)
    for _ in range(iters - 1):
        c = columns(rows(c))
    for i in range(n):
        for j in range(n):
            plt.store(o_ref.at[pl.ds(start, block_t), jnp.int32(i * n + j)], c[i][j], mask=valid)


@functools.partial(jax.jit, static_argnames=("iters", "eps", "block_t", "interpret", "poison_outputs"))
def sinkhorn(comb_logits, iters: int, eps: float, *, block_t: int | None = None, interpret: bool = False,
             poison_outputs: bool = False):
    """Pallas (Triton) Sinkhorn; same arguments and result as ``reference``. block_t: tokens per program
    (power of two >= 16; default up to 128, one per thread of 4 warps). poison_outputs: testing aid (see
    ``common.triton_call``)."""
    *lead, n, n2 = comb_logits.shape
    if n != n2 or iters < 1:
        raise ValueError(f"sinkhorn: expected [..., n, n] logits and iters >= 1, got {comb_logits.shape}, {iters}")
    x = comb_logits.reshape(-1, n * n).astype(jnp.float32)
    T = x.shape[0]
    bt = block_t or min(128, max(16, pl.next_power_of_2(T)))
    if bt < 16 or bt & (bt - 1):
        raise ValueError(f"block_t={bt} must be a power of two >= 16")
    spec = pl.BlockSpec((T, n * n), lambda t: (0, 0))  # whole array; the kernel indexes its token block
    (out,) = triton_call(functools.partial(_kernel, n=n, iters=iters, eps=eps, block_t=bt), [x],
                         grid=(pl.cdiv(T, bt),), in_specs=[spec], out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)],
                         out_specs=[spec], num_warps=max(1, min(4, bt // 32)), num_stages=1, interpret=interpret,
                         name=f"dsv4_sinkhorn_n{n}_i{iters}", poison=poison_outputs)
    return out.reshape(*lead, n, n)


# ----------------------------------------------------------------------------------------------------------
# Benchmarks (scripts/bench_kernels.py)
# ----------------------------------------------------------------------------------------------------------


def _inputs(key, T, n):
    return (jax.random.normal(key, (T, n, n), jnp.float32),)


def bench_cases():
    """Flash mHC (n = 4, 20 iterations): a batch-1 and a batch-128 decode step's tokens, and a 16384-token
    prefill chunk; against the XLA reference (one fusion per row / column sum)."""
    n, iters, eps = 4, 20, 1e-6
    return [{
        "name": f"sinkhorn_T{T}",
        "shapes": {"T": T, "n": n, "iters": iters},
        "args": functools.partial(_inputs, T=T, n=n),
        "kwargs": {"iters": iters, "eps": eps},
        "bytes": 2 * T * n * n * 4,
        "flops": T * iters * 4 * n * n,
        "pallas": sinkhorn,
        "reference": reference,
    } for T in (1, 128, 16384)]
