"""Sparse MQA attention with a per-head sink (DeepSeek-V4 §8): decode (one query token per sequence) and
prefill (a chunk of C query tokens per sequence), one kernel.

    sparse_attention_decode(q [B,H,D], window_kv [B,Wk,D], window_valid [B,Wk] bool, entries [B,N,D],
                            entry_idx [B,K] int32 (-1 = none), sinks [H] f32, scale) -> [B,H,D]
    sparse_attention_prefill(q [B,C,H,D], win_keys [B,C/Bq,Kw,D], win_mask [B,C,Kw] bool, entries [B,N,D],
                             entry_ids [B,C,K] int32 (-1 = none), sinks [H] f32, scale) -> [B,C,H,D]

Keys are the valid window rows plus ``entries[b, entry_idx[b, j]]`` for every ``entry_idx >= 0``; the
values are the keys (K = V, one KV head shared by all H query heads). Logits ``q.k * scale`` in fp32, one
softmax over all keys plus the raw sink logit ``sinks[h]`` (denominator only, zero value). A row without any
valid key returns 0. ``reference`` below is the plain-jnp definition; ``sparse_attention_decode`` the kernel
(``sparse_attention_prefill`` for a chunk).
Prefill is the same per query token: token t of a chunk uses the window block ``win_keys[:, t // Bq]`` under
its own mask row ``win_mask[:, t]``, and its own id row ``entry_ids[:, t]``: the indexer's top-k picks on CSA
layers, ``arange(N)`` masked to -1 from the query's visible count on HCA layers (the model's layouts). The
window blocks are the model's (``dsv4_jax.model.sliding_window.window_keys``): Kw = W + Bq
ring/chunk rows per query block for a chunk of C > 1 tokens; for the model's decode step (C = 1) the written
ring itself in slot order, Kw = W. The kernel takes any Kw the block and mask shapes agree on.
``reference_prefill`` is ``reference`` applied to every query token.

Backend: the Pallas **Triton** backend (``jax.experimental.pallas.triton``). It is deprecated upstream but
present and working in the pinned jax 0.11.2, and it is the only Pallas GPU backend that lowers what this
kernel is made of: a **gather by index array** (``entries_ref.at[idx]``, fails in Mosaic GPU with
"int_indexer_shape non-empty"), **masked loads** (``plt.load(..., mask=, other=)``; Mosaic GPU has none) and
``jnp.dot`` on register values (tensor-core ``mma``/``wgmma`` chosen by Triton; bf16 x bf16 -> fp32).
Mosaic GPU would need a hand-written TMA gather pipeline; that is the port to do when Triton is removed.
Prefill needs the same three things (each query's picks are a row gather, its window band a masked load), so
it stays on Triton and is the same kernel: a decode step is a chunk of one query token.

Design (flash-decoding over a gathered key list; decode is the prefill kernel with one query token):

* Grid ``(H/block_h, C * num_splits, B)``: one program per (head block, query token, split). The head block
  is the fastest grid axis (CUDA ``blockIdx.x``), then the split, then the query token, so the programs that
  run side by side are the head blocks and splits of one query token and its neighbours: the key rows they
  re-read come from L2, not HBM.
* One program owns ``block_h`` heads of one query token and streams ``block_k`` keys per step with an online
  softmax (exp2 domain, scale * log2(e) folded into the fp32 logits). A step is two tensor-core matmuls:
  ``[block_h, D] @ [D, block_k]`` (logits) and ``[block_h, block_k] @ [block_k, D]`` (P V, P cast to bf16,
  fp32 accumulate). Window blocks are contiguous masked loads, entry blocks are a masked row gather from
  ``entries`` by index; invalid rows are never read (masked, ``other=0``), so garbage or NaN in unused cache
  slots cannot leak into the output.
* Block sizes. D = 512 is large: the fp32 accumulator ``[block_h, 512]`` lives in registers for the whole key
  loop. All 64 heads in one program would be 128 KB of accumulator (256 registers/thread at 4 warps, 128 at 8)
  and measured slower (presumably register spills). Default ``block_h = 32`` (64 KB = 128
  registers/thread at ``num_warps = 4``), ``block_k = 64`` (a 64 KB bf16 key tile per stage in shared memory,
  ``num_stages = 3``; ``block_k = 128`` with 3 stages exceeds the 227 KB of shared memory). With fewer than
  ~66 programs (few query tokens) the default drops to ``block_h = 16`` to double the programs. Heads are padded
  inside the wrapper to a multiple of ``block_h`` (>= 16, the smallest tensor-core M) for odd head counts; the
  real 64 / 128 heads need no padding. D must be a power of two (Triton block shapes); 512 and 64 are.
  With M = 16-32 rows Triton most likely emits ``mma.sync`` rather than ``wgmma`` (which wants 64 rows per
  warpgroup; not checked in the PTX); the matmul rate, not HBM, bounds the kernel at large batch (below).
* The sink is folded into the online softmax of split 0 as its initial state (m = sink, l = 1, acc = 0), so
  no special case exists for "no valid key": that row ends with acc = 0, output 0.
* Work skipping: each program reduces its token's validity rows to bounds (first and last valid window
  row, last valid ``entry_idx`` + 1) and only walks blocks between those, so a prefill query's window
  walk starts at its band (row r + 1 of its block's W + Bq rows) instead of row 0, and HCA's ``arange(N)``
  masked to the visible count costs the visible entries, not N. -1 holes inside the bounds are masked, not
  skipped.
* Split-K (``num_splits`` > 1) for small batches: the token's (window + entry) key blocks are divided
  evenly among the splits (dynamically, from the actual lengths); each split writes a normalised bf16 partial
  plus its running max / sum, and a small fp32 JAX epilogue merges them (log-sum-exp). With D = 512 and 64
  heads a partial is as large as 64 key rows, so splitting costs HBM traffic; ``choose_tuning``
  splits only when ``B * C * H/block_h`` programs leave over a quarter of the 132 SMs idle, and then aims at
  about two programs per SM. With one split the kernel writes the final bf16 output directly and no epilogue
  runs. At 64 heads a batch of a few dozen query tokens (B * C >= 25) already fills the SMs, so prefill
  chunks do not split.

Prefill (a chunk of C query tokens; FlashMLA's sparse prefill has the same structure): heads are the M
dimension of the tensor-core tiles and every query token has its own program row, because on CSA layers every
query has its own k picks. A tile of several query tokens x heads would have to stream the union of their key
lists with most of it masked, and would not get a larger M anyway: M is capped by the fp32 [M, 512]
accumulator (M = 32 at 4 warps), not by the head count. What query tokens of one sequence do share (the
window block of W + Bq rows, on HCA layers the whole entry list, on CSA layers the sequence's compressed cache
the picks come from: 2048 rows = 2 MB at 8K tokens, 8 MB at 32K) is re-read from the 50 MB L2 by neighbouring
programs (grid order above), so HBM traffic is about q + output + each key row once.

Bounds. On Flash CSA chunks prefill does far more FLOPs per HBM byte than the H200's ridge, so the
tensor-core rate bounds it; HCA layers attend to fewer keys per query, proportionally less work. Decode at
large batch runs well below the HBM roofline: with the fp32 [32, 512] accumulator (128 registers a thread at
4 warps) only two 4-warp programs fit on an SM and most cycles have no warp ready to issue; Triton's
``wgmma`` variant (64 heads, 8 warps) spills the [64, 512] accumulator and fits one program per SM (slower).
Both need the 512-wide accumulator split over two warpgroups under an explicit register budget
(FlashMLA-style, all 64 heads per program, which also halves the L2 traffic), i.e. a Mosaic GPU kernel. The
estimate, the measurements and the sweeps behind the defaults: docs/performance.md, Kernel design notes.

Entries with ``entry_idx >= N`` are treated as invalid (never read) in both the kernel and the reference;
callers should not pass them.

FP8 keys. The window block and the entries may each be given as an array [..., D] or as DeepSeek's FP8 record
(dsv4_jax/model/kv_rows.py), a tuple (nope e4m3 [..., D - R], rope bf16 [..., R], scale uint8
[..., ceil((D - R) / 64)]: one ue8m0 byte, 2^(byte - 127), per 64 nope channels). The kernel then dequantises
each key tile as it loads it, [block_k, D] as three masked loads on the same row gather (columns < D - R from
nope and scale, the rest from rope; a scale byte becomes its fp32 power of two by a shift into the exponent
bits) and a multiply, so HBM carries 583 bytes a key instead of 1,024 and no dequantised copy is written. The
tile it builds is exactly the dequantised row in q's dtype (a 3-bit mantissa times a power of two), so the
result equals the kernel's on the dequantised arrays bit for bit. The references take arrays: dequantise first.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .common import NUM_SMS, check_tuning, triton_call

LOG2E = math.log2(math.e)
NEG = -1e30  # finite "minus infinity": keeps exp2(m_old - m_new) finite when nothing is valid yet
FP8_BLOCK = 64  # nope channels per scale byte of the FP8 record (dsv4_jax/model/kv_rows.py FP8_BLOCK)


# ----------------------------------------------------------------------------------------------------------
# References (the definition)
# ----------------------------------------------------------------------------------------------------------


def reference(q, window_kv, window_valid, entries, entry_idx, sinks, scale):
    """Plain-jnp sparse sink attention for one query per sequence; fp32 logits and softmax.

    q [B,H,D]; window_kv [B,Wk,D]; window_valid [B,Wk] bool; entries [B,N,D]; entry_idx [B,K] int32 (-1 none);
    sinks [H] f32. Returns [B,H,D] in q's dtype.
    """
    N = entries.shape[1]
    ent_valid = (entry_idx >= 0) & (entry_idx < N)
    ent = jnp.take_along_axis(entries, jnp.clip(entry_idx, 0, N - 1)[:, :, None], axis=1)  # [B,K,D]
    keys = jnp.concatenate([window_kv, ent], axis=1)  # [B,Wk+K,D]
    valid = jnp.concatenate([window_valid.astype(bool), ent_valid], axis=1)
    keys = jnp.where(valid[:, :, None], keys, jnp.zeros((), keys.dtype))  # invalid slots may hold garbage
    logits = jnp.einsum("bhd,bkd->bhk", q, keys, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(valid[:, None, :], logits, -jnp.inf)
    B, H = q.shape[:2]
    sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None], (B, H, 1))
    probs = jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]
    out = jnp.einsum("bhk,bkd->bhd", probs, keys.astype(jnp.float32), preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def reference_prefill(q, win_keys, win_mask, entries, entry_ids, sinks, scale):
    """``reference`` for every query token of a chunk.

    q [B,C,H,D]; win_keys [B,C/Bq,Kw,D] (token t uses block t // Bq); win_mask [B,C,Kw] bool;
    entries [B,N,D]; entry_ids [B,C,K] int32 (-1 none); sinks [H] f32. Returns [B,C,H,D] in q's dtype.
    """
    C = q.shape[1]
    block_of_token = jnp.arange(C) // (C // win_keys.shape[1])
    per_token = jax.vmap(lambda qt, wk, wm, ids: reference(qt, wk, wm, entries, ids, sinks, scale),
                         in_axes=1, out_axes=1)
    return per_token(q, win_keys[:, block_of_token], win_mask, entry_ids)


# ----------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------


def _valid_bounds(valid, pos, size: int):
    """valid, pos [L] (bool, int32; L may pad past ``size``) -> (first valid pos, last valid pos + 1), both
    scalars; (0, 0) if none."""
    end = jnp.max(jnp.where(valid, pos + 1, 0))
    return jnp.minimum(jnp.min(jnp.where(valid, pos, size)), end), end


def _key_rows(refs, rows, valid, d: int, dtype):
    """Rows ``rows`` [block_k] int32 of one key source (where ``valid``; the others 0) -> [block_k, d]: refs
    (keys [L, d],) as they are, or an FP8 record (nope [L, d - R], rope [L, R], scale [L, nb]) dequantised to
    ``dtype`` (module docstring). The row gather is a pure integer-array index (rows x columns): one tensor of
    pointers in Triton, and interpret mode supports it (mixed array/slice indexing it does not)."""
    shape = (rows.shape[0], d)
    r = jnp.broadcast_to(jnp.where(valid, rows, 0)[:, None], shape)
    cols = jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32)[None, :], shape)
    live = jnp.broadcast_to(valid[:, None], shape)
    if len(refs) == 1:
        return plt.load(refs[0].at[r, cols], mask=live, other=0)
    nope_ref, rope_ref, scale_ref = refs
    dn = nope_ref.shape[1]
    is_nope = cols < dn  # masked lanes index past a part's columns and are never read
    nope = plt.load(nope_ref.at[r, cols], mask=live & is_nope, other=jnp.zeros((), nope_ref.dtype))
    byte = plt.load(scale_ref.at[r, cols // FP8_BLOCK], mask=live & is_nope, other=0)
    rope = plt.load(rope_ref.at[r, cols - dn], mask=live & ~is_nope, other=0)
    scale = lax.bitcast_convert_type(byte.astype(jnp.int32) << 23, jnp.float32)  # 2^(byte - 127)
    return jnp.where(is_nope, nope.astype(jnp.float32) * scale, rope.astype(jnp.float32)).astype(dtype)


def _attention_kernel(q_ref, *refs, win_parts: int, ent_parts: int, block_k: int, num_splits: int,
                      qk_scale: float):
    """One program: ``block_h`` heads of one query token, one split of its key blocks.

    q_ref [Bh,D]; then the token's window block (``win_parts`` refs: [Wk,D], or an FP8 record's three); wval_ref
    [Wk] int32 (the token's mask row); the entries (``ent_parts`` refs: [N,D] or an FP8 record's); idx_ref [K]
    int32; sink_ref [Bh] f32. Outputs: o_ref [Bh,D] (+ m_ref, l_ref [Bh] f32 when split). Logits are in the
    log2 domain (qk_scale = scale * log2 e).
    """
    win_refs, (wval_ref,) = refs[:win_parts], refs[win_parts:win_parts + 1]
    ent_refs = refs[win_parts + 1:win_parts + 1 + ent_parts]
    idx_ref, sink_ref, *out_refs = refs[win_parts + 1 + ent_parts:]
    o_ref = out_refs[0]
    split = lax.rem(pl.program_id(1), num_splits)  # grid axis 1 is (query token, split)
    Wk, D = wval_ref.shape[0], q_ref.shape[1]
    N = ent_refs[0].shape[0]
    K = idx_ref.shape[0]
    bh = q_ref.shape[0]

    # The walk's bounds, from the token's whole mask and id rows (Triton vectors are a power of two long), in
    # place of an XLA reduction and a stack before the call: two launches fewer per layer (the step's time
    # unchanged; docs/performance.md, Kernel design notes).
    rows = jnp.arange(pl.next_power_of_2(Wk), dtype=jnp.int32)
    win_lo, win_hi = _valid_bounds(plt.load(wval_ref.at[pl.ds(0, rows.shape[0])], mask=rows < Wk, other=0) != 0,
                                   rows, Wk)
    cols = jnp.arange(pl.next_power_of_2(K), dtype=jnp.int32)
    ids = plt.load(idx_ref.at[pl.ds(0, cols.shape[0])], mask=cols < K, other=-1)
    _, ent_len = _valid_bounds((ids >= 0) & (ids < N), cols, K)
    n_win = (win_hi - win_lo + block_k - 1) // block_k
    n_blocks = n_win + (ent_len + block_k - 1) // block_k
    per = (n_blocks + num_splits - 1) // num_splits
    lo = jnp.minimum(split * per, n_blocks)
    hi = jnp.minimum(lo + per, n_blocks)

    q = q_ref[...]
    first = split == 0
    sink = sink_ref[...].astype(jnp.float32) * LOG2E
    m0 = jnp.where(first, sink, jnp.full((bh,), NEG, jnp.float32))
    l0 = jnp.where(first, jnp.ones((bh,), jnp.float32), jnp.zeros((bh,), jnp.float32))
    acc0 = jnp.zeros((bh, D), jnp.float32)

    def update(k, valid, carry):
        m, l, acc = carry
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * qk_scale
        s = jnp.where(valid[None, :], s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(valid[None, :], jnp.exp2(s - m_new[:, None]), 0.0)
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(k.dtype), k, preferred_element_type=jnp.float32)
        return m_new, l, acc

    def window_step(i, carry):
        start = win_lo + i * block_k
        rows = start + jnp.arange(block_k, dtype=jnp.int32)
        valid = plt.load(wval_ref.at[pl.ds(start, block_k)], mask=rows < Wk, other=0) != 0
        if win_parts == 1:
            k = plt.load(win_refs[0].at[pl.ds(start, block_k), :],
                         mask=jnp.broadcast_to(valid[:, None], (block_k, D)), other=0)
        else:
            k = _key_rows(win_refs, rows, valid, D, q.dtype)
        return update(k, valid, carry)

    def entry_step(i, carry):
        j = i - n_win
        cols = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
        idx = plt.load(idx_ref.at[pl.ds(j * block_k, block_k)], mask=cols < K, other=-1)
        valid = (idx >= 0) & (idx < N)
        return update(_key_rows(ent_refs, idx, valid, D, q.dtype), valid, carry)

    carry = lax.fori_loop(lo, jnp.minimum(hi, n_win), window_step, (m0, l0, acc0))
    m, l, acc = lax.fori_loop(jnp.maximum(lo, n_win), hi, entry_step, carry)

    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
    if num_splits > 1:
        out_refs[1][...] = m
        out_refs[2][...] = l


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """The launch choices of ``sparse_attention_decode`` / ``_prefill``: block_h heads per program (clipped to
    the padded head count) and block_k keys per inner step (powers of two >= 16), num_splits programs per
    (query token, head block) over disjoint key blocks (1: the kernel writes the output, no epilogue),
    Triton's warps and software-pipelining stages."""
    block_h: int = 32
    block_k: int = 64
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        check_tuning(self, blocks=("block_h", "block_k"))


