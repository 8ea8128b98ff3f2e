"""Grouped matmul for few rows per group (the routed experts of a decode step), streaming each used matrix once.

    grouped_gemv(x [M, K], w [G, N, K], group_sizes [G] int32) -> [M, N] in x's dtype (fp32 accumulate)
    grouped_gemv(x [M, K] bf16, w [G, N, K/2] int8, group_sizes, w_scales=[G, N, K/32] ue8m0 or fp32) -> [M, N] bf16

The same contract as ``grouped_matmul`` (rows sorted by group; rows past ``sum(group_sizes)`` are 0; with
``w_scales`` the released FP4 experts, kernels_pallas/common.py), and the same reference,
``jax.lax.ragged_dot_general`` (``grouped_matmul.reference``, FP4 weights dequantised first). This kernel is for
the decode shapes, where a step routes ``batch x 6`` rows over 256 experts: 1-3 rows per used expert, so the
work is reading the used experts' weights (48 MB each) and the matmul is a matrix-vector product in all but name.

Why not the other two paths:
* XLA (``moe._gathered_experts``) gathers the picked matrices ``gate_up[idx]`` into a new buffer and then
  multiplies: the expert bytes are read, written and read again, and a matrix picked by two rows is copied
  twice. ``ragged_dot_general`` on GPU computes every row against every group (dense).
* The Mosaic GPU ``grouped_matmul`` tiles rows by 64-128 (``wgmma``'s minimum M is 64): at 1-3 rows per
  expert a tile is almost all padding, and its row tiles straddle group boundaries, so a matrix can be
  streamed once per tile it touches.

Backend: the Pallas **Triton** backend, like the attention kernels: masked row loads and stores at a
data-dependent row offset (no TMA store ladder), ``jnp.dot`` on registers with 16-row tiles (Triton's
``mma`` minimum; ``wgmma`` would need 64).

Design:
* Every group is cut into tiles of ``block_m`` rows that start at the group's first row, so a tile never spans
  two groups and a matrix used by r rows is streamed ``cdiv(r, block_m)`` times: once in decode. Each program
  finds its own tile from ``group_sizes`` (``tile_of``: a cumulative sum and a few sums over the [G] vector, in
  registers). A tile table built by XLA before the kernel (cumulative sums, a search, a stack) cost small
  kernels in every MoE layer (docs/performance.md, Kernel design notes). The static tile count is
  ``cdiv(M, block_m) + min(G, M)`` (each non-empty group adds at most one partial tile) plus
  ``cdiv(M, block_m)`` tiles that zero the rows past ``sum(group_sizes)``; the rest exit at once.
* Grid ``(N / block_n, tiles)``: the column block is the fastest axis, so the programs of one tile (one
  expert's matrix, split by columns) run side by side. A program walks K in ``block_k`` steps (Triton
  software-pipelines ``num_stages`` loads): ``x[16, bk] @ w[g, bn, bk]^T`` into an fp32 ``[16, bn]`` register
  tile, then one masked store of its rows. A tile without rows reads ``group_sizes`` and exits.
* FP4: a step reads ``[block_n, block_k / 2]`` bytes and ``[block_n, block_k / 32]`` scales and turns them into
  the bf16 tile in registers (``common.fp4_tile``) before the same dot: the weights stay packed in HBM.
  ``fp4_ptx``: the same values decoded by inline PTX (the default on a GPU; interpret mode cannot run PTX).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .common import check_fp4_ptx, check_tuning, e8m0_operand, expert_blocks, expert_tile, triton_call
from .grouped_matmul import reference

__all__ = ["grouped_gemv", "tile_of", "reference", "TuningConfig", "choose_tuning"]


def tiles_per_group(group_sizes: jax.Array, block_m: int) -> jax.Array:
    """[G] int32: cdiv(size_g, block_m), the tiles group g is cut into."""
    return (group_sizes + block_m - 1) // block_m


def tile_of(group_sizes: jax.Array, t, block_m: int):
    """group_sizes [G] int32, tile index t -> (group, first row, rows) of tile t (all int32 scalars).

    Group g (rows start_g .. start_g + size_g - 1) is cut into tiles j = 0 .. cdiv(size_g, block_m) - 1 with
    first row start_g + j * block_m and min(block_m, size_g - j * block_m) rows; the groups' tiles follow
    each other in group order. Past the last of them: group G, rows 0. Plain jnp on a [G] vector, so the
    kernel computes its own tile (G a power of two there), and tests call it directly.
    """
    G = group_sizes.shape[0]
    per_group = tiles_per_group(group_sizes, block_m)
    g = jnp.arange(G, dtype=jnp.int32)
    group = jnp.sum((jnp.cumsum(per_group) <= t).astype(jnp.int32))
    before = g < group
    j = t - jnp.sum(jnp.where(before, per_group, 0))
    size = jnp.sum(jnp.where(g == group, group_sizes, 0))
    first_row = jnp.sum(jnp.where(before, group_sizes, 0)) + j * block_m
    return group, first_row, jnp.clip(size - j * block_m, 0, block_m)


def _kernel(sizes_ref, x_ref, w_ref, *refs, block_m: int, block_k: int, ptx: bool):
    """sizes_ref [G] int32; x_ref [M, K]; w_ref [G, bn, K] or FP4 [G, bn, K/2] (this program's column block);
    then for FP4 s_ref [G, bn, K/32]; o_ref [M, bn].

    Tile t < tiles_with_work multiplies its rows; the tiles after those write the zero rows past
    sum(group_sizes), block_m at a time."""
    *s_ref, o_ref = refs
    s_ref = s_ref[0] if s_ref else None
    t = pl.program_id(1)
    sizes = sizes_ref[...]
    group, row0, n_rows = tile_of(sizes, t, block_m)
    M, K = x_ref.shape
    G, bn = w_ref.shape[0], o_ref.shape[1]
    work_tiles = jnp.sum(tiles_per_group(sizes, block_m))

    @pl.when(n_rows > 0)
    def _():
        rows = row0 + jnp.arange(block_m, dtype=jnp.int32)
        live = rows < row0 + n_rows
        w_group = jnp.minimum(group, G - 1)

        def step(i, acc):
            k0 = pl.multiple_of(i * block_k, block_k)
            xs = plt.load(x_ref.at[pl.ds(row0, block_m), pl.ds(k0, block_k)], mask=live[:, None], other=0)
            ws = expert_tile(w_ref, s_ref, w_group, i, block_k, ptx)
            return acc + lax.dot_general(xs, ws, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, K // block_k, step, jnp.zeros((block_m, bn), jnp.float32))
        plt.store(o_ref.at[pl.ds(row0, block_m), :], acc.astype(o_ref.dtype), mask=live[:, None])

    @pl.when(t >= work_tiles)
    def _():
        zero0 = jnp.sum(sizes) + (t - work_tiles) * block_m
        rows = zero0 + jnp.arange(block_m, dtype=jnp.int32)
        plt.store(o_ref.at[pl.ds(zero0, block_m), :], jnp.zeros((block_m, bn), o_ref.dtype),
                  mask=(rows < M)[:, None])


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """The launch choices of ``grouped_gemv``: block_m rows per tile (a power of two >= 16, Triton's smallest
    tensor-core tile); block_n / block_k the weight tile streamed per step (powers of two >= 16, block_k >= 64
    for FP4, clipped to N / K, so small test models need no tuning); Triton's warps and software-pipelining
    stages."""
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4
    fp4_ptx: bool = False  # FP4 weights decoded by inline PTX (common.fp4_decode_ptx); a GPU only

    def __post_init__(self):
        check_tuning(self, flags=("fp4_ptx",), blocks=("block_m", "block_n", "block_k"))


def choose_tuning(fp4: bool = False, interpret: bool = False) -> TuningConfig:
    """One choice for every shape (the blocks are clipped to the matrix in the kernel); FP4 weights a K step
    twice as deep, 128 bytes a row, decoded by inline PTX on a GPU (faster there, docs/performance.md;
    interpret mode cannot run PTX)."""
    return TuningConfig(block_k=256, fp4_ptx=not interpret) if fp4 else TuningConfig()


@functools.partial(jax.jit, static_argnames=("tuning", "interpret", "poison_outputs"))
def grouped_gemv(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, w_scales: jax.Array | None = None,
                 tuning: TuningConfig | None = None, interpret: bool = False,
                 poison_outputs: bool = False) -> jax.Array:
    """x [M, K] (rows sorted by group), w [G, N, K], group_sizes [G] int32 -> [M, N] in x's dtype; with
    ``w_scales`` [G, N, K/32] (ue8m0 or fp32) FP4 weights w int8 [G, N, K/2] and bf16 x.

    tuning: None for ``choose_tuning``. poison_outputs: testing aid (outputs start as NaN, so an unwritten
    row fails).
    """
    fp4 = w_scales is not None
    tuning = tuning or choose_tuning(fp4, interpret)
    ptx = fp4 and tuning.fp4_ptx
    check_fp4_ptx("grouped_gemv", ptx, interpret)
    block_m = tuning.block_m
    M, K = x.shape
    G, N, Kw = w.shape
    if group_sizes.shape != (G,):
        raise ValueError(f"grouped_gemv: group_sizes {group_sizes.shape}: expected [G] for w {w.shape}")
    block_n, block_k = expert_blocks("grouped_gemv", x, w, tuning.block_n, tuning.block_k, w_scales)
    # Triton vectors are a power of two long; empty groups past G change no tile.
    sizes = jnp.pad(group_sizes.astype(jnp.int32), (0, pl.next_power_of_2(G) - G))
    # Tiles with work: at most cdiv(M, block_m) + min(G, M) (each non-empty group adds at most one partial
    # tile); then cdiv(M, block_m) more for the zero rows past sum(group_sizes).
    n_tiles = 2 * pl.cdiv(M, block_m) + min(G, M)
    args = [sizes, x, w]
    in_specs = [pl.BlockSpec((sizes.shape[0],), lambda n, t: (0,)), pl.BlockSpec((M, K), lambda n, t: (0, 0)),
                pl.BlockSpec((G, block_n, Kw), lambda n, t: (0, n, 0))]
    if fp4:
        args.append(e8m0_operand(w_scales))
        in_specs.append(pl.BlockSpec((G, block_n, w_scales.shape[2]), lambda n, t: (0, n, 0)))
    return triton_call(
        functools.partial(_kernel, block_m=block_m, block_k=block_k, ptx=ptx), args,
        grid=(N // block_n, n_tiles), in_specs=in_specs,
        out_shape=[jax.ShapeDtypeStruct((M, N), x.dtype)],
        out_specs=[pl.BlockSpec((M, block_n), lambda n, t: (0, n))],
        num_warps=tuning.num_warps, num_stages=tuning.num_stages, interpret=interpret,
        name=f"dsv4_grouped_gemv{'_fp4' * fp4}{'_ptx' * ptx}_m{block_m}_n{block_n}_k{block_k}",
        poison=poison_outputs)[0]
