"""Rolling a chunk's cache writes back for the tokens a speculative verify step rejects.

A verify chunk writes every one of its tokens into each layer's caches: the window ring at ``pos % W``, the
compressor's (and the indexer's) state ring at ``pos % span``, and the entries (and indexer keys) of the windows
the chunk closes, at row w. Before the layers run, ``undo_rows`` reads what those rows held (the slots are the
chunk's metadata, nothing is derived per layer); once the accepted length is known, ``roll_back`` writes the
old rows back wherever the token that overwrote them is rejected: a ring slot whose token's position is past
the kept end, an entry whose window closes past it. The caches then hold exactly what a fresh prefill of the
kept tokens leaves, provided every token of the chunk wrote (a chunk no longer than the window and each state
ring: ``max_verify_tokens``), so no kept token's row is missing and no slot is written twice.

Every leaf of a cache field has the field's row axis right after its batch axis ([B, rows, ...]; an FP8 record's
leaves too; a pipeline's stacked caches put their stage and layer axes before both), so the gathers and scatters
run over whatever leaves a cache holds, each with its ``Site``.

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


@dataclasses.dataclass(frozen=True)
class Site:
    """Which of a chunk's written rows (``write_sites``) a cache leaf holds: ``kind`` ("ring", "state" or
    "entries"), ``ratio`` (the compression ratio; 0 for the ring), and ``lead``, the axes before the leaf's batch
    axis (a pipeline's stacked caches: [stage, layer, B, rows, ...]). Not a pytree node: a tree of Sites mirrors a
    cache leaf for leaf."""

    kind: str
    ratio: int
    lead: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return self.kind, self.ratio


def field_site(field: str, ratio: int, lead: int = 0) -> Site:
    """The Site of a leaf of cache field ``field`` in a layer of compression ``ratio``."""
    kind = FIELD_SITES[field]
    return Site(kind, 0 if kind == "ring" else ratio, lead)


def layer_sites(cfg: DeepseekV4Config, cache: tuple) -> tuple:
    """Per-layer caches (``init_cache``'s tuple) -> the same tree with each leaf's Site."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: field_site(path[1].name, cfg.layer_compress_rate(path[0].idx)), cache)


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


def undo_rows(sites, cache, meta: ForwardMetadata):
    """The rows a chunk of ``meta`` is about to overwrite, read before its layers run: ``cache``'s tree with each
    leaf's values at the written rows [..., B, K, ...] (where it writes none, the last row: never restored).
    ``sites``: the cache's Sites (``layer_sites``)."""
    written = write_sites(meta)

    def take(site, leaf):
        rows = written[site.key][0]
        index = rows.reshape(*(1,) * site.lead, *rows.shape, *(1,) * (leaf.ndim - site.lead - 2))
        return jnp.take_along_axis(leaf, index, axis=site.lead + 1, mode="clip")
    return jax.tree.map(take, sites, cache)


def roll_back(sites, cache, undo, meta: ForwardMetadata, keep_end: jax.Array):
    """Caches after the chunk of ``meta`` -> caches holding only its tokens before ``keep_end`` [B] (absolute
    positions): every row written by a token at or past ``keep_end`` gets its ``undo_rows`` value back."""
    batch = jnp.arange(keep_end.shape[0])[:, None]
    restore = {site: jnp.where(writer >= keep_end[:, None], rows, DROP)
               for site, (rows, writer) in write_sites(meta).items()}
    return jax.tree.map(
        lambda site, leaf, old: leaf.at[(slice(None),) * site.lead + (batch, restore[site.key])].set(old, mode="drop"),
        sites, cache, undo)
