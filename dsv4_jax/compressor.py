"""KV compressor: pools every m tokens into one compressed entry (CSA m=4 overlapping, HCA m=128).

Entry w = RoPE_{w*m}(RMSNorm(sum_j softmax_j(gate_j + ape_j) * kv_j)), with the softmax taken over the
window's slots separately per channel, in fp32. The overlapping (CSA) layout pools 2m slots: the
a-halves of window w-1 and the b-halves of window w; for w = 0 the a-half slots do not exist.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .basic import Linear, RMSNorm, rms_norm
from .cache import CompressorState
from .config import DeepseekV4Config
from .metadata import CompressionMeta
from .rope import apply_rope


def pool_windows(values: jax.Array, logits: jax.Array, ape: jax.Array, overlap: bool) -> jax.Array:
    """Softmax-pool gathered windows.

    values, logits: [B, nW, span, coff * D] fp32 (logits already -inf where a token does not exist);
    ape: [m, coff * D]. Returns [B, nW, D] fp32.
    """
    if overlap:
        m, width = ape.shape
        d = width // 2
        values = jnp.concatenate([values[:, :, :m, :d], values[:, :, m:, d:]], axis=2)
        logits = jnp.concatenate([logits[:, :, :m, :d] + ape[:, :d], logits[:, :, m:, d:] + ape[:, d:]], axis=2)
    else:
        logits = logits + ape
    weights = jax.nn.softmax(logits, axis=2)
    return jnp.sum(weights * values, axis=2)


def compress_chunk(kv: jax.Array, gate: jax.Array, state: CompressorState, meta: CompressionMeta, ape: jax.Array,
                   norm_weight: jax.Array, eps: float, overlap: bool, out_dtype):
    """Emit the entries of the windows that close in this chunk and update the compressor state.

    kv, gate: [B, C, coff * D] raw projections of the chunk. Returns (entries [B, nW, D], new state);
    only rows with ``meta.entry_write_index < capacity`` are real entries.
    """
    B, nW, span = meta.source_index.shape
    kv = kv.astype(jnp.float32)
    gate = gate.astype(jnp.float32)
    src_kv = jnp.concatenate([state.kv, kv], axis=1)
    src_gate = jnp.concatenate([state.gate, gate], axis=1)
    idx = meta.source_index.reshape(B, nW * span, 1)
    valid = meta.source_valid[..., None]
    g_kv = jnp.take_along_axis(src_kv, idx, axis=1).reshape(B, nW, span, -1)
    g_gate = jnp.take_along_axis(src_gate, idx, axis=1).reshape(B, nW, span, -1)
    pooled = pool_windows(jnp.where(valid, g_kv, 0.0), jnp.where(valid, g_gate, -jnp.inf),
                          ape.astype(jnp.float32), overlap)
    entries = apply_rope(rms_norm(pooled, norm_weight, eps), meta.entry_cos, meta.entry_sin).astype(out_dtype)

    rows = jnp.arange(B)[:, None]
    new_state = CompressorState(
        kv=state.kv.at[rows, meta.state_write_slot].set(kv, mode="drop"),
        gate=state.gate.at[rows, meta.state_write_slot].set(gate, mode="drop"),
    )
    return entries, new_state


def write_entries(cache_rows: jax.Array, entries: jax.Array, meta: CompressionMeta) -> jax.Array:
    """Scatter closing windows' entries into the compressed cache [B, N, D] at row w."""
    rows = jnp.arange(cache_rows.shape[0])[:, None]
    return cache_rows.at[rows, meta.entry_write_index].set(entries.astype(cache_rows.dtype), mode="drop")


class Compressor(nnx.Module):
    """Projections, position bias (``ape``) and norm of one compressor.

    The attention compressor of a CSA layer also owns the lightning indexer (``self.indexer``),
    mirroring the checkpoint layout ``self_attn.compressor.indexer.*``.
    """

    def __init__(self, cfg: DeepseekV4Config, ratio: int, head_dim: int, overlap: bool, *, dtype, rngs: nnx.Rngs,
                 indexer: nnx.Module | None = None):
        coff = 2 if overlap else 1
        self.ratio = ratio
        self.overlap = overlap
        self.eps = cfg.rms_norm_eps
        self.kv_proj = Linear(cfg.hidden_size, coff * head_dim, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, coff * head_dim, dtype=dtype, rngs=rngs)
        self.position_bias = nnx.Param(0.02 * jax.random.normal(rngs.params(), (ratio, coff * head_dim), jnp.float32))
        self.kv_norm = RMSNorm(head_dim, cfg.rms_norm_eps)
        self.indexer = nnx.data(indexer)

    def compress(self, x, state: CompressorState, cache_rows: jax.Array, meta: CompressionMeta):
        """x [B, C, d] -> (updated cache rows [B, N, D], new state)."""
        kv = self.kv_proj(x, out_dtype=jnp.float32)
        gate = self.gate_proj(x, out_dtype=jnp.float32)
        entries, state = compress_chunk(kv, gate, state, meta, self.position_bias[...], self.kv_norm.weight[...],
                                        self.eps, self.overlap, cache_rows.dtype)
        return write_entries(cache_rows, entries, meta), state

