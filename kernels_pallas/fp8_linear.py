"""A linear layer on FP8 block-scaled weights, weight-only: bf16 activations, for decode and small batches.

    fp8_linear(x [M, G*K] bf16, w_q [N, K] float8_e4m3fn, w_scale [ceil(N/128), ceil(K/128)] ue8m0 or fp32,
               out_dtype=bf16, groups=G) -> y [M, N] in out_dtype (fp32 accumulate)

Meaning (``reference``): ``y = x @ (w_q * scale)^T``, one power-of-two scale per 128 x 128 block of ``w_q``
(DeepSeek's released FP8 linears; ue8m0 scales are decoded in the kernel, so a step launches no conversion
kernel per linear). With ``groups`` G > 1 the product is block-diagonal: output columns [g*N/G, (g+1)*N/G)
read input columns [g*K, (g+1)*K), the attention output projection ``o_a`` (weight [G * r_o, in_per_group],
x [..., G, in_per_group] flattened).
``reference`` is the plain-JAX path: the weight dequantised to x's dtype (exact: a 4-bit significand times a
power of two, for every scale from 2^-124 to 2^119) and one dot with fp32 accumulation.

Why: decode reads every weight once per step, so its time is the weight bytes over the copy rate. Kept in
e4m3, a linear is half its bf16 bytes; XLA's own paths, the dequantise-then-dot of ``reference`` and an
FP8 x FP8 ``dot``, fall well short of that rate at 1-32 rows (issue 26).

Backend: the Pallas **Triton** backend, like ``expert_rows``: masked loads, ``jnp.dot`` on 16-row register
tiles (Triton's ``mma`` minimum; ``wgmma`` would need 64 rows that decode does not have).

Design:
* Grid ``(cdiv(N, block_n), split_k, cdiv(M, block_m))``. A program owns ``block_n`` <= 128 weight rows, so
  one scale row, and a contiguous run of the K blocks; it walks them one 128-column scale block per step
  (Triton software-pipelines ``num_stages`` weight loads): the e4m3 tile ``[block_n, 128]`` is converted to
  bf16 in registers (exact), ``x[block_m, 128] @ w^T`` accumulates in fp32 and the partial product is
  multiplied by the block's scale (a power of two: exact), so the weight is read once and never written.
  The next step's scale is loaded one step ahead (a loop carry), so its latency does not stall the step.
* ``choose_tuning`` holds all of a decode batch's rows in one tile (up to 64), so the weight is streamed
  once, and splits K when the column blocks alone are too few to occupy every SM (q_a's 1024 outputs are 16
  blocks of 64 on 132 SMs). Split programs write fp32 partial sums ``[split_k, M, N]`` that one XLA
  reduction adds; unsplit programs write the output dtype directly.
* N and K need not be multiples of the blocks: rows past N and columns past K are masked loads of 0 and
  masked stores, the masks static where the blocks divide the matrix (every FP8 linear of the released models
  has N and K multiples of 128: unmasked weight loads). A ragged K narrows the weight loads to the widest
  power of two dividing K (16 bytes at K = 400, 4 at K = 300).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .common import NUM_SMS, check_tuning, e8m0_operand, e8m0_values, triton_call

__all__ = ["fp8_linear", "reference", "dequantize", "grouped_linear", "TuningConfig", "choose_tuning", "BLOCK"]

BLOCK = 128  # rows and columns of w_q one scale covers
OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def dequantize(w_q: jax.Array, w_scale: jax.Array, dtype) -> jax.Array:
    """w_q e4m3 [N, K], w_scale [ceil(N/128), ceil(K/128)] -> w_q * its block's scale [N, K] in ``dtype``."""
    N, K = w_q.shape
    scale = jnp.repeat(jnp.repeat(w_scale.astype(jnp.float32), BLOCK, axis=0), BLOCK, axis=1)[:N, :K]
    return (w_q.astype(jnp.float32) * scale).astype(dtype)


