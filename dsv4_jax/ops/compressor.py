"""The KV compressor's pooling: a chunk's closing windows into entries, and one decode step.

XLA: ``compress_chunk``; Pallas: kernels_pallas/compressor.py's prefill kernel (a chunk's entries) and its
decode-step kernel (pools the closing window and writes the cache row and the state ring in one kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from kernels_pallas.compressor import compress_decode_step, compress_prefill

from ..model.compression import CompressionMeta, CompressorState, window_spans
from ..model.kv_rows import Fp8Rows, compute_dtype, write_rows
from ..model.rope import apply_rope
from .choice import interpret, pallas
from .dense import rms_norm


def compress(kv, gate, state: CompressorState, cache_rows, meta: CompressionMeta, ape, norm_weight, *,
             eps: float, overlap: bool) -> tuple[jax.Array, CompressorState]:
    """kv, gate [B, C, coff * D] fp32 raw projections of a chunk -> (the compressed cache [B, N, D] with the
    chunk's closing windows written, the new state): a step of one token into a non-empty cache is
    ``compressor_decode_step``, anything else ``compressor_prefill`` and the writes. The cache is an array or
    FP8 records (model/kv_rows.py)."""
    if kv.shape[1] == 1 and cache_rows.shape[1]:
        return compressor_decode_step(kv, gate, state, cache_rows, meta, ape, norm_weight, eps=eps, overlap=overlap)
    entries, state = compressor_prefill(kv, gate, state, meta, ape, norm_weight, eps=eps, overlap=overlap,
                                        out_dtype=compute_dtype(cache_rows))
    return write_entries(cache_rows, entries, meta), state


def compressor_prefill(kv, gate, state: CompressorState, meta: CompressionMeta, ape, norm_weight, *, eps: float,
                       overlap: bool, out_dtype) -> tuple[jax.Array, CompressorState]:
    """kv, gate [B, C, coff * D] -> (the entries of the windows that close in the chunk [B, nW, D], the state
    after it); only rows with ``meta.entry_write_index < capacity`` are real entries."""
    if not pallas("compressor_prefill"):
        return compress_chunk(kv, gate, state, meta, ape, norm_weight, eps, overlap, out_dtype)
    return (pallas_chunk_entries(kv, gate, state, meta, ape, norm_weight, eps, overlap, out_dtype),
            write_state(state, kv, gate, meta))


def compressor_decode_step(kv, gate, state: CompressorState, cache_rows, meta: CompressionMeta, ape, norm_weight, *,
                           eps: float, overlap: bool) -> tuple[jax.Array, CompressorState]:
    """One token per row (kv, gate [B, 1, coff * D]) -> (compressed cache [B, N, D] with the closing windows'
    entries written, new state). Pallas: one kernel, which writes a cache of the model dtype; otherwise (XLA, or
    an FP8 cache, which only ``write_entries`` quantises) ``compressor_prefill`` and the writes."""
    if pallas("compressor_decode_step") and not isinstance(cache_rows, Fp8Rows):
        return pallas_decode_step(kv, gate, state, cache_rows, meta, ape, norm_weight, eps, overlap)
    entries, state = compressor_prefill(kv, gate, state, meta, ape, norm_weight, eps=eps, overlap=overlap,
                                        out_dtype=compute_dtype(cache_rows))
    return write_entries(cache_rows, entries, meta), state


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
    idx, exists = meta.token_index, meta.token_valid
    src_kv = jnp.concatenate([state.kv, kv.astype(jnp.float32)], axis=1)
    src_gate = jnp.concatenate([state.gate, gate.astype(jnp.float32)], axis=1)
    tok_kv = jnp.where(exists[..., None], jnp.take_along_axis(src_kv, idx[..., None], axis=1), 0.0)
    tok_gate = jnp.where(exists[..., None], jnp.take_along_axis(src_gate, idx[..., None], axis=1), ABSENT_GATE)
    cos, sin = meta.entry_cos, meta.entry_sin
    if overlap:  # the dropped leading window's angle is never used
        cos, sin = jnp.concatenate([cos[:, :1], cos], axis=1), jnp.concatenate([sin[:, :1], sin], axis=1)
    entries = compress_prefill(tok_kv, tok_gate, ape, norm_weight, cos, sin, ratio=ape.shape[0], overlap=overlap,
                               eps=eps, out_dtype=out_dtype, interpret=interpret())
    return entries[:, 1:] if overlap else entries


def pallas_decode_step(kv, gate, state: CompressorState, cache_rows, meta: CompressionMeta, ape, norm_weight,
                       eps: float, overlap: bool) -> tuple[jax.Array, CompressorState]:
    """A decode step through the Pallas decode-step kernel: (compressed cache [B, N, D], new state), as
    ``write_entries`` and ``write_state`` after ``compress_chunk``, in one kernel: it pools the closing window
    from the old state ring plus the new token (kv, gate [B, 1, coff * D]) into cache row
    ``entry_write_index``, and writes the new token into the ring at ``state_write_slot`` (rows that are
    not decoding keep both)."""
    _, new_kv, new_gate, cache_rows = compress_decode_step(
        kv[:, 0].astype(jnp.float32), gate[:, 0].astype(jnp.float32), state.kv, state.gate,
        meta.state_write_slot[:, 0], meta.entry_write_index[:, 0], ape, norm_weight, meta.entry_cos[:, 0],
        meta.entry_sin[:, 0], cache_rows, ratio=ape.shape[0], overlap=overlap, eps=eps, out_dtype=cache_rows.dtype,
        interpret=interpret())
    return cache_rows, CompressorState(kv=new_kv, gate=new_gate)


def write_entries(cache_rows, entries: jax.Array, meta: CompressionMeta):
    """Scatter closing windows' entries [B, nW, D] into the compressed cache [B, N, D] (an array or FP8
    records) at row w."""
    rows = jnp.arange(cache_rows.shape[0])[:, None]
    return write_rows(cache_rows, (rows, meta.entry_write_index), entries)
