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
* **Empty tiles are skipped.** The grid enumerates ``cdiv(M, block_m) + G - 1`` row tiles (a tile may
  straddle a group boundary). Upstream runs the full K loop for every one of them; with 256 experts and
  the few routed rows of a decode step almost all of them are empty and each would stream an expert's
  tile for nothing. Here a tile with no rows of its group does no loads and no matmul, so a decode step
  reads only its distinct experts' weights, once per straddling tile.
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

RAGGED_DN = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
NUM_SMS = 132  # H100 SXM and H200


def reference(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, K], w [G, N, K], group_sizes [G] -> [M, N] in x's dtype (fp32 accumulation)."""
    return lax.ragged_dot_general(x, w, group_sizes, RAGGED_DN, preferred_element_type=jnp.float32).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class _Tile:
    """Row tile ``t`` of the grid: which group it serves and which of its rows belong to that group."""

    group: jax.Array
    block: jax.Array        # row block index into x / out
    first_row: jax.Array    # first row of the group inside the block
    n_rows: jax.Array       # rows of the group inside the block (0: empty tile)

    @classmethod
    def locate(cls, group_sizes_ref, num_groups: int, block_m: int, t):
        """Group g owns tiles [start_block(g) + g, end_block(g) + g): one extra tile per boundary."""
        end = group = block = g_start = g_end = jnp.int32(0)
        for g in range(num_groups):  # unrolled: scalar selects, no early exit inside a kernel
            start = end
            end = start + group_sizes_ref[g]
            first_block = lax.div(start, block_m)
            stop_block = lax.div(end - 1, block_m) + 1
            mine = (first_block + g <= t) & (t < stop_block + g) & (end > start)
            block = lax.select(mine, t - g, block)
            group = lax.select(mine, jnp.int32(g), group)
            g_start = lax.select(mine, start, g_start)
            g_end = lax.select(mine, end, g_end)
        lo = jnp.maximum(g_start, block * block_m)
        hi = jnp.minimum(g_end, block * block_m + block_m)
        return cls(group=group, block=block, first_row=lo - block * block_m, n_rows=jnp.maximum(hi - lo, 0))


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, block_m: int = 128, block_n: int = 128,
                   block_k: int = 64, max_concurrent_steps: int = 4, interpret: bool = False) -> jax.Array:
    """x [M, K] (rows sorted by group), w [G, N, K], group_sizes [G] int32 -> [M, N] in x's dtype."""
    M, K = x.shape
    G, N, K2 = w.shape
    if K2 != K or x.dtype != w.dtype or group_sizes.shape != (G,):
        raise ValueError(f"grouped_matmul: x {x.shape} {x.dtype}, w {w.shape} {w.dtype}, group_sizes "
                         f"{group_sizes.shape}: expected x [M, K], w [G, N, K] of one dtype, group_sizes [G]")
    if K % block_k or N % block_n:
        raise ValueError(f"grouped_matmul: K={K} and N={N} must be multiples of block_k={block_k} and "
                         f"block_n={block_n}")
    grid_m, grid_n = pl.cdiv(M, block_m) + G - 1, N // block_n

    def body(sizes_ref, x_ref, w_ref, out_ref):
        @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
        def _tile(info: plgpu.NDLoopInfo):
            mi, ni = lax.div(info.index[0], grid_n), lax.rem(info.index[0], grid_n)
            tile = _Tile.locate(sizes_ref, G, block_m, mi)

            @pl.when(tile.n_rows > 0)
            def _():
                def acc_scope(acc_ref):
                    plgpu.emit_pipeline(
                        lambda _, x_smem, w_smem: plgpu.wgmma(acc_ref, x_smem, w_smem.transpose((1, 0))),
                        grid=(K // block_k,),
                        in_specs=[plgpu.BlockSpec((block_m, block_k), lambda k: (tile.block, k), delay_release=1),
                                  plgpu.BlockSpec((block_n, block_k), lambda k: (ni, k), delay_release=1)],
                        max_concurrent_steps=max_concurrent_steps,
                    )(x_ref, w_ref.at[tile.group])
                    return acc_ref[...]

                acc = pl.run_scoped(acc_scope, plgpu.ACC((block_m, block_n)))

                @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((block_m, block_n), dtype=out_ref.dtype))
                def _store(o_smem):
                    o_smem[...] = acc.astype(o_smem.dtype)
                    plgpu.commit_smem()
                    # TMA stores need static row counts: write n_rows as a sum of powers of two.
                    row = tile.first_row
                    size = min(block_m, M)
                    while size > 0:
                        rows = 1 << int(math.log2(size))
                        size //= 2

                        @pl.when(tile.n_rows & rows != 0)
                        def _():
                            plgpu.copy_smem_to_gmem(
                                o_smem.at[pl.ds(row, rows)],
                                out_ref.at[pl.ds(tile.block * block_m + row, rows), pl.ds(ni * block_n, block_n)])

                        row += tile.n_rows & rows
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((M, N), x.dtype), grid=(NUM_SMS,), grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None)
    out = kernel(group_sizes.astype(jnp.int32), x, w)
    # Rows past sum(group_sizes) belong to no tile; the reference defines them as 0.
    return jnp.where(jnp.arange(M)[:, None] < jnp.sum(group_sizes), out, 0).astype(x.dtype)


def bench_cases():
    """Flash expert shapes: d = 4096, F = 2048, 256 experts, 6 routed per token (gate_up, then down)."""
    E, d, F, k = 256, 4096, 2048, 6

    def case(tokens, n, kk, name):
        def args(key):
            kx, kw, ke = jax.random.split(key, 3)
            M = tokens * k
            x = jax.random.normal(kx, (M, kk), jnp.bfloat16)
            w = (0.02 * jax.random.normal(kw, (E, n, kk))).astype(jnp.bfloat16)
            picks = jax.random.randint(ke, (M,), 0, E)
            return x, w, jnp.bincount(picks, length=E).astype(jnp.int32)

        M = tokens * k
        used = E * (1 - (1 - 1 / E) ** M)  # expected distinct experts under uniform picks
        return {"name": name, "shapes": f"M={M} (tokens={tokens} x k={k}) N={n} K={kk} G={E}",
                "args": args, "reference": reference, "pallas": grouped_matmul,
                "bytes": 2 * (M * kk + int(used) * n * kk + M * n), "flops": 2 * M * n * kk}

    return [case(t, 2 * F, d, f"gate_up T={t}") for t in (1, 32, 128, 4096)] + [
        case(t, d, F, f"down T={t}") for t in (1, 128, 4096)]
