"""Sparse sink attention: window keys plus compressed entries, one softmax with the sink.

XLA: ``sink_attention`` (with ``gather_entries`` for per-query picks); Pallas: kernels_pallas/sparse_attention.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from kernels_pallas.sparse_attention import sparse_attention_prefill

from ..model.kv_rows import Fp8Rows, read_rows
from .choice import interpret, pallas


def sparse_attention(q, win_keys, win_mask, entries, entry_ids, sinks, scale: float, *,
                     shared_entries: bool) -> jax.Array:
    """A chunk's attention (a decode step is a chunk of one): q [B, C, H, D]; win_keys [B, C/Bq, Kw, D] and
    win_mask [B, C, Kw] (``WindowMeta``); entries [B, N, D] with each query's entry ids [B, C, K] (-1 = none),
    or both None on a sliding-window-only layer; sinks [H]. ``shared_entries``: the ids are ``arange(N)``
    masked to the visible prefix (HCA), so XLA attends to every row under that mask instead of gathering
    each query's picks (CSA). Keys and entries are arrays or FP8 records (model/kv_rows.py): XLA dequantises
    the rows it reads (a CSA query's picks, not the whole cache), the Pallas kernel its key tiles. Returns
    [B, C, H, D] in q's dtype."""
    if pallas("sparse_attention"):
        B, C, H, D = q.shape
        if entries is None:  # the kernel always takes entries: one row that no query picks
            entries = jnp.zeros((B, 1, D), q.dtype)
            entry_ids = jnp.full((B, C, 1), -1, jnp.int32)
        return sparse_attention_prefill(q, kernel_rows(win_keys), win_mask, kernel_rows(entries), entry_ids, sinks,
                                        scale, interpret=interpret())
    win_keys = read_rows(win_keys, q.dtype)
    if entries is None:
        return sink_attention(q, win_keys, win_mask, None, None, sinks, scale)
    if shared_entries:
        return sink_attention(q, win_keys, win_mask, read_rows(entries, q.dtype), entry_ids >= 0, sinks, scale)
    picked, valid = gather_entries(entries, entry_ids)
    return sink_attention(q, win_keys, win_mask, read_rows(picked, q.dtype), valid, sinks, scale)


def kernel_rows(stored):
    """Rows as the sparse-attention kernel takes them: an array, or an FP8 record's (nope, rope, scale)."""
    return (stored.nope, stored.rope, stored.scale) if isinstance(stored, Fp8Rows) else stored


def sink_attention(q: jax.Array, win_keys: jax.Array, win_mask: jax.Array, comp_keys: jax.Array | None,
                   comp_mask: jax.Array | None, sinks: jax.Array, scale: float) -> jax.Array:
    """One softmax over window keys, compressed keys and the sink; values are the keys (K = V).

    q [B, C, H, D]; win_keys [B, C/Bq, Kw, D]; win_mask [B, C, Kw] (Kw = W + Bq, or W when C == 1: see
    ``WindowMeta``);
    comp_keys [B, N, D] (shared by all queries) or [B, C, K, D] (per query); comp_mask [B, C, N|K];
    sinks [H]. Returns [B, C, H, D] in q's dtype.
    """
    B, C, H, D = q.shape
    nb, span = win_keys.shape[1], win_keys.shape[2]
    qb = q.reshape(B, nb, C // nb, H, D)
    lw = jnp.einsum("bnqhd,bnkd->bnqhk", qb, win_keys, preferred_element_type=jnp.float32) * scale
    lw = jnp.where(win_mask.reshape(B, nb, C // nb, 1, span), lw, -jnp.inf).reshape(B, C, H, span)
    parts = [lw]
    if comp_keys is not None:
        spec = "bchd,bnd->bchn" if comp_keys.ndim == 3 else "bchd,bckd->bchk"
        lc = jnp.einsum(spec, q, comp_keys, preferred_element_type=jnp.float32) * scale
        parts.append(jnp.where(comp_mask[:, :, None, :], lc, -jnp.inf))
    sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, None, :, None], (B, C, H, 1))
    logits = jnp.concatenate(parts + [sink], axis=-1)
    probs = jax.nn.softmax(logits, axis=-1)
    pw = probs[..., :span].reshape(B, nb, C // nb, H, span).astype(q.dtype)
    out = jnp.einsum("bnqhk,bnkd->bnqhd", pw, win_keys, preferred_element_type=jnp.float32).reshape(B, C, H, D)
    if comp_keys is not None:
        pc = probs[..., span:-1].astype(q.dtype)
        spec = "bchn,bnd->bchd" if comp_keys.ndim == 3 else "bchk,bckd->bchd"
        out = out + jnp.einsum(spec, pc, comp_keys, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def gather_entries(compressed, picks: jax.Array):
    """compressed [B, N, D] (an array or FP8 records), picks [B, C, k] (-1 = none) -> (entries [B, C, k, D] in
    the same layout, valid [B, C, k])."""
    B, C, k = picks.shape
    index = jnp.maximum(picks, 0).reshape(B, C * k, 1)
    rows = jax.tree.map(lambda a: jnp.take_along_axis(a, index, axis=1).reshape(B, C, k, -1), compressed)
    return rows, picks >= 0
