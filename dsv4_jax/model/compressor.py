"""KV compressor: pools every m tokens into one compressed entry (CSA m=4 overlapping, HCA m=128).

Entry w = RoPE_{w*m}(RMSNorm(sum_j softmax_j(gate_j + ape_j) * kv_j)), with the softmax taken over the
window's slots separately per channel, in fp32. The overlapping (CSA) layout pools 2m slots: the
a-halves of window w-1 and the b-halves of window w; for w = 0 the a-half slots do not exist.

A CSA layer is the overlapping compressor plus the lightning indexer (indexer.py), which picks each query's
entries; an HCA layer is the non-overlapping compressor, each query attending to every visible entry.
``overlaps`` is the one place that tells them apart. The compressed cache keeps entry w in row w; the
compressor state (``CompressorState``) keeps the raw kv/gate projections of the last ``span`` tokens in a
ring by ``position % span``, which covers the open window and, with the overlap, the previous window's
a-half. ``compression_meta`` (run once per chunk by ``metadata.build_metadata``) derives, per ratio, which
windows close, where their entries go, which tokens each pools and where the state ring is written.

Shapes: B batch rows, C chunk length, nW windows that may close inside the chunk, L their tokens once each
((nW + 1) * m with the overlap, else nW * m), N = capacity // m cache rows, R = rope dims, coff = 2 with the
overlap (a- and b-halves), else 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from .config import DeepseekV4Config
from .layers import Linear, RMSNorm, rms_norm
from .rope import apply_rope, inv_freq_for, rope_angles


def overlaps(cfg: DeepseekV4Config, ratio: int) -> bool:
    """Whether the compressor of ``ratio`` is CSA's overlapping one (and its layers have an indexer)."""
    return ratio == cfg.csa_compress_rate


def span_of(cfg: DeepseekV4Config, ratio: int) -> int:
    """Tokens pooled into one entry: 2m for the overlapping CSA compressor, m for HCA."""
    return 2 * ratio if overlaps(cfg, ratio) else ratio


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressorState:
    kv: jax.Array  # [B, span, coff * D] fp32 raw projections
    gate: jax.Array  # [B, span, coff * D] fp32 raw gate logits (position bias added when pooling)


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
    m = ape.shape[0]
    kv = kv.astype(jnp.float32)
    gate = gate.astype(jnp.float32)
    src_kv = jnp.concatenate([state.kv, kv], axis=1)
    src_gate = jnp.concatenate([state.gate, gate], axis=1)
    idx, valid = meta.token_index[..., None], meta.token_valid[..., None]
    tok_kv = jnp.where(valid, jnp.take_along_axis(src_kv, idx, axis=1), 0.0)
    tok_gate = jnp.where(valid, jnp.take_along_axis(src_gate, idx, axis=1), -jnp.inf)
    pooled = pool_windows(window_spans(tok_kv, m, overlap), window_spans(tok_gate, m, overlap),
                          ape.astype(jnp.float32), overlap)
    entries = apply_rope(rms_norm(pooled, norm_weight, eps), meta.entry_cos, meta.entry_sin).astype(out_dtype)
    return entries, write_state(state, kv, gate, meta)


def write_state(state: CompressorState, kv: jax.Array, gate: jax.Array, meta: CompressionMeta) -> CompressorState:
    """Keep the chunk's raw fp32 projections [B, C, coff * D] of the last ``span`` real tokens in the state ring."""
    rows = jnp.arange(kv.shape[0])[:, None]
    return CompressorState(
        kv=state.kv.at[rows, meta.state_write_slot].set(kv, mode="drop"),
        gate=state.gate.at[rows, meta.state_write_slot].set(gate, mode="drop"),
    )


ABSENT_GATE = -1e30  # gate of a token that does not exist: weight exactly 0 next to any real token, and finite,
# so a window without real tokens pools to 0 instead of NaN


def pallas_chunk_entries(kv, gate, state: CompressorState, meta: CompressionMeta, ape, norm_weight, eps: float,
                         overlap: bool, out_dtype):
    """``compress_chunk``'s entries through the Pallas prefill kernel (kernels_pallas/compressor.py).

    The kernel pools consecutive windows of a token sequence that starts at a window boundary, with no a-half
    for its first window. It gets the chunk's window tokens in order (``meta.token_index``; missing ones with a
    zero kv and ``ABSENT_GATE``); with the overlap its first window is the a-half source of the chunk's first
    window, and its entry is dropped. Returns entries [B, nW, D].
    """
    from kernels_pallas.common import interpret_default
    from kernels_pallas.compressor import compress_prefill

    idx, exists = meta.token_index, meta.token_valid
    src_kv = jnp.concatenate([state.kv, kv.astype(jnp.float32)], axis=1)
    src_gate = jnp.concatenate([state.gate, gate.astype(jnp.float32)], axis=1)
    tok_kv = jnp.where(exists[..., None], jnp.take_along_axis(src_kv, idx[..., None], axis=1), 0.0)
    tok_gate = jnp.where(exists[..., None], jnp.take_along_axis(src_gate, idx[..., None], axis=1), ABSENT_GATE)
    cos, sin = meta.entry_cos, meta.entry_sin
    if overlap:  # the dropped leading window's angle is never used
        cos, sin = jnp.concatenate([cos[:, :1], cos], axis=1), jnp.concatenate([sin[:, :1], sin], axis=1)
    entries = compress_prefill(tok_kv, tok_gate, ape, norm_weight, cos, sin, ratio=ape.shape[0], overlap=overlap,
                               eps=eps, out_dtype=out_dtype, interpret=interpret_default())
    return entries[:, 1:] if overlap else entries