def _heads_per_program(block_h: int, heads: int) -> int:
    """block_h clipped to the head count padded to a power of two >= 16."""
    return min(block_h, max(16, pl.next_power_of_2(heads)))


def choose_tuning(tokens: int, heads: int, window: int, picks: int) -> TuningConfig:
    """``tokens`` query tokens (B * C) of ``heads`` heads, each with ``window`` window rows and ``picks`` entry
    ids: 32 heads per program (fastest per key on H200) unless that leaves over half the SMs without a
    program, then 16; split-K only when one split leaves over a quarter of the SMs idle, then about two
    programs per SM (at most one split per key block, at most 32)."""
    base = TuningConfig()
    block_h = 32 if tokens * pl.cdiv(heads, 32) * 2 >= NUM_SMS else 16
    programs = tokens * pl.cdiv(heads, _heads_per_program(block_h, heads))
    if programs * 4 >= NUM_SMS * 3:  # >= ~3/4 of the SMs busy with one split: don't pay for partials
        splits = 1
    else:
        key_blocks = pl.cdiv(window, base.block_k) + pl.cdiv(picks, base.block_k)
        splits = max(1, min(pl.cdiv(2 * NUM_SMS, programs), key_blocks, 32))
    return dataclasses.replace(base, block_h=block_h, num_splits=splits)


