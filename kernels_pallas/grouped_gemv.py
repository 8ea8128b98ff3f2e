"""Grouped matmul for few rows per group (the routed experts of a decode step), streaming each used matrix once.

    grouped_gemv(x [M, K], w [G, N, K], group_sizes [G] int32) -> [M, N] in x's dtype (fp32 accumulate)

The same contract as ``grouped_matmul`` (rows sorted by group; rows past ``sum(group_sizes)`` are 0), and the
same reference, ``jax.lax.ragged_dot_general`` (``grouped_matmul.reference``). This kernel is for the decode
shapes, where a step routes ``batch x 6`` rows over 256 experts: 1-3 rows per used expert, so the work is
reading the used experts' weights (48 MB each) and the matmul is a matrix-vector product in all but name.

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
* ``group_tiles`` (plain JAX, before the kernel) cuts every non-empty group into tiles of ``block_m`` rows
  that start at the group's first row, so a tile never spans two groups and a matrix used by r rows is
  streamed ``cdiv(r, block_m)`` times: once in decode. The static tile count is ``cdiv(M, block_m) +
  min(G, M)`` (each non-empty group adds at most one partial tile); trailing tiles have 0 rows.
* Grid ``(N / block_n, tiles)``: the column block is the fastest axis, so the programs of one tile (one
  expert's matrix, split by columns) run side by side. A program walks K in ``block_k`` steps (Triton
  software-pipelines ``num_stages`` loads): ``x[16, bk] @ w[g, bn, bk]^T`` into an fp32 ``[16, bn]`` register
  tile, then one masked store of its rows. An empty tile loads three scalars and exits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .common import triton_call
from .grouped_matmul import reference

__all__ = ["grouped_gemv", "group_tiles", "reference", "bench_cases"]


def group_tiles(group_sizes: jax.Array, M: int, block_m: int) -> jax.Array:
    """int32 [3, cdiv(M, block_m) + min(G, M)]: per tile (group, first row, rows); tiles with work first.

    Group g (rows start_g .. start_g + size_g - 1) becomes tiles j = 0 .. cdiv(size_g, block_m) - 1 with
    first row start_g + j * block_m and min(block_m, size_g - j * block_m) rows.
    """
    G = group_sizes.shape[0]
    n_tiles = pl.cdiv(M, block_m) + min(G, M)
    sizes = group_sizes.astype(jnp.int32)
    start = jnp.cumsum(sizes) - sizes
    per_group = (sizes + block_m - 1) // block_m
    tile_end = jnp.cumsum(per_group)
    t = jnp.arange(n_tiles, dtype=jnp.int32)
    # compare_all: one fused comparison; the default binary search is a loop of tiny kernels, one per level.
    group = jnp.clip(jnp.searchsorted(tile_end, t, side="right", method="compare_all"), 0, G - 1)
    j = t - (tile_end[group] - per_group[group])
    rows = jnp.where(t < tile_end[-1], jnp.clip(sizes[group] - j * block_m, 0, block_m), 0)
    return jnp.stack([group, start[group] + j * block_m, rows]).astype(jnp.int32)


def _kernel(tiles_ref, x_ref, w_ref, o_ref, *, block_m: int, block_k: int):
    """tiles_ref [3, T]; x_ref [M, K]; w_ref [G, bn, K] (this program's column block); o_ref [M, bn]."""
    t = pl.program_id(1)
    group, row0, n_rows = tiles_ref[0, t], tiles_ref[1, t], tiles_ref[2, t]
    M, K = x_ref.shape
    bn = w_ref.shape[1]

    @pl.when(n_rows > 0)
    def _():
        rows = row0 + jnp.arange(block_m, dtype=jnp.int32)
        live = rows < row0 + n_rows

        def step(i, acc):
            k0 = pl.multiple_of(i * block_k, block_k)
            xs = plt.load(x_ref.at[pl.ds(row0, block_m), pl.ds(k0, block_k)], mask=live[:, None], other=0)
            ws = w_ref[group, :, pl.ds(k0, block_k)]
            return acc + lax.dot_general(xs, ws, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, K // block_k, step, jnp.zeros((block_m, bn), jnp.float32))
        plt.store(o_ref.at[pl.ds(row0, block_m), :], acc.astype(o_ref.dtype), mask=live[:, None])


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "num_warps", "num_stages",
                                             "interpret", "poison_outputs"))
def grouped_gemv(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, block_m: int = 16, block_n: int = 64,
                 block_k: int = 128, num_warps: int = 4, num_stages: int = 4, interpret: bool = False,
                 poison_outputs: bool = False) -> jax.Array:
    """x [M, K] (rows sorted by group), w [G, N, K], group_sizes [G] int32 -> [M, N] in x's dtype.

    block_m: rows per tile (>= 16, Triton's smallest tensor-core tile); block_n / block_k: the weight tile
    streamed per step (clipped to N / K, so small test models need no tuning). poison_outputs: testing aid (outputs start as NaN, so an unwritten row fails).
    """
    M, K = x.shape
    G, N, K2 = w.shape
    if K2 != K or x.dtype != w.dtype or group_sizes.shape != (G,):
        raise ValueError(f"grouped_gemv: x {x.shape} {x.dtype}, w {w.shape} {w.dtype}, group_sizes "
                         f"{group_sizes.shape}: expected x [M, K], w [G, N, K] of one dtype, group_sizes [G]")
    block_n, block_k = min(block_n, N), min(block_k, K)
    for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"grouped_gemv: {name}={v} must be a power of two >= 16")
    if K % block_k or N % block_n:
        raise ValueError(f"grouped_gemv: K={K} and N={N} must be multiples of block_k={block_k} and "
                         f"block_n={block_n}")
    tiles = group_tiles(group_sizes, M, block_m)
    n_tiles = tiles.shape[1]
    out = triton_call(
        functools.partial(_kernel, block_m=block_m, block_k=block_k), [tiles, x, w],
        grid=(N // block_n, n_tiles),
        in_specs=[pl.BlockSpec((3, n_tiles), lambda n, t: (0, 0)),
                  pl.BlockSpec((M, K), lambda n, t: (0, 0)),
                  pl.BlockSpec((G, block_n, K), lambda n, t: (0, n, 0))],
        out_shape=[jax.ShapeDtypeStruct((M, N), x.dtype)],
        out_specs=[pl.BlockSpec((M, block_n), lambda n, t: (0, n))],
        num_warps=num_warps, num_stages=num_stages, interpret=interpret,
        name=f"dsv4_grouped_gemv_m{block_m}_n{block_n}_k{block_k}", poison=poison_outputs)[0]
    # Rows past sum(group_sizes) belong to no tile; the reference defines them as 0.
    return jnp.where(jnp.arange(M)[:, None] < jnp.sum(group_sizes), out, 0).astype(x.dtype)


def bench_cases():
    """Decode expert shapes (d = 4096, F = 2048, 256 experts, 6 routed per token) at batch 1, 8, 32, 128,
    against ``ragged_dot_general``; ``grouped_matmul``'s cases at the same shapes give the Mosaic GPU kernel's
    time in the same run."""
    from .grouped_matmul import bench_cases as mosaic_cases

    return [{**c, "pallas": grouped_gemv} for c in mosaic_cases() if c["tokens"] <= 128]
