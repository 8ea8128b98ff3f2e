"""Grouped (ragged) matmul for the routed experts: rows sorted by expert, each group times its expert's matrix.

    grouped_matmul(x [M, K], w [G, N, K], group_sizes [G] int32) -> [M, N] in x's dtype (fp32 accumulate)
    grouped_matmul(x [M, K] bf16, w [G, N, K/2] int8, group_sizes, w_scales=[G, N, K/32] ue8m0 or fp32) -> [M, N] bf16

Rows ``sum(group_sizes[:g]) ... sum(group_sizes[:g+1]) - 1`` of ``x`` are multiplied by ``w[g].T``; rows past
``sum(group_sizes)`` are left 0. ``reference`` is ``jax.lax.ragged_dot_general`` (the plain-JAX definition;
on jax 0.11.2 GPU it is lowered densely, every row against every group, which is why this kernel exists).

Backend: **Mosaic GPU** (``pallas.mosaic_gpu``: TMA loads into shared memory, Hopper ``wgmma`` from shared
memory, a persistent grid of one program per SM). A dense tile GEMM is the case Mosaic GPU was built for and
needs none of what keeps the attention kernels on Triton (gathers by index, masked loads). The kernel is
the Hopper ragged dot of ``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`` (Apache-2.0, The JAX
Authors), adapted for MoE inference:

* The weight layout is ours and HF's, ``[G, N, K]`` (``gate_up_proj [E, 2F, d]``, ``down_proj [E, d, F]``),
  so the K-major weight tile is transposed inside ``wgmma`` (no copy of the experts).
* **Empty tiles are skipped, and found without a scan.** The grid enumerates ``cdiv(M, block_m) + G - 1``
  row tiles (a tile may straddle a group boundary). Upstream runs the full K loop for every one of them
  and locates each tile's group with an unrolled scan over all G groups; with 256 experts and the few
  routed rows of a decode step almost all tiles are empty. Here ``tile_table`` (plain JAX, before the
  kernel) lists the tiles with work first, and a tile with no rows does no loads and no matmul, so a
  decode step reads only its distinct experts' weights.
* Output rows are written with the upstream's ladder of power-of-two TMA stores (the row count of a
  tile is only known at run time).

* **FP4 weights** (``w_scales``: the released experts, kernels_pallas/common.py) are dequantised per K step,
  never in HBM: the step's packed ``[block_n, 32]`` bytes arrive by TMA like a bf16 tile, the warpgroup turns
  them into a bf16 ``[block_n, 64]`` tile in registers (``common.fp4_decode``: bit arithmetic, each 16-byte
  scale block times its scales, read from GMEM as ``[block_n]`` vectors since a step's scales are too narrow
  for TMA), stores it to shared memory (two buffers: step k writes one while step k-1's ``wgmma`` reads the
  other) and multiplies it with ``wgmma`` as the bf16 path does. Each byte's two weights land 16 columns
  apart (its low nibbles, then its high ones, per 32-column block), so x's columns are permuted alike
  before the kernel (``interleave_blocks``, one XLA pass over x); a dot product does not depend on the order.

Interpret mode (CPU, tests) runs the same kernel body through Pallas' GPU interpreter.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .common import (FP4_BLOCK, NUM_SMS, check_fp4, check_tuning, dequantize_fp4, e8m0_operand, e8m0_values,
                     fp4_decode, poison_like)

# FP4's K step: whole bytes and scale blocks; at 128 Mosaic GPU (jax 0.11.2) finds no bank-conflict-free store
# of the dequantised tile ("Failed to synthesize a transfer pattern", H200, docs/performance.md).
FP4_BLOCK_K = 64
RAGGED_DN = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def reference(x: jax.Array, w: jax.Array, group_sizes: jax.Array, w_scales: jax.Array | None = None) -> jax.Array:
    """x [M, K], w [G, N, K], group_sizes [G] -> [M, N] in x's dtype (fp32 accumulation); with ``w_scales``
    [G, N, K/32] FP4 weights w int8 [G, N, K/2] (kernels_pallas/common.py) dequantised to x's dtype first."""
    if w_scales is not None:
        w = dequantize_fp4(w, w_scales, x.dtype)
    return lax.ragged_dot_general(x, w, group_sizes, RAGGED_DN, preferred_element_type=jnp.float32).astype(x.dtype)


