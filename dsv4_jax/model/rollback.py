"""Rolling a chunk's cache writes back for the tokens a speculative verify step rejects.

A verify chunk writes every one of its tokens into each layer's caches: the window ring at ``pos % W``, the
compressor's (and the indexer's) state ring at ``pos % span``, and the entries (and indexer keys) of the windows
the chunk closes, at row w. Before the layers run, ``undo_rows`` reads what those rows held (the slots are the
chunk's metadata, nothing is derived per layer); once the accepted length is known, ``roll_back`` writes the
old rows back wherever the token that overwrote them is rejected: a ring slot whose token's position is past
the kept end, an entry whose window closes past it. The caches then hold exactly what a fresh prefill of the
kept tokens leaves, provided every token of the chunk wrote (a chunk no longer than the window and each state
ring: ``max_verify_tokens``), so no kept token's row is missing and no slot is written twice.

Every leaf of a cache field has the field's row axis second ([B, rows, ...]; an FP8 record's leaves too), so
the gathers and scatters run over whatever leaves a field holds.

Shapes: B batch rows, C chunk length, nW windows that may close in the chunk.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .compression import span_of
from .config import DeepseekV4Config
from .metadata import ForwardMetadata


def max_verify_tokens(cfg: DeepseekV4Config) -> int:
    """The longest chunk whose writes ``roll_back`` can undo: the window, and each compressor's state ring."""
    return min([cfg.sliding_window] + [span_of(cfg, m) for m in cfg.compress_rates])


FIELD_SITES = {"window_kv": "ring", "compressor": "state", "indexer": "state", "compressed_kv": "entries",
               "index_keys": "entries"}  # cache field -> which rows of the chunk's metadata it writes
DROP = jnp.iinfo(jnp.int32).max  # a row index past every cache: the scatter drops it


def write_sites(meta: ForwardMetadata) -> dict:
    """The rows a chunk writes, from its metadata, once for every layer: {(kind, ratio): (rows [B, K] (past the
    array where it writes none), position of the token whose write it is [B, K])}, kind "ring" (ratio 0: every
    layer's window), "state" (the compressor state rings) or "entries" (the entries and indexer keys, written by
    the window's closing token at position (w + 1) * m - 1). K = C, or nW for the entries."""
    sites = {("ring", 0): (meta.window.ring_write_slot, meta.positions)}
    for m, cm in meta.compression.items():
        sites["state", m] = (cm.state_write_slot, meta.positions)
        sites["entries", m] = (cm.entry_write_index, (cm.window_ids + 1) * m - 1)
    return sites


def _fields(cfg: DeepseekV4Config, cache: tuple):
    """(layer, field name, its value, its site key) for every cache field the layers hold."""
    for layer, layer_cache in enumerate(cache):
        for name, kind in FIELD_SITES.items():
            value = getattr(layer_cache, name)
            if value is not None:
                yield layer, name, value, (kind, 0 if kind == "ring" else cfg.layer_compress_rate(layer))


def undo_rows(cfg: DeepseekV4Config, cache: tuple, meta: ForwardMetadata) -> tuple[dict, ...]:
    """The rows a chunk of ``meta`` is about to overwrite, read before its layers run: per layer {field: that
    field's leaves at the written rows [B, K, ...]} (where it writes none, the last row: never restored)."""
    sites = write_sites(meta)
    undo = tuple({} for _ in cache)
    for layer, name, value, site in _fields(cfg, cache):
        rows = sites[site][0]
        undo[layer][name] = jax.tree.map(
            lambda leaf: jnp.take_along_axis(leaf, rows.reshape(*rows.shape, *(1,) * (leaf.ndim - 2)), axis=1,
                                             mode="clip"), value)
    return undo


def roll_back(cfg: DeepseekV4Config, cache: tuple, undo: tuple[dict, ...], meta: ForwardMetadata,
              keep_end: jax.Array) -> tuple:
    """Caches after the chunk of ``meta`` -> caches holding only its tokens before ``keep_end`` [B] (absolute
    positions): every row written by a token at or past ``keep_end`` gets its ``undo_rows`` value back."""
    batch = jnp.arange(keep_end.shape[0])[:, None]
    restore = {site: jnp.where(writer >= keep_end[:, None], rows, DROP)
               for site, (rows, writer) in write_sites(meta).items()}
    fields = [{} for _ in cache]
    for layer, name, value, site in _fields(cfg, cache):
        fields[layer][name] = jax.tree.map(lambda leaf, old: leaf.at[batch, restore[site]].set(old, mode="drop"),
                                           value, undo[layer][name])
    return tuple(dataclasses.replace(layer_cache, **f) for layer_cache, f in zip(cache, fields))
