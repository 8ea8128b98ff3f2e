"""Sliding window: every layer attends to the W most recent tokens of its own K=V rows.

The cache is a ring of post-norm, post-RoPE K=V rows indexed by ``position % W``. ``window_meta`` (run once
per chunk by ``metadata.build_metadata``) lays out each query block's keys and the ring's write slots;
``window_keys`` (run per layer) reads the keys and writes the chunk into the ring.

Shapes: B batch rows, C chunk length (padded so the query blocks tile it), W window, Bq = min(W, C) query
block, Kw window keys per block (W + Bq; W for a one-token chunk, see ``WindowMeta``), D head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .config import DeepseekV4Config
from .kv_rows import encode_rows, scatter_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WindowMeta:
    """The sliding-window keys of a chunk (``window_keys``), Kw per query block:

    C > 1: block b's keys are rows b*Bq .. b*Bq + W + Bq - 1 of concat(ring in position order, chunk),
      Kw = W + Bq, read before the ring is written (later tokens overwrite slots earlier queries need).
    C == 1 (decode): the keys are the ring itself in slot order after the token is written, Kw = W; the
      write evicts position t - W, so the ring then holds exactly t's window. ``ring_order`` is None.
    """

    ring_order: jax.Array | None  # [B, W] ring slot that holds position start - W + j; None when C == 1
    key_mask: jax.Array  # [B, C, Kw] key j of a query's block is in its window and exists
    ring_write_slot: jax.Array  # [B, C] ring slot (pos % W) for the last W real tokens, W = do not write


def query_block(cfg: DeepseekV4Config, chunk_len: int) -> int:
    """Window queries are processed in blocks of Bq (see ``WindowMeta`` for their keys)."""
    return min(cfg.sliding_window, chunk_len)


def window_meta(cfg: DeepseekV4Config, start: jax.Array, end: jax.Array, positions: jax.Array,
                token_valid: jax.Array) -> WindowMeta:
    """start, end [B]; positions, token_valid [B, C] -> the window layout of ``WindowMeta``."""
    W = cfg.sliding_window
    bq = query_block(cfg, positions.shape[1])
    write_slot = jnp.where(token_valid & (positions >= end[:, None] - W), positions % W, W)
    slot = jnp.arange(W, dtype=jnp.int32)
    if positions.shape[1] == 1:
        # After the token's write, slot s holds position start - ((start - s) mod W): t's window. Like the
        # C > 1 mask this ignores token_valid (a padding row's output is never used).
        slot_pos = start[:, None] - (start[:, None] - slot[None, :]) % W  # [B, W]
        return WindowMeta(ring_order=None, key_mask=(slot_pos >= 0)[:, None, :], ring_write_slot=write_slot)
    # query t = b*Bq + r sees rows b*Bq + j of concat(ring, chunk), j in [r + 1, r + W] (t - W + 1 .. t)
    offs = jnp.arange(positions.shape[1], dtype=jnp.int32)
    j = jnp.arange(W + bq, dtype=jnp.int32)
    r = (offs % bq)[:, None]
    band = (j[None, :] >= r + 1) & (j[None, :] <= r + W)  # [C, W+Bq]
    key_row = (offs // bq * bq)[:, None] + j[None, :]  # row in concat(ring, chunk)
    key_pos = start[:, None, None] - W + key_row[None]  # [B, C, W+Bq]
    return WindowMeta(ring_order=(start[:, None] - W + slot[None, :]) % W, key_mask=band[None] & (key_pos >= 0),
                      ring_write_slot=write_slot)


def window_keys(ring, chunk_kv: jax.Array, window: WindowMeta, block: int):
    """ring [B, W, D] (slot order), chunk_kv [B, C, D] -> (keys [B, C/Bq, Kw, D], ring after the chunk's write).

    Kw and the key order are ``WindowMeta``'s: for C == 1 the written ring itself (Kw = W, slot order; no
    gather or concatenate on the decode step), else W + Bq rows of concat(ring in position order, chunk)
    per query block, read from the ring before the write. The ring is stored as kv_rows.py says (an array, or
    FP8 records); the keys come in the ring's layout, the chunk's own rows encoded as the ring stores them, so
    a query sees a key the same whether it is read from this chunk or from the ring later.
    """
    chunk = encode_rows(ring, chunk_kv)
    written = scatter_rows(ring, (jnp.arange(ring.shape[0])[:, None], window.ring_write_slot), chunk)
    if chunk_kv.shape[1] == 1:
        return jax.tree.map(lambda r: r[:, None], written), written
    W = ring.shape[1]
    n_blocks = chunk_kv.shape[1] // block
    gather = np.arange(n_blocks)[:, None] * block + np.arange(W + block)[None, :]

    def blocks(stored, new):  # one array of the layout: concat(ring in position order, chunk), per query block
        ordered = jnp.take_along_axis(stored, window.ring_order[..., None], axis=1)
        return jnp.concatenate([ordered, new], axis=1)[:, gather]

    return jax.tree.map(blocks, ring, chunk), written
