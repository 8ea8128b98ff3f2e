"""The learned MoE router's choice for a few tokens (decode) as one Pallas GPU kernel, after its matmul.

    route(logits [T, E] f32, bias [E] f32, *, k, route_scale) -> (weights [T, k] f32, ids [T, k] int32)

Meaning (``reference``): ``dsv4_jax.moe.route_learned`` on the scores ``sqrt(softplus(logits))``: the k
largest of scores + bias in ``lax.top_k``'s order (descending, ties to the lower id), as ``moe.top_k_ids``
ranks them, and their unbiased scores renormalised to sum 1 and scaled by ``route_scale``.

Why a kernel: after the router's matmul XLA runs this as four small kernels per MoE layer (the scores, the
ranks with the bias, the picked ids, the weights), and a batch-1 decode step is bound by its kernel count
(docs/performance.md). The work is a few thousand comparisons per token.

Backend: the Pallas **Triton** backend. One program per token holds its E scores (padded to a power of two
with -inf, which ranks after every real expert); each expert's rank counts the experts before it, over blocks
of ``block_e`` columns recomputed from the logits (a register vector cannot be sliced); pick r is the expert
of rank r. NaN scores share rank 0 as in ``moe.top_k_ids``, whose clamp this repeats.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dsv4_jax.moe import renormalise, route_learned, scores_from_logits

from .common import triton_call

__all__ = ["route", "reference", "bench_cases"]


def reference(logits, bias, *, k: int, route_scale: float):
    """The XLA path: ``moe.route_learned`` on sqrt(softplus(logits))."""
    return route_learned(scores_from_logits(logits), bias, k, route_scale)


def _kernel(logits_ref, bias_ref, w_ref, ids_ref, *, n_experts: int, k: int, route_scale: float, block_e: int):
    """logits_ref [T, E] f32; bias_ref [E] f32; w_ref [T, k] f32; ids_ref [T, k] int32. One token."""
    t = pl.program_id(0)
    E = n_experts

    def load(start, size):  # (expert ids, scores, scores + bias) of experts start..start+size, -inf past E
        e = start + jnp.arange(size, dtype=jnp.int32)
        inside = e < E
        scores = scores_from_logits(plt.load(logits_ref.at[t, pl.ds(start, size)], mask=inside, other=0.0))
        biased = scores + plt.load(bias_ref.at[pl.ds(start, size)], mask=inside, other=0.0)
        return e, scores, jnp.where(inside, biased, -jnp.inf)

    e, scores, x = load(0, pl.next_power_of_2(E))
    rank = jnp.zeros(e.shape, jnp.int32)
    for j0 in range(0, e.shape[0], block_e):  # rank[i] = #{j ranked before i}
        ej, _, xj = load(j0, block_e)
        before = (xj[None, :] > x[:, None]) | ((xj[None, :] == x[:, None]) & (ej[None, :] < e[:, None]))
        rank += jnp.sum(before.astype(jnp.int32), axis=1)

    slots = jnp.arange(pl.next_power_of_2(k), dtype=jnp.int32)
    ids = jnp.zeros(slots.shape, jnp.int32)
    w = jnp.zeros(slots.shape, jnp.float32)
    for r in range(k):
        pick = jnp.minimum(jnp.sum(jnp.where(rank == r, e, 0)), E - 1)
        ids = jnp.where(slots == r, pick, ids)
        w = jnp.where(slots == r, jnp.sum(jnp.where(e == pick, scores, 0.0)), w)
    w = renormalise(w, route_scale)  # the slots past k hold 0
    plt.store(ids_ref.at[t, pl.ds(0, slots.shape[0])], ids, mask=slots < k)
    plt.store(w_ref.at[t, pl.ds(0, slots.shape[0])], w, mask=slots < k)


@functools.partial(jax.jit, static_argnames=("k", "route_scale", "block_e", "num_warps", "interpret",
                                             "poison_outputs"))
def route(logits, bias, *, k: int, route_scale: float, block_e: int = 32, num_warps: int = 4,
          interpret: bool = False, poison_outputs: bool = False):
    """Pallas (Triton) learned routing; same arguments and results as ``reference``. block_e: columns per
    ranking step (a power of two). poison_outputs: testing aid (``common.triton_call``)."""
    T, E = logits.shape
    if bias.shape != (E,) or not 1 <= k <= E or block_e < 1 or block_e & (block_e - 1):
        raise ValueError(f"route: logits {logits.shape}, bias {bias.shape}, k={k}, block_e={block_e}: expected "
                         f"[T, E], [E], 1 <= k <= E and block_e a power of two")
    whole = lambda *shape: pl.BlockSpec(shape, lambda t: (0,) * len(shape))  # the kernel indexes its token
    w, ids = triton_call(
        functools.partial(_kernel, n_experts=E, k=k, route_scale=route_scale,
                          block_e=min(block_e, pl.next_power_of_2(E))),
        [logits.astype(jnp.float32), bias.astype(jnp.float32)], grid=(T,), in_specs=[whole(T, E), whole(E)],
        out_shape=[jax.ShapeDtypeStruct((T, k), jnp.float32), jax.ShapeDtypeStruct((T, k), jnp.int32)],
        out_specs=[whole(T, k), whole(T, k)], num_warps=num_warps, num_stages=1, interpret=interpret,
        name=f"dsv4_route_e{E}_k{k}", poison=poison_outputs)
    return w, ids


# ----------------------------------------------------------------------------------------------------------
# Benchmarks (scripts/bench_kernels.py)
# ----------------------------------------------------------------------------------------------------------


def bench_cases():
    """Flash routing (256 experts, 6 picked, scale 1.5) for a batch-1 and a batch-16 decode step's tokens,
    against XLA's four kernels. Bytes: the logits and the bias read, the weights and ids written."""
    E, k = 256, 6

    def case(T):
        def args(key):
            kl, kb = jax.random.split(key)
            return jax.random.normal(kl, (T, E), jnp.float32), 0.1 * jax.random.normal(kb, (E,), jnp.float32)

        return {"name": f"route_T{T}", "shapes": {"T": T, "E": E, "k": k}, "args": args,
                "kwargs": {"k": k, "route_scale": 1.5}, "bytes": 4 * (T * E + E + 2 * T * k),
                "flops": 2 * T * E * E, "pallas": route, "reference": reference}

    return [case(1), case(16)]