def tile_table(group_sizes: jax.Array, M: int, block_m: int) -> jax.Array:
    """The row tiles that have work, first: int32 [4, cdiv(M, block_m) + G - 1] rows (group, row block,
    first row of the group inside the block, rows of the group in the block; 0 rows = no work).

    Group g covers row blocks start_g // block_m .. (end_g - 1) // block_m; a block straddling a
    boundary appears once per group. Built in plain JAX before the kernel, so a program finds its tile
    with four scalar loads instead of a scan over all G groups.
    """
    G = group_sizes.shape[0]
    n_tiles = pl.cdiv(M, block_m) + G - 1
    end = jnp.cumsum(group_sizes)
    start = end - group_sizes
    first_block = start // block_m
    count = jnp.where(group_sizes > 0, (end - 1) // block_m + 1 - first_block, 0)
    offset = jnp.cumsum(count) - count
    t = jnp.arange(n_tiles)
    group = jnp.clip(jnp.searchsorted(offset + count, t, side="right", method="compare_all"), 0, G - 1)
    block = first_block[group] + t - offset[group]
    lo = jnp.maximum(start[group], block * block_m)
    hi = jnp.minimum(end[group], block * block_m + block_m)
    n_rows = jnp.where(t < jnp.sum(count), jnp.maximum(hi - lo, 0), 0)
    return jnp.stack([group, block, lo - block * block_m, n_rows]).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """The launch choices of ``grouped_matmul``: the ``wgmma`` tile (block_m rows, block_n columns, block_k
    deep; N and K multiples of block_n and block_k; FP4: block_k 64, block_n a multiple of 64) and the TMA
    loads in flight per tile."""
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4

    def __post_init__(self):
        check_tuning(self)


def choose_tuning() -> TuningConfig:
    """One choice for every shape."""
    return TuningConfig()


def interleave_blocks(x: jax.Array) -> jax.Array:
    """x [M, K] -> [M, K] with the columns of each 32-column block reordered: its 16 even columns, then its 16
    odd ones. The FP4 kernel's dequantised weight tile holds each byte's two columns 16 apart (low nibbles,
    then high ones), so x's columns are permuted alike; a dot product does not depend on the order."""
    M, K = x.shape
    return x.reshape(M, K // FP4_BLOCK, FP4_BLOCK // 2, 2).swapaxes(2, 3).reshape(M, K)


def _dequantize_to_smem(packed_smem, s_ref, dst_smem, *, group, n0, k_block0):
    """FP4 K step: packed_smem int8 [bn, bk/2] (TMA-loaded), s_ref [G, N, K/32] in GMEM -> dst_smem bf16 [bn, bk],
    per 32-column block its 16 low-nibble weights, then its 16 high-nibble ones (``interleave_blocks``' order).

    One scale block (16 bytes a row) at a time: its [bn] scales (a strided GMEM read: a step's scales are too
    narrow for a TMA copy, whose rows are >= 16 bytes) broadcast along the block's columns."""
    bn, half = packed_smem.shape
    parts = []
    for j in range(half // 16):
        scales = plgpu.load(s_ref.at[group, pl.ds(n0, bn), k_block0 + j], layout=plgpu.Layout.WGMMA.reduce(1),
                            optimized=False)
        scales = jnp.broadcast_to(e8m0_values(scales)[:, None], (bn, 16))  # no [bn, 1] arrays in Mosaic GPU
        parts += fp4_decode(packed_smem[:, pl.ds(16 * j, 16)], scales)
    dst_smem[...] = jnp.concatenate(parts, axis=1)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, w_scales: jax.Array | None = None,
                   tuning: TuningConfig | None = None, interpret: bool = False,
                   poison_outputs: bool = False) -> jax.Array:
    """x [M, K] (rows sorted by group), w [G, N, K], group_sizes [G] int32 -> [M, N] in x's dtype; with
    ``w_scales`` [G, N, K/32] (ue8m0 or fp32) FP4 weights w int8 [G, N, K/2] and bf16 x. tuning: None for
    ``choose_tuning()``. poison_outputs: testing aid; the kernel writes into a NaN-filled buffer, so a row it
    fails to write stays NaN (interpret mode's fresh outputs are NaN already; the GPU's are not)."""
    fp4 = w_scales is not None
    tuning = tuning or choose_tuning()
    block_m, block_n, block_k = tuning.block_m, tuning.block_n, tuning.block_k
    M, K = x.shape
    G, N, _ = w.shape
    if fp4:
        check_fp4("grouped_matmul", x, w, w_scales)
    if (not fp4 and (w.shape[2] != K or x.dtype != w.dtype)) or group_sizes.shape != (G,):
        raise ValueError(f"grouped_matmul: x {x.shape} {x.dtype}, w {w.shape} {w.dtype}, group_sizes "
                         f"{group_sizes.shape}: expected x [M, K], w [G, N, K] of one dtype, group_sizes [G]")
    if K % block_k or N % block_n:
        raise ValueError(f"grouped_matmul: K={K} and N={N} must be multiples of block_k={block_k} and "
                         f"block_n={block_n}")
    if fp4 and (block_k != FP4_BLOCK_K or block_n % 64):
        raise ValueError(f"grouped_matmul: FP4 takes block_k={FP4_BLOCK_K} (got {block_k}) and block_n a multiple of "
                         f"64 (got {block_n}): the scales' register rows")
    grid_m, grid_n = pl.cdiv(M, block_m) + G - 1, N // block_n

    def body(group_ref, block_ref, first_row_ref, n_rows_ref, x_ref, w_ref, *refs):
        *s_ref, out_ref = refs

        # Work item i = (row tile i // grid_n, column block i % grid_n); tiles with work come first, so
        # the SMs share them evenly and the empty tail costs four scalar loads each.
        @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
        def _tile(info: plgpu.NDLoopInfo):
            mi, ni = lax.div(info.index[0], grid_n), lax.rem(info.index[0], grid_n)
            group, block, first_row, n_rows = group_ref[mi], block_ref[mi], first_row_ref[mi], n_rows_ref[mi]

            @pl.when(n_rows > 0)
            def _():
                def matmul(acc_ref, w_spec, step):
                    plgpu.emit_pipeline(
                        step, grid=(K // block_k,),
                        in_specs=[plgpu.BlockSpec((block_m, block_k), lambda k: (block, k), delay_release=1), w_spec],
                        max_concurrent_steps=tuning.max_concurrent_steps,
                    )(x_ref, w_ref.at[group])
                    return acc_ref[...]

                def acc_scope(acc_ref):
                    return matmul(acc_ref, plgpu.BlockSpec((block_n, block_k), lambda k: (ni, k), delay_release=1),
                                  lambda _, x_smem, w_smem: plgpu.wgmma(acc_ref, x_smem, w_smem.transpose((1, 0))))

                def fp4_acc_scope(w_bf16, acc_ref):
                    # Step k dequantises into w_bf16[k % 2] while step k-1's wgmma reads the other half, then
                    # waits for that wgmma (which frees step k-1's TMA buffers too) before issuing its own.
                    def step(idx, x_smem, packed_smem):
                        dst = w_bf16.at[lax.rem(idx[0], 2)]
                        _dequantize_to_smem(packed_smem, s_ref[0], dst, group=group, n0=ni * block_n,
                                            k_block0=idx[0] * (block_k // FP4_BLOCK))
                        plgpu.wgmma_wait(0)
                        plgpu.commit_smem()
                        plgpu.wgmma(acc_ref, x_smem, dst.transpose((1, 0)))

                    return matmul(acc_ref, plgpu.BlockSpec((block_n, block_k // 2), lambda k: (ni, k),
                                                           delay_release=1), step)

                if fp4:  # register and shared-memory scopes nest (interpret mode takes no mixed scope)
                    acc = pl.run_scoped(
                        lambda w_bf16: pl.run_scoped(functools.partial(fp4_acc_scope, w_bf16),
                                                     plgpu.ACC((block_m, block_n))),
                        plgpu.SMEM((2, block_n, block_k), jnp.bfloat16))
                else:
                    acc = pl.run_scoped(acc_scope, plgpu.ACC((block_m, block_n)))

                @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((block_m, block_n), dtype=out_ref.dtype))
                def _store(o_smem):
                    o_smem[...] = acc.astype(o_smem.dtype)
                    plgpu.commit_smem()
                    # TMA stores need static row counts: write n_rows as a sum of powers of two.
                    row = first_row
                    size = min(block_m, M)
                    while size > 0:
                        rows = 1 << int(math.log2(size))
                        size //= 2

                        @pl.when(n_rows & rows != 0)
                        def _():
                            plgpu.copy_smem_to_gmem(
                                o_smem.at[pl.ds(row, rows)],
                                out_ref.at[pl.ds(block * block_m + row, rows), pl.ds(ni * block_n, block_n)])

                        row += n_rows & rows
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def kernel(out_type):
        return plgpu.kernel(
            body, out_type=out_type, grid=(NUM_SMS,), grid_names=("sm",),
            compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
            interpret=plgpu.InterpretGPUParams() if interpret else None)

    args = (*tile_table(group_sizes.astype(jnp.int32), M, block_m),
            *((interleave_blocks(x), w, e8m0_operand(w_scales)) if fp4 else (x, w)))
    if poison_outputs:
        # Mosaic GPU kernels take no aliases: a Ref operand is the body's out_ref and is written in place.
        out_ref = jax.new_ref(poison_like((M, N), x.dtype))
        kernel(())(*args, out_ref)
        out = out_ref[...]
    else:
        out = kernel(jax.ShapeDtypeStruct((M, N), x.dtype))(*args)
    # Rows past sum(group_sizes) belong to no tile; the reference defines them as 0.
    return jnp.where(jnp.arange(M)[:, None] < jnp.sum(group_sizes), out, 0).astype(x.dtype)