def _sparse_attention(q, win_keys, win_valid, entries, entry_ids, sinks, scale: float, *,
                      tuning: TuningConfig | None, interpret: bool, poison_outputs: bool):
    """The kernel call for a chunk of T query tokens (decode: T = 1); see ``sparse_attention_prefill``.

    q [B,T,H,D]; win_keys [B,nb,Wk,D] (token t uses block t // (T/nb)); win_valid [B,T,Wk]; entries [B,N,D];
    entry_ids [B,T,K]; sinks [H]. Returns [B,T,H,D] in q's dtype. win_keys and entries: arrays or FP8 records.
    """
    B, T, H, D = q.shape
    win_parts, ent_parts = _key_parts(win_keys, D), _key_parts(entries, D)
    nb, Wk = win_parts[0].shape[1:3]
    N = ent_parts[0].shape[1]
    K = entry_ids.shape[2]
    if D & (D - 1) or D < 16:
        raise ValueError(f"head dim {D} must be a power of two >= 16")
    tuning = tuning or choose_tuning(B * T, H, Wk, K)
    block_k = tuning.block_k
    assert T % nb == 0 and all(a.shape[:3] == (B, nb, Wk) for a in win_parts) and win_valid.shape == (B, T, Wk)
    assert all(a.shape[:2] == (B, N) for a in ent_parts) and entry_ids.shape == (B, T, K) and sinks.shape == (H,)
    bq = T // nb

    bh = _heads_per_program(tuning.block_h, H)
    Hp = pl.cdiv(H, bh) * bh
    if Hp != H:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, Hp - H), (0, 0)))
        sinks = jnp.pad(sinks, (0, Hp - H))
    sinks = sinks.astype(jnp.float32)
    n_hb = Hp // bh
    entry_ids = entry_ids.astype(jnp.int32)
    wval = win_valid.astype(jnp.int32)

    S = tuning.num_splits
    kernel = functools.partial(_attention_kernel, win_parts=len(win_parts), ent_parts=len(ent_parts),
                               block_k=block_k, num_splits=S, qk_scale=scale * LOG2E)

    # grid (head block h, query token x split i, sequence b): token t = i // S, split s = i % S
    in_specs = [
        pl.BlockSpec((None, None, bh, D), lambda h, i, b: (b, i // S, h, 0)),  # q
        *(pl.BlockSpec((None, None, Wk, a.shape[-1]), lambda h, i, b: (b, i // S // bq, 0, 0))
          for a in win_parts),  # window block
        pl.BlockSpec((None, None, Wk), lambda h, i, b: (b, i // S, 0)),  # window mask row
        *(pl.BlockSpec((None, N, a.shape[-1]), lambda h, i, b: (b, 0, 0)) for a in ent_parts),  # entries
        pl.BlockSpec((None, None, K), lambda h, i, b: (b, i // S, 0)),  # entry ids
        pl.BlockSpec((bh,), lambda h, i, b: (h,)),  # sinks
    ]
    if S == 1:
        out_shape = [jax.ShapeDtypeStruct((B, T, Hp, D), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, bh, D), lambda h, i, b: (b, i, h, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((S, B, T, Hp, D), q.dtype),
                     jax.ShapeDtypeStruct((S, B, T, Hp), jnp.float32),
                     jax.ShapeDtypeStruct((S, B, T, Hp), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, bh, D), lambda h, i, b: (i % S, b, i // S, h, 0)),
                     pl.BlockSpec((None, None, None, bh), lambda h, i, b: (i % S, b, i // S, h)),
                     pl.BlockSpec((None, None, None, bh), lambda h, i, b: (i % S, b, i // S, h))]
    args = [q, *win_parts, wval, *ent_parts, entry_ids, sinks]
    outs = triton_call(kernel, args, grid=(n_hb, T * S, B), in_specs=in_specs, out_shape=out_shape,
                       out_specs=out_specs, num_warps=tuning.num_warps, num_stages=tuning.num_stages,
                       interpret=interpret, name=f"dsv4_sparse_attn_h{bh}_k{block_k}_s{S}", poison=poison_outputs)

    if S == 1:
        out = outs[0]
    else:
        o, m, l = outs  # [S,B,T,Hp,D], [S,B,T,Hp] x2 (m in the log2 domain)
        m_all = jnp.max(m, axis=0)
        w = l * jnp.exp2(m - m_all[None])  # [S,B,T,Hp]; split 0 carries the sink, so sum(w) > 0
        out = jnp.einsum("sbth,sbthd->bthd", w, o.astype(jnp.float32)) / jnp.sum(w, axis=0)[..., None]
        out = out.astype(q.dtype)
    return out[:, :, :H]


def _key_parts(keys, d: int) -> tuple:
    """Keys as the kernel's refs: (array [..., D],), or an FP8 record's (nope, rope, scale) checked against D."""
    if not isinstance(keys, tuple):
        assert keys.shape[-1] == d
        return (keys,)
    nope, rope, scale = keys
    dn = nope.shape[-1]
    if (nope.dtype, rope.dtype, scale.dtype) != (jnp.float8_e4m3fn, jnp.bfloat16, jnp.uint8) or (
            dn + rope.shape[-1] != d or scale.shape[-1] != -(-dn // FP8_BLOCK)):
        raise ValueError(f"FP8 keys nope {nope.shape} {nope.dtype}, rope {rope.shape} {rope.dtype}, scale "
                         f"{scale.shape} {scale.dtype}: expected e4m3 [..., Dn], bf16 [..., {d} - Dn] and uint8 "
                         f"[..., ceil(Dn / {FP8_BLOCK})]")
    return keys


_STATIC = ("scale", "tuning", "interpret", "poison_outputs")


@functools.partial(jax.jit, static_argnames=_STATIC)
def sparse_attention_decode(q, window_kv, window_valid, entries, entry_idx, sinks, scale: float, *,
                            tuning: TuningConfig | None = None, interpret: bool = False,
                            poison_outputs: bool = False):
    """Pallas (Triton) sparse sink attention, decode. Same arguments and result as ``reference``.

    tuning: None for ``choose_tuning(B, H, Wk, K)``. poison_outputs: testing aid; the kernel writes into
    NaN-filled aliased buffers, so any element it fails to write stays NaN.
    """
    out = _sparse_attention(q[:, None], jax.tree.map(lambda a: a[:, None], window_kv), window_valid[:, None],
                            entries, entry_idx[:, None], sinks, scale, tuning=tuning, interpret=interpret,
                            poison_outputs=poison_outputs)
    return out[:, 0]


@functools.partial(jax.jit, static_argnames=_STATIC)
def sparse_attention_prefill(q, win_keys, win_mask, entries, entry_ids, sinks, scale: float, *,
                             tuning: TuningConfig | None = None, interpret: bool = False,
                             poison_outputs: bool = False):
    """Pallas (Triton) sparse sink attention for a chunk of query tokens. Same arguments and result as
    ``reference_prefill``; tuning: None for ``choose_tuning(B * C, H, Kw, K)`` (one program per head block,
    query token and split)."""
    return _sparse_attention(q, win_keys, win_mask, entries, entry_ids, sinks, scale, tuning=tuning,
                             interpret=interpret, poison_outputs=poison_outputs)
