"""The metadata upgrade: raw batch in, complete immutable forward metadata out.

``build_metadata`` is the one place where per-batch attention bookkeeping is derived: positions,
RoPE angles, sliding-window key masks and ring-buffer write slots, and for each compression ratio
the visible-entry counts, which windows close in this chunk, where their entries are written and
where each token's compressor projections are kept. It runs once, before the layer loop; every
layer receives the result as a value and nothing downstream derives, caches or mutates metadata.
Per-layer results (the indexer's top-k) are not metadata: they flow only into their own layer.

Shapes: B batch rows, C chunk length (padded so the window blocks tile it), W sliding window,
Bq = min(W, C) query block, Kw window keys per block (W + Bq; W for a one-token chunk, see ``WindowMeta``),
nW windows that may close inside the chunk, R = rope dims.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .config import DeepseekV4Config
from .rope import inv_freq_for, rope_angles


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WindowMeta:
    """The sliding-window keys of a chunk (``attention.window_keys``), Kw per query block:

    C > 1: block b's keys are rows b*Bq .. b*Bq + W + Bq - 1 of concat(ring in position order, chunk),
      Kw = W + Bq, read before the ring is written (later tokens overwrite slots earlier queries need).
    C == 1 (decode): the keys are the ring itself in slot order after the token is written, Kw = W; the
      write evicts position t - W, so the ring then holds exactly t's window. ``ring_order`` is None.
    """

    ring_order: jax.Array | None  # [B, W] ring slot that holds position start - W + j; None when C == 1
    key_mask: jax.Array  # [B, C, Kw] key j of a query's block is in its window and exists
    ring_write_slot: jax.Array  # [B, C] ring slot (pos % W) for the last W real tokens, W = do not write


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressionMeta:
    """Bookkeeping for one compression ratio m; ``span`` = 2m with the CSA overlap, else m."""

    n_visible: jax.Array  # [B, C] compressed entries each query may use: (pos + 1) // m, 0 for padding
    window_ids: jax.Array  # [B, nW] absolute ids of the windows that may close in this chunk
    entry_write_index: jax.Array  # [B, nW] cache row of each closing window's entry, capacity = do not write
    entry_cos: jax.Array  # [B, nW, R/2] RoPE of entry w at position w * m (compress rope)
    entry_sin: jax.Array
    source_index: jax.Array  # [B, nW, span] row of concat(state ring, chunk) for each pooled token
    source_valid: jax.Array  # [B, nW, span] pooled token exists (position >= 0)
    state_write_slot: jax.Array  # [B, C] state ring slot (pos % span) for the last span tokens, span = no write


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ForwardMetadata:
    positions: jax.Array  # [B, C] absolute positions (padding continues the count)
    token_valid: jax.Array  # [B, C] real token (False for right padding)
    start: jax.Array  # [B] tokens already cached before this chunk
    end: jax.Array  # [B] tokens cached after this chunk
    rope: dict  # {"main" | "compress": (cos, sin) [B, C, R/2]}
    window: WindowMeta
    compression: dict  # {m: CompressionMeta} for each ratio used by the model
    topk_len: jax.Array | None  # [B, C] min(index_topk, visible CSA entries); None without CSA layers


def query_block(cfg: DeepseekV4Config, chunk_len: int) -> int:
    """Window queries are processed in blocks of Bq (see ``WindowMeta`` for their keys)."""
    return min(cfg.sliding_window, chunk_len)


def padded_chunk_len(cfg: DeepseekV4Config, chunk_len: int) -> int:
    bq = query_block(cfg, chunk_len)
    return -(-chunk_len // bq) * bq


def span_of(cfg: DeepseekV4Config, ratio: int) -> int:
    """Tokens pooled into one entry: 2m for the overlapping CSA compressor, m for HCA."""
    return 2 * ratio if ratio == cfg.csa_compress_rate else ratio


def _window_meta(W: int, bq: int, start: jax.Array, end: jax.Array, positions: jax.Array,
                 token_valid: jax.Array) -> WindowMeta:
    """start, end [B]; positions, token_valid [B, C] -> the window layout of ``WindowMeta``."""
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


def build_metadata(cfg: DeepseekV4Config, start: jax.Array, n_new: jax.Array, chunk_len: int,
                   capacity: int) -> ForwardMetadata:
    """start, n_new: [B] int; chunk_len: padded chunk length C (see ``padded_chunk_len``).

    ``capacity`` is the cache size in tokens; compressed caches hold ``capacity // m`` entries.
    """
    W = cfg.sliding_window
    C = chunk_len
    bq = query_block(cfg, C)
    assert C % bq == 0, f"chunk length {C} must be a multiple of the query block {bq}"
    start = start.astype(jnp.int32)
    end = start + n_new.astype(jnp.int32)
    offs = jnp.arange(C, dtype=jnp.int32)
    positions = start[:, None] + offs[None, :]
    token_valid = positions < end[:, None]

    rope = {kind: rope_angles(positions, inv_freq_for(cfg, kind)) for kind in ("main", "compress")}

    window = _window_meta(W, bq, start, end, positions, token_valid)

    compression = {}
    for m in cfg.compress_rates:
        span = span_of(cfg, m)
        n_windows = (m - 1 + C) // m
        window_ids = start[:, None] // m + jnp.arange(n_windows, dtype=jnp.int32)[None, :]
        closes = window_ids < end[:, None] // m
        n_entries = capacity // m
        src_pos = (window_ids[:, :, None] + 1) * m - span + jnp.arange(span, dtype=jnp.int32)[None, None, :]
        from_state = src_pos < start[:, None, None]
        src_index = jnp.where(from_state, src_pos % span, span + src_pos - start[:, None, None])
        cos, sin = rope_angles(window_ids * m, inv_freq_for(cfg, "compress"))
        compression[m] = CompressionMeta(
            n_visible=jnp.where(token_valid, (positions + 1) // m, 0),
            window_ids=window_ids,
            entry_write_index=jnp.where(closes & (window_ids < n_entries), window_ids, n_entries),
            entry_cos=cos,
            entry_sin=sin,
            source_index=jnp.clip(src_index, 0, span + C - 1),
            source_valid=src_pos >= 0,
            state_write_slot=jnp.where(token_valid & (positions >= end[:, None] - span), positions % span, span),
        )

    topk_len = None
    if cfg.csa_compress_rate in compression:
        topk_len = jnp.minimum(compression[cfg.csa_compress_rate].n_visible, cfg.index_topk)
    # The barrier makes the metadata buffers XLA computes once: without it XLA re-derives the RoPE cos/sin
    # inside each consumer fusion (14 per Flash-slice decode step), and past position ~105K float32 cos/sin
    # take their slow argument reduction, so those fusions grew with the context (GPU run 29).
    return jax.lax.optimization_barrier(
        ForwardMetadata(positions=positions, token_valid=token_valid, start=start, end=end, rope=rope,
                        window=window, compression=compression, topk_len=topk_len))
