"""The routed experts of a MoE layer: the clamped SwiGLU MLP of each token's picked experts.

XLA: gathered matrices or ``ragged_dot_general``; Pallas: kernels_pallas/expert_rows.py, grouped_gemv.py and
grouped_matmul.py. Expert stacks kept in the released FP4 (QuantArrays) are read packed by the Pallas kernels
(weight-only: dequantised in registers or shared memory) and dequantised by the XLA path inside the step: only
the picked experts' codes where it gathers, the whole stack where it runs the ragged dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from kernels_pallas.expert_rows import expert_rows
from kernels_pallas.grouped_gemv import grouped_gemv
from kernels_pallas.grouped_matmul import grouped_matmul

from ..weights.quant_array import QuantArray
from ..weights.quantization import FP4_BLOCK_SHAPE
from .choice import interpret, pallas
from .dense import dense
from .parallel import combine_experts, expert_shard_count, expert_shard_index, gather_tokens

_RAGGED_DN = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


# XLA's GPU ragged dot is dense: it expands its rows over every group (62 GB of temporaries for 55,200 rows
# over 64 experts of width 4096, compiled for an H100), so the XLA path takes the rows in chunks whose
# expansion, counted at 4 bytes a value, stays under this.
RAGGED_DOT_CHUNK_BYTES = 2 ** 31


def ragged_dot_in_chunks(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, K] rows sorted by group; w [G, N, K]; group_sizes [G] (summing to at most M; later rows get
    zeros) -> [M, N] fp32, row i times its group's matrix: one ``ragged_dot_general`` per chunk of rows, the
    chunk's share of each group clipped from the groups' row ranges."""
    M, K = x.shape
    G = w.shape[0]
    rows = max(1, RAGGED_DOT_CHUNK_BYTES // (4 * G * K))

    def ragged(xs, sizes):
        return jax.lax.ragged_dot_general(xs, w, sizes, ragged_dot_dimension_numbers=_RAGGED_DN,
                                          preferred_element_type=jnp.float32)

    if M <= rows:
        return ragged(x, group_sizes)
    chunks = -(-M // rows)
    ends = jnp.cumsum(group_sizes)
    first = jnp.arange(chunks, dtype=ends.dtype)[:, None] * rows  # [chunks, 1]
    sizes = jnp.clip(ends, first, first + rows) - jnp.clip(ends - group_sizes, first, first + rows)  # [chunks, G]
    xs = jnp.pad(x, ((0, chunks * rows - M), (0, 0))).reshape(chunks, rows, K)
    return jax.lax.map(lambda a: ragged(*a), (xs, sizes)).reshape(chunks * rows, -1)[:M]


def clamped_swiglu(gate: jax.Array, up: jax.Array, limit: float) -> jax.Array:
    """silu(min(gate, L)) * clip(up, -L, L): the gate is clamped from above only."""
    return jax.nn.silu(jnp.minimum(gate, limit)) * jnp.clip(up, -limit, limit)


def routed_experts(x: jax.Array, idx: jax.Array, weights: jax.Array, gate_up: jax.Array | QuantArray,
                   down: jax.Array | QuantArray, limit: float) -> jax.Array:
    """x [T, d]; idx, weights [T, k] (global expert ids); gate_up [E, 2F, d]; down [E, d, F] -> [T, d] fp32.
    The stacks are arrays, or FP4 QuantArrays computed in x's dtype.

    Sharded (ops/parallel.py): with the width split over tensor-parallel devices (gate_up [E, 2F/tp, d], its
    shard's gate rows then up rows; down [E, d, F/tp]) each device computes its partial sums; with the experts
    spread (gate_up [E/ep, ...]) every device takes all data-parallel shards' tokens and computes its own
    experts' share of them. Either way the shares are then summed back to each shard's tokens; no token is
    dropped, whatever the routing.
    """
    x, idx, weights = gather_tokens(x, idx, weights)
    spread = expert_shard_count()
    if spread > 1:
        idx, weights = _local_assignments(idx, weights, gate_up.shape[0])
    return combine_experts(_experts_on_device(x, idx, weights, gate_up, down, limit, spread))


def _local_assignments(idx: jax.Array, weights: jax.Array, local_experts: int):
    """Global expert ids [T, k] -> ids into this device's ``local_experts`` experts; an assignment to another
    device's expert gets id ``local_experts`` (past every group) and weight 0."""
    first = expert_shard_index() * local_experts
    mine = (idx >= first) & (idx < first + local_experts)
    return jnp.where(mine, idx - first, local_experts), jnp.where(mine, weights, 0.0)


def _experts_on_device(x: jax.Array, idx: jax.Array, weights: jax.Array, gate_up: jax.Array, down: jax.Array,
                       limit: float, spread: int = 1) -> jax.Array:
    """``routed_experts`` on the experts and width this device holds: x [T, d]; idx, weights [T, k] -> [T, d]
    fp32. ``spread``: the devices the experts are spread over; ids >= E then name another device's experts,
    whose assignments sort past every group and are neither computed nor read (their rows are zeros), and
    the kernel is chosen by the assignments expected on this device (T k / spread).

    Only the picked experts' weights are read. XLA: with fewer assignments than experts (decode) the picked
    matrices gathered per assignment, since XLA's GPU ragged dot is dense; else the assignments sorted by
    expert through two ``ragged_dot_general``. Pallas (bf16/fp16 weights; fp32 weights keep XLA):
    a single token's k rows (T = 1) skip the sort and the scatter back: its experts are distinct, so
    ``expert_rows`` runs each row against its own matrix; up to 3 assignments per expert (decode; measured
    faster there on an H200 up to 768 rows over 256 experts, docs/performance.md) the Triton few-rows kernel
    (``grouped_gemv``: each used matrix streamed once per 16 rows); above that (prefill) the Mosaic GPU
    grouped matmul (64-128-row ``wgmma`` tiles).
    """
    T, k = idx.shape
    E = gate_up.shape[0]
    dtype = x.dtype if isinstance(gate_up, QuantArray) else gate_up.dtype  # the experts' compute dtype
    use_kernel = pallas("routed_experts") and dtype != jnp.float32
    local_rows = T * k // spread
    if local_rows < E and not use_kernel:  # another device's assignments: any matrix, weight 0
        return _gathered_experts(x.astype(dtype), idx if spread == 1 else jnp.minimum(idx, E - 1), weights, gate_up,
                                 down, limit)
    (gate_up, up_scales), (down, down_scales) = (_kernel_weights(w, dtype, use_kernel) for w in (gate_up, down))
    if use_kernel and T == 1 and spread == 1:  # one token's experts are distinct: no sorting, no scatter back
        rows = functools.partial(expert_rows, ids=idx.reshape(-1), interpret=interpret())
        # gate_up reads the token's one row for all k experts: [1, d] -> [k, 2F]
        y = _expert_mlp(x.astype(dtype), functools.partial(rows, w=gate_up, w_scales=up_scales),
                        functools.partial(rows, w=down, w_scales=down_scales), limit)
        return jnp.einsum("kd,k->d", y, weights.reshape(-1))[None]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # ids >= E count in no group
    xs = x[token].astype(dtype)
    if use_kernel:
        kernel = functools.partial(grouped_gemv if local_rows <= 3 * E else grouped_matmul, interpret=interpret())
        up = functools.partial(kernel, w=gate_up, group_sizes=group_sizes, w_scales=up_scales)
        down_proj = functools.partial(kernel, w=down, group_sizes=group_sizes, w_scales=down_scales)
    else:
        up = functools.partial(ragged_dot_in_chunks, w=gate_up, group_sizes=group_sizes)
        down_proj = functools.partial(ragged_dot_in_chunks, w=down, group_sizes=group_sizes)
    y = _expert_mlp(xs, up, down_proj, limit)
    if spread > 1:  # the rows past the groups (other devices' assignments) were never written
        y = jnp.where((jnp.arange(T * k) < jnp.sum(group_sizes))[:, None], y, 0.0)
    # Back to assignment order by the inverse permutation (a gather), then each token's k rows summed in a
    # fixed order: a scatter-add back is not deterministic on a GPU (its adds land in any order).
    unsorted = y[jnp.argsort(order)].reshape(T, k, -1)
    return jnp.sum(unsorted * weights.astype(jnp.float32)[:, :, None], axis=1)


# The FP4 expert kernels' K step (choose_tuning(fp4=True)): an FP4 stack whose input width it divides is read
# packed by the kernels; any other quantised stack is dequantised for them.
FP4_KERNEL_BLOCK_K = 256


def _kernel_weights(w, dtype, use_kernel: bool):
    """A stack as the expert matmuls take it: (FP4 codes int8 [E, N, K/2], their scales [E, N, K/32]) for the
    Pallas kernels, else (the stack in ``dtype``, None)."""
    if (use_kernel and isinstance(w, QuantArray) and w.block == FP4_BLOCK_SHAPE and dtype == jnp.bfloat16
            and w.shape[-1] % FP4_KERNEL_BLOCK_K == 0):
        return w.values, w.scales
    return dense(w, dtype), None


def _expert_mlp(xs, up, down, limit):
    """The routed expert MLP in the weights' dtype xs: ``up`` -> [..., 2F] (gate | up halves), the clamped
    SwiGLU in fp32, cast back to xs' dtype, ``down`` -> [..., d]; returns fp32."""
    h = up(xs).astype(jnp.float32)
    F = h.shape[-1] // 2
    return down(clamped_swiglu(h[..., :F], h[..., F:], limit).astype(xs.dtype)).astype(jnp.float32)


def _gathered_experts(x, idx, weights, gate_up, down, limit):
    """x [T, d] in the compute dtype; each assignment's matrices gathered (a QuantArray's codes and scales,
    then dequantised: only the picked experts are)."""
    def picked(w):
        return dense(jax.tree.map(lambda a: a[idx], w), x.dtype)

    y = _expert_mlp(x,
                    lambda a: jnp.einsum("td,tkfd->tkf", a, picked(gate_up), preferred_element_type=jnp.float32),
                    lambda h: jnp.einsum("tkf,tkdf->tkd", h, picked(down), preferred_element_type=jnp.float32), limit)
    return jnp.einsum("tkd,tk->td", y, weights)
