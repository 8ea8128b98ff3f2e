"""Each row against its own expert matrix: the routed experts of a one-token decode step without sorting.

    expert_rows(x [M or 1, K], w [G, N, K], ids [M] int32) -> [M, N] in x's dtype (fp32 accumulate)

Meaning (``reference``): ``out[r] = w[ids[r]] @ x[r]``, the product ``moe._gathered_experts`` forms by
gathering the picked matrices; a one-row x is every row's (a token against its k experts, without an XLA
kernel broadcasting it to k rows first).

Why: at batch 1 a token's k experts are distinct (top-k, or the hash table's permutation), so each row's matrix
is read once without grouping rows by expert. The grouped kernels need the rows sorted by expert and the group
sizes, then a scatter-add back to tokens: an argsort, a bincount, gathers and a scatter-add, ~6 small XLA
kernels per MoE layer that a batch-1 step, bound by its kernel count (docs/performance.md, Kernel design
notes), pays for six rows. Rows sharing an expert (possible from batch 2 on) would read it once each, so the
MoE layer uses this kernel for one token only.

Backend: the Pallas **Triton** backend, like ``grouped_gemv``: grid ``(N / block_n, M)``, a program
streams ``w[ids[r], n-block, :]`` in ``block_k`` steps against row r (loaded into a 16-row tile, the
tensor-core minimum, the other 15 rows masked to zero) and stores its ``[1, block_n]`` result.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .common import check_tuning, expert_blocks, triton_call

__all__ = ["expert_rows", "reference", "TuningConfig", "choose_tuning"]

TILE_ROWS = 16  # Triton's smallest tensor-core tile


def reference(x, w, ids):
    """out[r] = w[ids[r]] @ x[r] (x[0] for a one-row x) in x's dtype, fp32 accumulation."""
    x = jnp.broadcast_to(x, (ids.shape[0], x.shape[1]))
    return jnp.einsum("mk,mnk->mn", x, w[ids], preferred_element_type=jnp.float32).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """The launch choices of ``expert_rows``: the weight tile streamed per step (block_n / block_k, powers of
    two >= 16, clipped to N / K) and Triton's warps and software-pipelining stages."""
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        check_tuning(self, blocks=("block_n", "block_k"))


def choose_tuning() -> TuningConfig:
    """One choice for every shape: the blocks are clipped to the matrix in the kernel."""
    return TuningConfig()


def _kernel(ids_ref, x_ref, w_ref, o_ref, *, block_k: int):
    """ids_ref [M]; x_ref [M or 1, K]; w_ref [G, bn, K] (this program's column block); o_ref [M, bn]."""
    r = pl.program_id(1)
    K = x_ref.shape[1]
    own = jnp.arange(TILE_ROWS, dtype=jnp.int32) == 0  # output row r is tile row 0; the other 15 masked
    xr = 0 if x_ref.shape[0] == 1 else r
    e = ids_ref[r]

    def step(i, acc):
        k0 = pl.multiple_of(i * block_k, block_k)
        xs = plt.load(x_ref.at[pl.ds(xr, TILE_ROWS), pl.ds(k0, block_k)], mask=own[:, None], other=0)
        ws = w_ref[e, :, pl.ds(k0, block_k)]
        return acc + lax.dot_general(xs, ws, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, K // block_k, step, jnp.zeros((TILE_ROWS, w_ref.shape[1]), jnp.float32))
    plt.store(o_ref.at[pl.ds(r, TILE_ROWS), :], acc.astype(o_ref.dtype), mask=own[:, None])


@functools.partial(jax.jit, static_argnames=("tuning", "interpret", "poison_outputs"))
def expert_rows(x: jax.Array, w: jax.Array, ids: jax.Array, *, tuning: TuningConfig | None = None,
                interpret: bool = False, poison_outputs: bool = False) -> jax.Array:
    """x [M or 1, K], w [G, N, K], ids [M] int32 in [0, G) -> [M, N] in x's dtype. tuning: None for
    ``choose_tuning()``. poison_outputs: testing aid (outputs start as NaN)."""
    tuning = tuning or choose_tuning()
    G, N, K = w.shape
    M = ids.shape[0] if ids.ndim == 1 else 0
    if not M or x.ndim != 2 or x.shape[0] not in (1, M):
        raise ValueError(f"expert_rows: ids {ids.shape}, x {x.shape}: expected ids [M] and x [M or 1, K]")
    block_n, block_k = expert_blocks("expert_rows", x, w, tuning.block_n, tuning.block_k)
    return triton_call(
        functools.partial(_kernel, block_k=block_k), [ids.astype(jnp.int32), x, w],
        grid=(N // block_n, M),
        in_specs=[pl.BlockSpec((M,), lambda n, r: (0,)), pl.BlockSpec(x.shape, lambda n, r: (0, 0)),
                  pl.BlockSpec((G, block_n, K), lambda n, r: (0, n, 0))],
        out_shape=[jax.ShapeDtypeStruct((M, N), x.dtype)],
        out_specs=[pl.BlockSpec((M, block_n), lambda n, r: (0, n))],
        num_warps=tuning.num_warps, num_stages=tuning.num_stages, interpret=interpret,
        name=f"dsv4_expert_rows_n{block_n}_k{block_k}", poison=poison_outputs)[0]
