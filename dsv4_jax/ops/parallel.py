"""The collectives of the sharded step: which mesh axes the ops reduce over, a static trace-time setting.

The sharded engine (runtime/mesh.py) runs a step's embedding, layers and head inside one ``shard_map``: every
op sees its device's shards (a tensor-parallel slice of the heads, vocabulary rows and MLP widths; a
data-parallel slice of the batch; an expert-parallel slice of the routed experts) and the functions here
add what a shard cannot compute alone. ``use_axes(axes)`` makes a setting current for the code traced inside
it, as ``choice.use`` does for the kernels; outside one (a single device) every function is the identity,
so the unsharded step traces exactly as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MeshAxes:
    """Mesh axes of more than one device that the ops reduce over (None / empty: not split)."""

    tp: str | None = None  # splits attention and indexer heads, output groups, MLP widths and the vocabulary
    dp: str | None = None  # splits the batch rows
    ep: tuple[str, ...] = ()  # the routed experts are spread over these axes, in order (dp before tp)


_CURRENT: contextvars.ContextVar[MeshAxes] = contextvars.ContextVar("dsv4_jax_mesh_axes", default=MeshAxes())


@contextlib.contextmanager
def use_axes(axes: MeshAxes):
    """Within this context the ops trace the collectives of ``axes``."""
    token = _CURRENT.set(axes)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_axes() -> MeshAxes:
    return _CURRENT.get()


def tp_sum(x: jax.Array) -> jax.Array:
    """Sum of the tensor-parallel shards' partial results (identity unsplit)."""
    tp = _CURRENT.get().tp
    return x if tp is None else jax.lax.psum(x, tp)


def embed_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table [V_shard, d] (this device's rows of a vocabulary split over tp), ids [...] -> [..., d]: each shard
    looks up the ids in its rows, the others contribute zeros, and the sum is exact (one non-zero term)."""
    tp = _CURRENT.get().tp
    if tp is None:
        return table[ids]
    rows = table.shape[0]
    local = ids - jax.lax.axis_index(tp) * rows
    mine = (local >= 0) & (local < rows)
    picked = table[jnp.clip(local, 0, rows - 1)]
    return jax.lax.psum(jnp.where(mine[..., None], picked, jnp.zeros_like(picked)), tp)


def gather_vocab(logits: jax.Array, vocab_size: int) -> jax.Array:
    """logits [..., V_shard] of this device's vocabulary rows -> [..., vocab_size]: the shards concatenated in
    order and the padding rows (a vocabulary not divisible by tp is padded at placement) dropped."""
    tp = _CURRENT.get().tp
    if tp is not None:
        logits = jax.lax.all_gather(logits, tp, axis=logits.ndim - 1, tiled=True)
    return logits[..., :vocab_size]


def expert_shard_count() -> int:
    """How many devices the routed experts are spread over (1 when they are not)."""
    count = 1
    for axis in _CURRENT.get().ep:
        count *= jax.lax.axis_size(axis)
    return count


def expert_shard_index() -> jax.Array | int:
    """This device's position among the expert-parallel devices (0 when the experts are not spread)."""
    index = 0
    for axis in _CURRENT.get().ep:
        index = index * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
    return index


def gather_tokens(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """Under expert parallelism: each [T_local, ...] -> [T_local * dp, ...], every data-parallel shard's tokens
    (the tensor-parallel devices of a shard hold the same ones); the identity otherwise."""
    axes = _CURRENT.get()
    if axes.dp is None or axes.dp not in axes.ep:
        return xs
    return tuple(jax.lax.all_gather(x, axes.dp, axis=0, tiled=True) for x in xs)


def combine_experts(y: jax.Array) -> jax.Array:
    """The routed experts' output: y [T, d], this device's experts' share of the tokens ``gather_tokens``
    returned (or of its own tokens with the experts' width split over tp) -> this shard's tokens' sum over
    every device's share: a reduce-scatter over dp (expert parallel) and a sum over tp."""
    axes = _CURRENT.get()
    if axes.dp is not None and axes.dp in axes.ep:
        y = jax.lax.psum_scatter(y, axes.dp, scatter_dimension=0, tiled=True)
    return tp_sum(y)


def all_rows(x: jax.Array) -> jax.Array:
    """x [B_shard, ...] of this data-parallel shard's batch rows -> [B_shard * dp, ...], every shard's in order
    (identity unsplit)."""
    dp = _CURRENT.get().dp
    return x if dp is None else jax.lax.all_gather(x, dp, axis=0, tiled=True)


def own_rows(x: jax.Array, n: int) -> jax.Array:
    """x [n * dp, ...] over every data-parallel shard's rows (``all_rows``' order) -> [n, ...], this shard's
    (identity unsplit)."""
    dp = _CURRENT.get().dp
    return x if dp is None else jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(dp) * n, n, axis=0)
