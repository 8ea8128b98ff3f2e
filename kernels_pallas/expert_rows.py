"""Each row against its own expert matrix: the routed experts of a one-token decode step without sorting.

    expert_rows(x [M or 1, K], w [G, N, K], ids [M] int32) -> [M, N] in x's dtype (fp32 accumulate)
    expert_rows(x [M or 1, K] bf16, w [G, N, K/2] int8, ids, w_scales=[G, N, K/32] ue8m0 or fp32) -> [M, N] bf16

Meaning (``reference``): ``out[r] = w[ids[r]] @ x[r]``, the product ``moe._gathered_experts`` forms by
gathering the picked matrices; a one-row x is every row's (a token against its k experts, without an XLA
kernel broadcasting it to k rows first). With ``w_scales`` the weights are the released FP4 experts (two e2m1
codes a byte, one power-of-two scale per 1 x 32 block; kernels_pallas/common.py), dequantised tile by tile in
registers, never in HBM; ``reference`` dequantises them whole first.

Why: at batch 1 a token's k experts are distinct (top-k, or the hash table's permutation), so each row's matrix
is read once without grouping rows by expert. The grouped kernels need the rows sorted by expert and the group
sizes, then a scatter-add back to tokens: an argsort, a bincount, gathers and a scatter-add, ~6 small XLA
kernels per MoE layer that a batch-1 step, bound by its kernel count (docs/performance.md, Kernel design
notes), pays for six rows. Rows sharing an expert (possible from batch 2 on) would read it once each, so the
MoE layer uses this kernel for one token only.

Backend: the Pallas **Triton** backend, like ``grouped_gemv``: grid ``(N / block_n, M)``, a program
streams ``w[ids[r], n-block, :]`` in ``block_k`` steps against row r (loaded into a 16-row tile, the
tensor-core minimum, the other 15 rows masked to zero) and stores its ``[1, block_n]`` result. FP4: the
step's ``[block_n, block_k / 2]`` bytes and ``[block_n, block_k / 32]`` scales become a bf16 tile by bit
arithmetic (``common.fp4_tile``) before the same dot; a quarter of the bf16 weight bytes. ``fp4_ptx``: the same
values decoded by inline PTX, two weights per 32-bit operation (the default on a GPU; interpret mode cannot run PTX).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .common import (check_fp4_ptx, check_tuning, dequantize_fp4, e8m0_operand, expert_blocks, expert_tile,
                     triton_call)

__all__ = ["expert_rows", "reference", "TuningConfig", "choose_tuning"]

TILE_ROWS = 16  # Triton's smallest tensor-core tile


def reference(x, w, ids, w_scales=None):
    """out[r] = w[ids[r]] @ x[r] (x[0] for a one-row x) in x's dtype, fp32 accumulation; with ``w_scales`` the
    picked FP4 matrices dequantised to x's dtype first."""
    x = jnp.broadcast_to(x, (ids.shape[0], x.shape[1]))
    picked = w[ids] if w_scales is None else dequantize_fp4(w[ids], w_scales[ids], x.dtype)
    return jnp.einsum("mk,mnk->mn", x, picked, preferred_element_type=jnp.float32).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """The launch choices of ``expert_rows``: the weight tile streamed per step (block_n / block_k, powers of
    two >= 16, block_k >= 64 for FP4, clipped to N / K) and Triton's warps and software-pipelining stages."""
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4
    fp4_ptx: bool = False  # FP4 weights decoded by inline PTX (common.fp4_decode_ptx); a GPU only

    def __post_init__(self):
        check_tuning(self, flags=("fp4_ptx",), blocks=("block_n", "block_k"))


def choose_tuning(fp4: bool = False, interpret: bool = False) -> TuningConfig:
    """One choice for every shape (the blocks are clipped to the matrix in the kernel); FP4 weights a K step
    twice as deep, 128 bytes a row, decoded by inline PTX on a GPU (faster there, docs/performance.md;
    interpret mode cannot run PTX)."""
    return TuningConfig(block_k=256, fp4_ptx=not interpret) if fp4 else TuningConfig()