def grouped_linear(x, w, *, out_dtype=jnp.bfloat16, groups: int = 1):
    """x [M, G*K], w [N, K] of one dtype -> [M, N] in out_dtype, fp32 accumulation: output columns
    [g*N/G, (g+1)*N/G) from input columns [g*K, (g+1)*K) (G = 1: x @ w^T)."""
    M = x.shape[0]
    N, K = w.shape
    y = jnp.einsum("mgk,gnk->mgn", x.reshape(M, groups, K), w.reshape(groups, N // groups, K),
                   preferred_element_type=jnp.float32)
    return y.reshape(M, N).astype(out_dtype)


def reference(x, w_q, w_scale, *, out_dtype=jnp.bfloat16, groups: int = 1):
    """x [M, G*K], w_q [N, K], w_scale [ceil(N/128), ceil(K/128)] -> [M, N] in out_dtype: the weight
    dequantised to x's dtype, then ``grouped_linear``."""
    return grouped_linear(x, dequantize(w_q, w_scale, x.dtype), out_dtype=out_dtype, groups=groups)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """The launch choices of ``fp8_linear``: block_m rows per tile and block_n weight rows per program
    (powers of two >= 16, Triton's smallest tensor-core tile; block_n <= 128, one scale row; both clipped to
    the matrix), split_k programs sharing the K blocks of a column block, Triton's warps and
    software-pipelining stages."""
    block_m: int = 16
    block_n: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        check_tuning(self, blocks=("block_m", "block_n"))
        if self.block_n > BLOCK:
            raise ValueError(f"fp8_linear TuningConfig: block_n={self.block_n}: expected at most {BLOCK} (one "
                             f"scale row per program)")


def choose_tuning(rows: int, out: int, in_: int) -> TuningConfig:
    """All ``rows`` in one tile (up to 64; more are streamed per 64-row tile), 64-row column blocks, and K
    split in powers of two while the programs number fewer than the SMs and each keeps >= 2 K blocks.
    ``in_``: K of one group."""
    block_m = min(64, max(16, pl.next_power_of_2(rows)))
    block_n = 64
    programs = pl.cdiv(out, block_n) * pl.cdiv(rows, block_m)
    k_blocks = pl.cdiv(in_, BLOCK)
    split = 1
    while programs * split < NUM_SMS and 2 * split <= k_blocks // 2:
        split *= 2
    return TuningConfig(block_m=block_m, block_n=block_n, split_k=split)


def _kernel(x_ref, w_ref, s_ref, o_ref, *, block_m: int, block_n: int, steps: int, n_per_group: int,
            mask_k: bool):
    """x_ref [M, G*K] bf16; w_ref [N, K] e4m3; s_ref [cdiv(N,128), cdiv(K,128)] (``e8m0_operand``'s); o_ref
    [S, M, N].

    Program (n, j, r): weight rows n*bn .. n*bn + bn - 1 (one group's, one scale row's) against x rows
    r*bm .. r*bm + bm - 1 over K blocks j*steps .. min((j+1)*steps, cdiv(K, 128)) - 1 (never empty);
    stores o_ref[j, those rows, those columns]."""
    n, j, r = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    M = x_ref.shape[0]
    N, K = w_ref.shape
    n0, m0 = n * block_n, r * block_m
    x0 = n0 // n_per_group * K  # the group's first input column
    s_row = n0 // BLOCK
    lo = j * steps
    hi = jnp.minimum(lo + steps, pl.cdiv(K, BLOCK))
    rows_ok = (m0 + jnp.arange(block_m, dtype=jnp.int32) < M)[:, None]  # x rows and output rows
    outs_ok = n0 + jnp.arange(block_n, dtype=jnp.int32) < N  # weight rows and output columns
    k_lane = jnp.arange(BLOCK, dtype=jnp.int32)[None, :]

    def step(kb, carry):
        acc, scale = carry
        # one step ahead: its latency hides behind this step
        next_scale = e8m0_values(s_ref[s_row, jnp.minimum(kb + 1, hi - 1)])
        k0 = pl.multiple_of(kb * BLOCK, BLOCK)
        k_ok = k0 + k_lane < K if mask_k else True
        xs = plt.load(x_ref.at[pl.ds(m0, block_m), pl.ds(x0 + k0, BLOCK)], mask=rows_ok & k_ok, other=0)
        w = w_ref.at[pl.ds(n0, block_n), pl.ds(k0, BLOCK)]
        ws = plt.load(w, mask=outs_ok[:, None] & k_ok, other=0.0) if mask_k or N % block_n else w[...]
        part = lax.dot_general(xs, ws.astype(xs.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return acc + part * scale, next_scale

    acc, _ = lax.fori_loop(lo, hi, step, (jnp.zeros((block_m, block_n), jnp.float32), e8m0_values(s_ref[s_row, lo])))
    plt.store(o_ref.at[j, pl.ds(m0, block_m), pl.ds(n0, block_n)], acc.astype(o_ref.dtype),
              mask=rows_ok & outs_ok[None, :])


def _check_inputs(x, w_q, w_scale, out_dtype, groups: int) -> None:
    """One-line errors for inputs outside the contract."""
    if x.ndim != 2 or w_q.ndim != 2 or x.shape[1] != groups * w_q.shape[1] or 0 in (*x.shape, *w_q.shape):
        raise ValueError(f"fp8_linear: x {x.shape}, w_q {w_q.shape}, groups={groups}: expected x [M, groups*K] "
                         f"and w_q [N, K], none empty")
    if (x.dtype != jnp.bfloat16 or w_q.dtype != jnp.float8_e4m3fn
            or w_scale.dtype not in (jnp.float8_e8m0fnu, jnp.float32)):
        raise ValueError(f"fp8_linear: x {x.dtype}, w_q {w_q.dtype}, w_scale {w_scale.dtype}: expected bfloat16, "
                         f"float8_e4m3fn and float8_e8m0fnu or float32")
    N, K = w_q.shape
    want = (pl.cdiv(N, BLOCK), pl.cdiv(K, BLOCK))
    if w_scale.shape != want:
        raise ValueError(f"fp8_linear: w_scale {w_scale.shape} for w_q {w_q.shape}: expected {want}")
    if jnp.dtype(out_dtype) not in OUT_DTYPES:
        raise ValueError(f"fp8_linear: out_dtype {jnp.dtype(out_dtype)}: expected bfloat16 or float32")
    if groups < 1 or N % groups or (groups > 1 and (N // groups) % 16):
        raise ValueError(f"fp8_linear: groups={groups} for N={N}: expected a divisor of N leaving a multiple of 16 "
                         f"outputs per group")


@functools.partial(jax.jit, static_argnames=("out_dtype", "groups", "tuning", "interpret", "poison_outputs"))
def fp8_linear(x: jax.Array, w_q: jax.Array, w_scale: jax.Array, *, out_dtype=jnp.bfloat16, groups: int = 1,
               tuning: TuningConfig | None = None, interpret: bool = False,
               poison_outputs: bool = False) -> jax.Array:
    """x [M, groups*K] bf16, w_q [N, K] e4m3, w_scale [cdiv(N,128), cdiv(K,128)] ue8m0 or fp32 -> [M, N] in out_dtype
    (bfloat16 or float32). tuning: None for ``choose_tuning(M, N, K)``. poison_outputs: testing aid (outputs
    start as NaN, so an unwritten element fails)."""
    _check_inputs(x, w_q, w_scale, out_dtype, groups)
    M = x.shape[0]
    N, K = w_q.shape
    tuning = tuning or choose_tuning(M, N, K)
    block_m = min(tuning.block_m, max(16, pl.next_power_of_2(M)))
    n_per_group = N // groups
    # a program's rows lie in one group: with groups, block_n divides the group's outputs
    block_n = min(tuning.block_n, max(16, pl.next_power_of_2(N)) if groups == 1 else n_per_group & -n_per_group)
    k_blocks = pl.cdiv(K, BLOCK)
    steps = pl.cdiv(k_blocks, min(tuning.split_k, k_blocks))
    split = pl.cdiv(k_blocks, steps)  # every split has K blocks
    part_dtype = jnp.dtype(out_dtype) if split == 1 else jnp.float32
    parts = triton_call(
        functools.partial(_kernel, block_m=block_m, block_n=block_n, steps=steps, n_per_group=n_per_group,
                          mask_k=K % BLOCK != 0),
        [x, w_q, e8m0_operand(w_scale)],
        grid=(pl.cdiv(N, block_n), split, pl.cdiv(M, block_m)),
        in_specs=[pl.BlockSpec(a.shape, lambda n, j, r: (0, 0)) for a in (x, w_q, w_scale)],
        out_shape=[jax.ShapeDtypeStruct((split, M, N), part_dtype)],
        out_specs=[pl.BlockSpec((split, M, N), lambda n, j, r: (0, 0, 0))],
        num_warps=tuning.num_warps, num_stages=tuning.num_stages, interpret=interpret,
        name=f"dsv4_fp8_linear_m{block_m}_n{block_n}_s{split}", poison=poison_outputs)[0]
    return parts[0] if split == 1 else parts.sum(axis=0).astype(out_dtype)
