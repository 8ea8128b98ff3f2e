"""Per-layer decode state as pytrees (donated through ``jax.jit`` by the engine), assembled from the pieces
of the concepts that own them.

Every layer keeps its sliding window ring (sliding_window.py). CSA/HCA layers add their compressed entries
(row w = window w) and the compressor state (compression.py); CSA layers add the indexer's keys and its
compressor state. Every array field declares its logical axes (model/spec.py ``axes_field``). The ring and the
compressed entries are K=V rows, kept as kv_rows.py says: arrays of the model dtype, or with
``kv_cache_dtype="fp8"`` FP8 records (``Fp8Window`` / ``Fp8Entries``, whose fields declare their own axes).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .compression import CompressorState, init_compressor_state, overlaps
from .config import DeepseekV4Config
from .kv_rows import Fp8Entries, Fp8Window, empty_rows
from .spec import axes_field


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    window_kv: jax.Array | Fp8Window = axes_field("batch", "window", "kv")  # [B, W, D]
    # [B, capacity // m, D]
    compressed_kv: jax.Array | Fp8Entries | None = axes_field("batch", "cache_seq", "kv", default=None)
    compressor: CompressorState | None = None
    index_keys: jax.Array | None = axes_field("batch", "cache_seq", "kv", default=None)  # [B, capacity // 4, D_I]
    indexer: CompressorState | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8LayerCache(LayerCache):
    """A LayerCache whose ring and compressed entries are FP8 records (``kv_cache_dtype="fp8"``). These two
    fields declare no axes here: the records' own fields do, and ``weights.sharding.cache_shardings`` places a
    field without declared axes by its value's."""

    window_kv: Fp8Window = dataclasses.field()
    compressed_kv: Fp8Entries | None = None


def init_layer_cache(cfg: DeepseekV4Config, layer: int, batch: int, capacity: int, dtype,
                     kv_cache_dtype: str = "auto") -> LayerCache:
    def rows(kind, n):
        return empty_rows(kind, (batch, n, cfg.head_dim), cfg.qk_rope_head_dim, dtype, kv_cache_dtype)

    layer_cache = LayerCache if kv_cache_dtype == "auto" else Fp8LayerCache
    window = rows(Fp8Window, cfg.sliding_window)
    m = cfg.layer_compress_rate(layer)
    if m == 0:
        return layer_cache(window_kv=window)
    cache = layer_cache(
        window_kv=window,
        compressed_kv=rows(Fp8Entries, capacity // m),
        compressor=init_compressor_state(cfg, m, cfg.head_dim, batch),
    )
    if overlaps(cfg, m):  # CSA: the indexer's keys and its own overlapping compressor
        cache = dataclasses.replace(
            cache,
            index_keys=jnp.zeros((batch, capacity // m, cfg.index_head_dim), dtype),
            indexer=init_compressor_state(cfg, m, cfg.index_head_dim, batch),
        )
    return cache


def init_cache(cfg: DeepseekV4Config, batch: int, capacity: int, dtype,
               kv_cache_dtype: str = "auto") -> tuple[LayerCache, ...]:
    """Empty caches for ``batch`` sequences of up to ``capacity`` tokens each, in ``dtype`` (the model's); the
    K=V rows in ``dtype`` too ("auto") or in the FP8 layout ("fp8", kv_rows.py)."""
    return tuple(init_layer_cache(cfg, i, batch, capacity, dtype, kv_cache_dtype)
                 for i in range(cfg.num_hidden_layers))