def _kernel(ids_ref, x_ref, w_ref, *refs, block_k: int, ptx: bool):
    """ids_ref [M]; x_ref [M or 1, K]; w_ref [G, bn, K] or FP4 [G, bn, K/2] (this program's column block);
    then for FP4 s_ref [G, bn, K/32]; o_ref [M, bn]."""
    *s_ref, o_ref = refs
    s_ref = s_ref[0] if s_ref else None
    r = pl.program_id(1)
    K = x_ref.shape[1]
    own = jnp.arange(TILE_ROWS, dtype=jnp.int32) == 0  # output row r is tile row 0; the other 15 masked
    xr = 0 if x_ref.shape[0] == 1 else r
    e = ids_ref[r]

    def step(i, acc):
        k0 = pl.multiple_of(i * block_k, block_k)
        xs = plt.load(x_ref.at[pl.ds(xr, TILE_ROWS), pl.ds(k0, block_k)], mask=own[:, None], other=0)
        ws = expert_tile(w_ref, s_ref, e, i, block_k, ptx)
        return acc + lax.dot_general(xs, ws, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, K // block_k, step, jnp.zeros((TILE_ROWS, o_ref.shape[1]), jnp.float32))
    plt.store(o_ref.at[pl.ds(r, TILE_ROWS), :], acc.astype(o_ref.dtype), mask=own[:, None])


@functools.partial(jax.jit, static_argnames=("tuning", "interpret", "poison_outputs"))
def expert_rows(x: jax.Array, w: jax.Array, ids: jax.Array, *, w_scales: jax.Array | None = None,
                tuning: TuningConfig | None = None, interpret: bool = False, poison_outputs: bool = False) -> jax.Array:
    """x [M or 1, K], w [G, N, K], ids [M] int32 in [0, G) -> [M, N] in x's dtype; with ``w_scales`` [G, N, K/32]
    (ue8m0 or fp32) FP4 weights w int8 [G, N, K/2] and bf16 x. tuning: None for ``choose_tuning``.
    poison_outputs: testing aid (outputs start as NaN)."""
    fp4 = w_scales is not None
    tuning = tuning or choose_tuning(fp4, interpret)
    ptx = fp4 and tuning.fp4_ptx
    check_fp4_ptx("expert_rows", ptx, interpret)
    G, N, Kw = w.shape
    M = ids.shape[0] if ids.ndim == 1 else 0
    if not M or x.ndim != 2 or x.shape[0] not in (1, M):
        raise ValueError(f"expert_rows: ids {ids.shape}, x {x.shape}: expected ids [M] and x [M or 1, K]")
    block_n, block_k = expert_blocks("expert_rows", x, w, tuning.block_n, tuning.block_k, w_scales)
    args = [ids.astype(jnp.int32), x, w]
    in_specs = [pl.BlockSpec((M,), lambda n, r: (0,)), pl.BlockSpec(x.shape, lambda n, r: (0, 0)),
                pl.BlockSpec((G, block_n, Kw), lambda n, r: (0, n, 0))]
    if fp4:
        args.append(e8m0_operand(w_scales))
        in_specs.append(pl.BlockSpec((G, block_n, w_scales.shape[2]), lambda n, r: (0, n, 0)))
    return triton_call(
        functools.partial(_kernel, block_k=block_k, ptx=ptx), args,
        grid=(N // block_n, M), in_specs=in_specs,
        out_shape=[jax.ShapeDtypeStruct((M, N), x.dtype)],
        out_specs=[pl.BlockSpec((M, block_n), lambda n, r: (0, n))],
        num_warps=tuning.num_warps, num_stages=tuning.num_stages, interpret=interpret,
        name=f"dsv4_expert_rows{'_fp4' * fp4}{'_ptx' * ptx}_n{block_n}_k{block_k}",
        poison=poison_outputs)[0]
