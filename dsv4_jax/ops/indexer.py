"""The lightning indexer's scores and the top-k selection over them.

XLA: ``index_scores`` then ``select_topk``; Pallas: kernels_pallas/indexer.py (a decode step's and a chunk's
scores) and kernels_pallas/topk.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from kernels_pallas import indexer as indexer_kernels
from kernels_pallas.topk import topk_indices

from .choice import interpret, pallas
from .parallel import tp_sum


def indexer_scores(q, keys, weights, n_visible) -> jax.Array:
    """q [B, C, H_I, D_I], keys [B, N, D_I], weights [B, C, H_I] (scales folded in), n_visible [B, C] ->
    scores [B, C, N] fp32; entries at or past n_visible hold anything (``topk`` never picks them). Pallas:
    the decode kernel for a step of one token (C = 1), else the chunk kernel. With the heads split over
    tensor-parallel devices, each scores its heads and the sum over the shards is the score."""
    if not pallas("indexer_scores"):
        return tp_sum(index_scores(q, keys, weights))
    if q.shape[1] == 1:
        return tp_sum(indexer_kernels.index_scores_decode(q[:, 0], keys, weights[:, 0], n_visible[:, 0],
                                                          interpret=interpret())[:, None])
    return tp_sum(indexer_kernels.index_scores_prefill(q, keys, weights, n_visible, interpret=interpret()))


def topk(scores, n_visible, k: int) -> jax.Array:
    """scores [B, C, N], n_visible [B, C] -> the ids of the k best visible entries [B, C, k] int32, -1 where
    fewer than k are visible (``select_topk``'s set; Pallas returns it in ascending id order)."""
    if not pallas("topk"):
        return select_topk(scores, n_visible, k)
    if scores.shape[1] == 1:  # a decode step: one row per sequence
        return topk_indices(scores[:, 0], n_visible[:, 0], k, interpret=interpret())[:, None]
    return topk_indices(scores, n_visible, k, interpret=interpret())


def index_scores(q: jax.Array, keys: jax.Array, head_weights: jax.Array) -> jax.Array:
    """q [B, C, H_I, D_I], keys [B, N, D_I], head_weights [B, C, H_I] (scales folded in) -> [B, C, N] fp32."""
    dots = jnp.einsum("bchd,bnd->bchn", q, keys, preferred_element_type=jnp.float32)
    return jnp.einsum("bchn,bch->bcn", jax.nn.relu(dots), head_weights.astype(jnp.float32))


def select_topk(scores: jax.Array, n_visible: jax.Array, k: int) -> jax.Array:
    """scores [B, C, N], n_visible [B, C] -> entry ids [B, C, k] int32, -1 where fewer than k are visible.

    Invisible and non-finite scores are masked before the selection, so a NaN can never be picked.
    """
    entry = jnp.arange(scores.shape[-1], dtype=jnp.int32)
    visible = entry < n_visible[..., None]
    masked = jnp.where(visible & jnp.isfinite(scores), scores, -jnp.inf)
    _, idx = jax.lax.top_k(masked, k)
    picked = jnp.take_along_axis(masked, idx, axis=-1)
    ok = (idx < n_visible[..., None]) & (picked > -jnp.inf)
    return jnp.where(ok, idx, -1).astype(jnp.int32)