def pallas_decode_step(kv, gate, state: CompressorState, cache_rows, meta: CompressionMeta, ape, norm_weight,
                       eps: float, overlap: bool) -> tuple[jax.Array, CompressorState]:
    """A decode step through the Pallas decode-step kernel: (compressed cache [B, N, D], new state), as
    ``write_entries`` and ``write_state`` after ``compress_chunk``, in one kernel: it pools the closing window
    from the old state ring plus the new token (kv, gate [B, 1, coff * D]) into cache row
    ``entry_write_index``, and writes the new token into the ring at ``state_write_slot`` (rows that are
    not decoding keep both)."""
    from kernels_pallas.common import interpret_default
    from kernels_pallas.compressor import compress_decode_step

    _, new_kv, new_gate, cache_rows = compress_decode_step(
        kv[:, 0].astype(jnp.float32), gate[:, 0].astype(jnp.float32), state.kv, state.gate,
        meta.state_write_slot[:, 0], meta.entry_write_index[:, 0], ape, norm_weight, meta.entry_cos[:, 0],
        meta.entry_sin[:, 0], cache_rows, ratio=ape.shape[0], overlap=overlap, eps=eps, out_dtype=cache_rows.dtype,
        interpret=interpret_default())
    return cache_rows, CompressorState(kv=new_kv, gate=new_gate)


def write_entries(cache_rows: jax.Array, entries: jax.Array, meta: CompressionMeta) -> jax.Array:
    """Scatter closing windows' entries into the compressed cache [B, N, D] at row w."""
    rows = jnp.arange(cache_rows.shape[0])[:, None]
    return cache_rows.at[rows, meta.entry_write_index].set(entries.astype(cache_rows.dtype), mode="drop")


class Compressor(nnx.Module):
    """Projections, position bias (``ape``) and norm of one compressor.

    The attention compressor of a CSA layer also owns the lightning indexer (``self.indexer``),
    mirroring the checkpoint layout ``self_attn.compressor.indexer.*``.
    """

    def __init__(self, cfg: DeepseekV4Config, ratio: int, head_dim: int, *, dtype, rngs: nnx.Rngs,
                 indexer: nnx.Module | None = None):
        self.ratio = ratio
        self.overlap = overlaps(cfg, ratio)
        coff = 2 if self.overlap else 1
        self.eps = cfg.rms_norm_eps
        self.kv_proj = Linear(cfg.hidden_size, coff * head_dim, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, coff * head_dim, dtype=dtype, rngs=rngs)
        self.position_bias = nnx.Param(0.02 * jax.random.normal(rngs.params(), (ratio, coff * head_dim), jnp.float32))
        self.kv_norm = RMSNorm(head_dim, cfg.rms_norm_eps)
        self.indexer = nnx.data(indexer)

    def compress(self, x, state: CompressorState, cache_rows: jax.Array, meta: CompressionMeta, kernels: str = "xla"):
        """x [B, C, d] -> (updated cache rows [B, N, D], new state).

        ``kernels="pallas"`` pools with kernels_pallas/compressor.py: a chunk (C > 1) through the prefill
        kernel, a decode step (C = 1) through the decode-step kernel. The state ring is written the same way
        on both paths.
        """
        kv = self.kv_proj(x, out_dtype=jnp.float32)
        gate = self.gate_proj(x, out_dtype=jnp.float32)
        ape, norm_weight = self.position_bias[...], self.kv_norm.weight[...]
        if kernels != "pallas":
            entries, state = compress_chunk(kv, gate, state, meta, ape, norm_weight, self.eps, self.overlap,
                                            cache_rows.dtype)
            return write_entries(cache_rows, entries, meta), state
        if x.shape[1] == 1 and cache_rows.shape[1]:
            return pallas_decode_step(kv, gate, state, cache_rows, meta, ape, norm_weight, self.eps, self.overlap)
        entries = pallas_chunk_entries(kv, gate, state, meta, ape, norm_weight, self.eps, self.overlap,
                                       cache_rows.dtype)
        return write_entries(cache_rows, entries, meta), write_state(state, kv, gate, meta)
