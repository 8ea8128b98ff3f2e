"""CSA / HCA compression bookkeeping: which compressor overlaps, its state ring, and its per-chunk metadata.

Entry w = RoPE_{w*m}(RMSNorm(sum_j softmax_j(gate_j + ape_j) * kv_j)), with the softmax taken over the
window's slots separately per channel, in fp32. The overlapping (CSA) layout pools 2m slots: the
a-halves of window w-1 and the b-halves of window w; for w = 0 the a-half slots do not exist.

A CSA layer is the overlapping compressor plus the lightning indexer (indexer.py), which picks each query's
entries; an HCA layer is the non-overlapping compressor, each query attending to every visible entry.
``overlaps`` is the one place that tells them apart. The compressed cache keeps entry w in row w; the
compressor state (``CompressorState``) keeps the raw kv/gate projections of the last ``span`` tokens in a
ring by ``position % span``, which covers the open window and, with the overlap, the previous window's
a-half. ``compression_meta`` (run once per chunk by ``metadata.build_metadata``) derives, per ratio, which
windows close, where their entries go, which tokens each pools and where the state ring is written. The
pooling itself is an op (dsv4_jax/ops/compressor.py); the module with the projections is compressor.py.

Shapes: B batch rows, C chunk length, nW windows that may close inside the chunk, L their tokens once each
((nW + 1) * m with the overlap, else nW * m), N = capacity // m cache rows, R = rope dims, coff = 2 with the
overlap (a- and b-halves), else 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .config import DeepseekV4Config
from .rope import inv_freq_for, rope_angles
from .spec import axes_field


def overlaps(cfg: DeepseekV4Config, ratio: int) -> bool:
    """Whether the compressor of ``ratio`` is CSA's overlapping one (and its layers have an indexer)."""
    return ratio == cfg.csa_compress_rate


def span_of(cfg: DeepseekV4Config, ratio: int) -> int:
    """Tokens pooled into one entry: 2m for the overlapping CSA compressor, m for HCA."""
    return 2 * ratio if overlaps(cfg, ratio) else ratio


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressorState:
    kv: jax.Array = axes_field("batch", "span", "kv")  # [B, span, coff * D] fp32 raw projections
    # [B, span, coff * D] fp32 raw gate logits (position bias added when pooling)
    gate: jax.Array = axes_field("batch", "span", "kv")


def init_compressor_state(cfg: DeepseekV4Config, ratio: int, head_dim: int, batch: int) -> CompressorState:
    """An empty state ring of the compressor of ``ratio`` with entries of ``head_dim`` channels."""
    width = (2 if overlaps(cfg, ratio) else 1) * head_dim
    shape = (batch, span_of(cfg, ratio), width)
    return CompressorState(kv=jnp.zeros(shape, jnp.float32), gate=jnp.zeros(shape, jnp.float32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressionMeta:
    """Bookkeeping for one compression ratio m; ``span`` = 2m with the CSA overlap, else m."""

    n_visible: jax.Array  # [B, C] compressed entries each query may use: (pos + 1) // m, 0 for padding
    window_ids: jax.Array  # [B, nW] absolute ids of the windows that may close in this chunk
    entry_write_index: jax.Array  # [B, nW] cache row of each closing window's entry, N = do not write
    entry_cos: jax.Array  # [B, nW, R/2] RoPE of entry w at position w * m (compress rope)
    entry_sin: jax.Array
    token_index: jax.Array  # [B, L] row of concat(state ring, chunk) of each window token (``window_spans``)
    token_valid: jax.Array  # [B, L] that token exists (position >= 0)
    state_write_slot: jax.Array  # [B, C] state ring slot (pos % span) for the last span tokens, span = no write
    visible_ids: jax.Array | None  # [B, C, N] HCA: entry ids each query attends to, -1 past n_visible; else None


def window_spans(tokens: jax.Array, m: int, overlap: bool) -> jax.Array:
    """The chunk's window tokens [B, L, ...] (once each, in position order: ``CompressionMeta.token_index``)
    -> the tokens each window pools [B, nW, span, ...]. With the overlap window i pools list rows
    i*m .. i*m + 2m - 1 (the previous window's tokens, then its own), so L = (nW + 1) * m; else rows
    i*m .. i*m + m - 1, L = nW * m."""
    B, L = tokens.shape[:2]
    span = 2 * m if overlap else m
    nW = (L - span) // m + 1
    if nW == 1 or not overlap:  # the spans tile the list (a decode step's one window: the list is its span)
        return tokens.reshape(B, nW, span, *tokens.shape[2:])
    halves = [tokens[:, : nW * m], tokens[:, m:]]
    return jnp.concatenate([h.reshape(B, nW, m, *tokens.shape[2:]) for h in halves], axis=2)


def visible_entry_ids(n_visible: jax.Array, n_entries: int) -> jax.Array:
    """n_visible [B, C] -> ids [B, C, N] of every entry a query may see (HCA), -1 past its visible count."""
    entry = jnp.arange(n_entries, dtype=jnp.int32)
    return jnp.where(entry < n_visible[..., None], entry, -1)


def compression_meta(cfg: DeepseekV4Config, ratio: int, start: jax.Array, end: jax.Array, positions: jax.Array,
                     token_valid: jax.Array, capacity: int) -> CompressionMeta:
    """start, end [B]; positions, token_valid [B, C]; ``capacity`` tokens -> ``CompressionMeta`` of ``ratio``."""
    m = ratio
    C = positions.shape[1]
    span = span_of(cfg, m)
    n_windows = (m - 1 + C) // m
    window_ids = start[:, None] // m + jnp.arange(n_windows, dtype=jnp.int32)[None, :]
    closes = window_ids < end[:, None] // m
    n_entries = capacity // m
    # the window tokens: from the first window's first pooled token (its a-half with the overlap) on
    tok_pos = (window_ids[:, :1] + 1) * m - span + jnp.arange(n_windows * m + span - m, dtype=jnp.int32)[None, :]
    from_state = tok_pos < start[:, None]
    tok_index = jnp.where(from_state, tok_pos % span, span + tok_pos - start[:, None])
    cos, sin = rope_angles(window_ids * m, inv_freq_for(cfg, "compress"))
    n_visible = jnp.where(token_valid, (positions + 1) // m, 0)
    return CompressionMeta(
        n_visible=n_visible,
        window_ids=window_ids,
        entry_write_index=jnp.where(closes & (window_ids < n_entries), window_ids, n_entries),
        entry_cos=cos,
        entry_sin=sin,
        token_index=jnp.clip(tok_index, 0, span + C - 1),
        token_valid=tok_pos >= 0,
        state_write_slot=jnp.where(token_valid & (positions >= end[:, None] - span), positions % span, span),
        visible_ids=None if overlaps(cfg, m) else visible_entry_ids(n_visible, n_entries),
    )
