"""The metadata upgrade: raw batch in, complete immutable forward metadata out.

``build_metadata`` is the one place where per-batch attention bookkeeping is derived: positions and
RoPE angles here, and the pieces of the concepts that own them: the sliding window's key masks and ring
write slots (``sliding_window.window_meta``), and for each compression ratio the visible entries, which
windows close in this chunk, where their entries are written, which tokens each pools and where each
token's compressor projections are kept (``compression.compression_meta``). It runs once, before the layer
loop; every layer receives the result as a value and nothing downstream derives, caches or mutates
metadata. Per-layer results (the indexer's top-k) are not metadata: they flow only into their own layer.

Shapes: B batch rows, C chunk length (padded so the window's query blocks tile it), R = rope dims.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .compression import CompressionMeta, compression_meta
from .config import DeepseekV4Config
from .rope import inv_freq_for, rope_angles
from .sliding_window import WindowMeta, query_block, window_meta


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ForwardMetadata:
    positions: jax.Array  # [B, C] absolute positions (padding continues the count)
    token_valid: jax.Array  # [B, C] real token (False for right padding)
    start: jax.Array  # [B] tokens already cached before this chunk
    end: jax.Array  # [B] tokens cached after this chunk
    rope: dict  # {"main" | "compress": (cos, sin) [B, C, R/2]}
    window: WindowMeta
    compression: dict[int, CompressionMeta]  # {m: CompressionMeta} for each ratio used by the model


def padded_chunk_len(cfg: DeepseekV4Config, chunk_len: int) -> int:
    bq = query_block(cfg, chunk_len)
    return -(-chunk_len // bq) * bq


def build_metadata(cfg: DeepseekV4Config, start: jax.Array, n_new: jax.Array, chunk_len: int,
                   capacity: int) -> ForwardMetadata:
    """start, n_new: [B] int; chunk_len: padded chunk length C (see ``padded_chunk_len``).

    ``capacity`` is the cache size in tokens; compressed caches hold ``capacity // m`` entries.
    """
    C = chunk_len
    bq = query_block(cfg, C)
    assert C % bq == 0, f"chunk length {C} must be a multiple of the query block {bq}"
    start = start.astype(jnp.int32)
    end = start + n_new.astype(jnp.int32)
    offs = jnp.arange(C, dtype=jnp.int32)
    positions = start[:, None] + offs[None, :]
    token_valid = positions < end[:, None]

    rope = {kind: rope_angles(positions, inv_freq_for(cfg, kind)) for kind in ("main", "compress")}
    window = window_meta(cfg, start, end, positions, token_valid)
    compression = {m: compression_meta(cfg, m, start, end, positions, token_valid, capacity)
                   for m in cfg.compress_rates}
    # The barrier makes the metadata buffers XLA computes once: without it XLA re-derives the RoPE cos/sin
    # inside each consumer fusion (14 per Flash-slice decode step), and past position ~105K float32 cos/sin
    # take their slow argument reduction, so those fusions grew with the context (GPU run 29).
    return jax.lax.optimization_barrier(
        ForwardMetadata(positions=positions, token_valid=token_valid, start=start, end=end, rope=rope,
                        window=window, compression=compression))
