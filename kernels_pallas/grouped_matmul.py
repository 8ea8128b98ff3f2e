"""Grouped (ragged) matmul for the routed experts: rows sorted by expert, each group times its expert's matrix.

    grouped_matmul(x [M, K], w [G, N, K], group_sizes [G] int32) -> [M, N] in x's dtype (fp32 accumulate)

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

from .common import NUM_SMS, check_tuning, dequantize_fp4, poison_like

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
    deep; N and K multiples of block_n and block_k) and the TMA loads in flight per tile."""
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4

    def __post_init__(self):
        check_tuning(self)


def choose_tuning() -> TuningConfig:
    """One choice for every shape."""
    return TuningConfig()


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, tuning: TuningConfig | None = None,
                   interpret: bool = False, poison_outputs: bool = False) -> jax.Array:
    """x [M, K] (rows sorted by group), w [G, N, K], group_sizes [G] int32 -> [M, N] in x's dtype. tuning: None
    for ``choose_tuning()``. poison_outputs: testing aid; the kernel writes into a NaN-filled buffer, so a row
    it fails to write stays NaN (interpret mode's fresh outputs are NaN already; the GPU's are not)."""
    tuning = tuning or choose_tuning()
    block_m, block_n, block_k = tuning.block_m, tuning.block_n, tuning.block_k
    M, K = x.shape
    G, N, K2 = w.shape
    if K2 != K or x.dtype != w.dtype or group_sizes.shape != (G,):
        raise ValueError(f"grouped_matmul: x {x.shape} {x.dtype}, w {w.shape} {w.dtype}, group_sizes "
                         f"{group_sizes.shape}: expected x [M, K], w [G, N, K] of one dtype, group_sizes [G]")
    if K % block_k or N % block_n:
        raise ValueError(f"grouped_matmul: K={K} and N={N} must be multiples of block_k={block_k} and "
                         f"block_n={block_n}")
    grid_m, grid_n = pl.cdiv(M, block_m) + G - 1, N // block_n

    def body(group_ref, block_ref, first_row_ref, n_rows_ref, x_ref, w_ref, out_ref):
        # Work item i = (row tile i // grid_n, column block i % grid_n); tiles with work come first, so
        # the SMs share them evenly and the empty tail costs four scalar loads each.
        @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
        def _tile(info: plgpu.NDLoopInfo):
            mi, ni = lax.div(info.index[0], grid_n), lax.rem(info.index[0], grid_n)
            group, block, first_row, n_rows = group_ref[mi], block_ref[mi], first_row_ref[mi], n_rows_ref[mi]

            @pl.when(n_rows > 0)
            def _():
                def acc_scope(acc_ref):
                    plgpu.emit_pipeline(
                        lambda _, x_smem, w_smem: plgpu.wgmma(acc_ref, x_smem, w_smem.transpose((1, 0))),
                        grid=(K // block_k,),
                        in_specs=[plgpu.BlockSpec((block_m, block_k), lambda k: (block, k), delay_release=1),
                                  plgpu.BlockSpec((block_n, block_k), lambda k: (ni, k), delay_release=1)],
                        max_concurrent_steps=tuning.max_concurrent_steps,
                    )(x_ref, w_ref.at[group])
                    return acc_ref[...]

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

    args = (*tile_table(group_sizes.astype(jnp.int32), M, block_m), x, w)
    if poison_outputs:
        # Mosaic GPU kernels take no aliases: a Ref operand is the body's out_ref and is written in place.
        out_ref = jax.new_ref(poison_like((M, N), x.dtype))
        kernel(())(*args, out_ref)
        out = out_ref[...]
    else:
        out = kernel(jax.ShapeDtypeStruct((M, N), x.dtype))(*args)
    # Rows past sum(group_sizes) belong to no tile; the reference defines them as 0.
    return jnp.where(jnp.arange(M)[:, None] < jnp.sum(group_sizes), out, 0).astype(x.dtype)
