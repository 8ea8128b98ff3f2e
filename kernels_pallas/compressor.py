"""KV compressor kernels (DeepSeek-V4 §6): softmax-pool windows of m tokens, then RMSNorm and RoPE.

    compress_prefill(kv [B,S,coff*D], gate [B,S,coff*D], ape [m,coff*D], norm_weight [D],
                     cos [B,S//m,R/2], sin [B,S//m,R/2], *, ratio, overlap, eps) -> entries [B,S//m,D]
    compress_decode_step(kv_new [B,coff*D], gate_new [B,coff*D], state_kv [B,span,coff*D],
                         state_gate [B,span,coff*D], write_slot [B], entry_index [B], ape, norm_weight,
                         cos [B,R/2], sin [B,R/2], cache_rows [B,N,D], *, ratio, overlap, eps)
                         -> (entry [B,D], new_state_kv, new_state_gate, new_cache_rows)

Meaning (``reference_prefill`` / ``reference_decode_step`` below are the plain-jnp definitions, and the tests
check them against the model's ``dsv4_jax.ops.compressor.compress_chunk``): entry w pools, per channel, the
slots of its window with a softmax over ``gate + ape`` in fp32 and a weighted sum of ``kv``. Without overlap
(HCA, m = 128, coff = 1) the slots are tokens [w*m, (w+1)*m) with ``ape[j]``. With overlap (CSA m = 4 and the
indexer's compressor, coff = 2) there are 2m slots: the a-halves (channels [:D]) of window w-1 with
``ape[:, :D]`` and the b-halves (channels [D:]) of window w with ``ape[:, D:]``; for w = 0 the a-half slots do
not exist (weight 0). Then ``RMSNorm(eps) * norm_weight`` over the D channels and interleaved RoPE on the
trailing R channels (pairs (2i, 2i+1): even' = e*cos - o*sin, odd' = o*cos + e*sin). Prefill starts at
position 0 (no state): a prefix of S tokens gives S//m entries, trailing tokens are ignored. Decode keeps
the raw projections of the last ``span`` tokens (2m with overlap, else m) in a ring at slot ``position % span``
(``dsv4_jax.model.compression.CompressorState``). The step takes the model's precomputed indices
(``CompressionMeta.state_write_slot`` / ``entry_write_index``): it writes the new token into ring slot
``write_slot`` (``span``: the row is not decoding, no write) and, when ``entry_index`` < N, the new token
closes window w = ``entry_index``: the step emits that window's entry (RoPE angle of position w*m, passed in
as cos/sin) into row w of the compressed cache ``cache_rows`` [B, N, D] (entry w lives in row w). ``entry``
is 0 for rows that close no window (``entry_index`` >= N).

Backend: the Pallas **Triton** backend (``jax.experimental.pallas.triton``). It is deprecated upstream but
present and working in the pinned jax 0.11.2, and it lowers everything this kernel is made of: masked
loads with ``other=`` (window validity, the missing w = 0 a-half, the partial last window block, ring rows
of decode rows that do not close), masked stores, pointer tiles built from index arrays (the a-half tile is
the b-half tile shifted by m rows and D channels, which no BlockSpec expresses), reductions over a middle
axis, and ``split``/``join`` of interleaved pairs (``jnp.unstack``/``jnp.stack`` on a trailing axis of 2)
for the RoPE. Mosaic GPU has no masked loads, needs hand-placed layouts for every reduction and has no
gather by index array: a port would be TMA copies of [rows, channels] boxes with explicit layouts, worth
doing when Triton is removed.

Design (memory bound: every kv/gate element is read from HBM once):

* Prefill grid ``(B, cdiv(S//m, Wb))``: one program owns ``Wb`` consecutive windows and the **full row of D
  channels**, so RMSNorm and RoPE run in the same program (the [Wb, D] fp32 rows live in registers; no
  second pass, no fp32 round trip through HBM). Per slot step it loads the b-half slots of its windows (the
  window's own tokens; channels [D:2D] with overlap, else all) and, with overlap, the a-half slots (the
  previous window's tokens, channels [:D], masked for w = 0), adds ``ape`` and folds them into an online
  softmax state (running max, sum, weighted sum; [Wb, D] fp32 each). The a-half rows of a program are its
  own tokens shifted by one window, so apart from one window per program boundary (read again by the
  neighbour, usually from L2) every element is read once.
  - CSA (m = 4, D = 512): one step of Ts = 4 slots, Wb = 1 window, 4 warps. Each slot is its own [Wb, D]
    tile ("slot rows", used for Ts <= 8), so the softmax over slots is elementwise in registers. 2048 / 8192
    programs at S = 8K / 32K. Wb = 2 measured slower: twice the registers per program, half the programs in
    flight. The indexer's D = 128: Wb = 8, 8 warps (Wb = 1 measured the same).
  - HCA (m = 128): Wb = 1 window per program, steps (``fori_loop``) of a [1, Ts, 512] tile reduced over its
    slot axis. With at most half as many windows as SMs (S = 8K, B = 1: 64 programs for 132 SMs, the weak
    spot) 4 steps of 32 slots at 16 warps, so that the SMs with work keep 64 KB of loads in flight; with more,
    8 steps of 16 slots at 4 warps (``choose_prefill_tuning``), measured faster there: at 16 warps (512
    threads) a thread holds at most 128 registers and the tiles spill. (Splitting channels over programs
    would fill the machine at 8K but needs the norm in a second launch over an fp32 intermediate.)
  The figures behind these choices, and the registers per thread of an offline sm_90 compile:
  docs/performance.md, Kernel design notes.
  Triton does not software-pipeline these loops (no ``cp.async``: its pipeliner targets loads feeding dots),
  so latency hiding comes from several resident programs (CSA) or the 32-64 KB step tiles (HCA).
* RoPE on the full [Wb, D] row: the pair-swapped row (reshape [Wb, D/2, 2], unstack, stack swapped) times a
  signed sin, plus the row times cos, where the cos/sin values are gathered per channel (cos = 1, sin = 0 on
  the nope channels). One [Wb, D] store per program, masked only for windows >= S//m.
* Decode grid ``(B,)``: the same pooling code on one window per row, with token rows taken from the ring:
  window w's b-half sits at ring slots ``w*m % span ..`` (contiguous), the a-half at ``(w+1)*m % span ..``
  (window w-1's tokens). The new token (the window's last slot) comes from ``kv_new``/
  ``gate_new`` inside the kernel, which then stores it into slot ``write_slot`` of the state, and a closing
  window's entry into its row of the compressed cache. State and cache are aliased to the kernel's
  outputs (in place when donated). Rows that do not close load nothing (all loads masked) and produce
  exactly 0, so whatever their ring holds cannot leak.

Numerics: everything in fp32 (bf16 projections are upcast on load); output in ``out_dtype`` (fp32 default).
Constraints: D and R powers of two with R <= D (Triton tiles are powers of two); the slot step is the
largest power of two dividing m within the tile cap.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .common import NUM_SMS, check_tuning, triton_call

NEG = -1e30  # finite "minus infinity" for the running max (exp(NEG - NEG) = 1 must never be used unmasked)
TILE_ELEMS = 4096  # target elements of one [Wb, Ts, D] kv (or gate) tile when a window fits in one step (D < 512)
MAX_STEP_ELEMS = 16384  # cap of a slot-step tile (HCA: 32 tokens x 512 channels)
MANY_WINDOWS_STEP_ELEMS = 8192  # the cap with more windows than half the SMs (HCA: 16 tokens x 512 channels)
SLOT_ROWS_MAX = 8  # slot steps up to this many tokens load one [Wb, D] tile per slot
ELEMS_PER_THREAD = 32  # default warps: a tile spread as 32 elements per thread per array (D >= 512)


# ----------------------------------------------------------------------------------------------------------
# Reference (the definition)
# ----------------------------------------------------------------------------------------------------------


def _rms_norm_rope(pooled, norm_weight, cos, sin, eps):
    """pooled [..., D] fp32 -> RoPE(RMSNorm(pooled) * w) with interleaved pairs on the trailing R channels."""
    x = pooled * lax.rsqrt(jnp.mean(pooled * pooled, axis=-1, keepdims=True) + eps)
    x = x * norm_weight.astype(jnp.float32)
    r = 2 * cos.shape[-1]
    nope, rope = x[..., : x.shape[-1] - r], x[..., x.shape[-1] - r:]
    pairs = rope.reshape(*rope.shape[:-1], r // 2, 2)
    e, o = pairs[..., 0], pairs[..., 1]
    rot = jnp.stack([e * cos - o * sin, o * cos + e * sin], axis=-1).reshape(rope.shape)
    return jnp.concatenate([nope, rot], axis=-1)


def _softmax_pool(values, logits):
    """values, logits [..., slots, D] fp32 (logits -inf where a slot does not exist) -> [..., D]."""
    return jnp.sum(jax.nn.softmax(logits, axis=-2) * values, axis=-2)


def reference_prefill(kv, gate, ape, norm_weight, cos, sin, *, ratio: int, overlap: bool, eps: float,
                      out_dtype=jnp.float32):
    """Plain-jnp compressed entries of a prefix that starts at position 0.

    kv, gate [B,S,coff*D] (fp32 or bf16); ape [m,coff*D]; norm_weight [D]; cos, sin [B,S//m,R/2] (angle of
    position w*m for entry w). Returns [B, S//m, D] in ``out_dtype``.
    """
    m = ratio
    B, S, C = kv.shape
    D = C // 2 if overlap else C
    nW = S // m
    kv = kv[:, : nW * m].astype(jnp.float32).reshape(B, nW, m, C)
    lg = gate[:, : nW * m].astype(jnp.float32).reshape(B, nW, m, C) + ape.astype(jnp.float32)
    if overlap:
        # slots 0..m-1: a-halves of window w-1 (absent for w = 0); slots m..2m-1: b-halves of window w
        a_kv = jnp.pad(kv[..., :D], ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :nW]
        a_lg = jnp.pad(lg[..., :D], ((0, 0), (1, 0), (0, 0), (0, 0)), constant_values=-jnp.inf)[:, :nW]
        values = jnp.concatenate([a_kv, kv[..., D:]], axis=2)
        logits = jnp.concatenate([a_lg, lg[..., D:]], axis=2)
    else:
        values, logits = kv, lg
    pooled = _softmax_pool(values, logits)
    return _rms_norm_rope(pooled, norm_weight, cos, sin, eps).astype(out_dtype)


def _span(ratio: int, overlap: bool) -> int:
    return 2 * ratio if overlap else ratio


def _write_state(state, new, slot):
    rows = jnp.arange(state.shape[0])
    return state.at[rows, slot].set(new.astype(state.dtype), mode="drop")


def reference_decode_step(kv_new, gate_new, state_kv, state_gate, write_slot, entry_index, ape, norm_weight,
                          cos, sin, cache_rows, *, ratio: int, overlap: bool, eps: float, out_dtype=jnp.float32):
    """Plain-jnp decode step: write the new token into the ring, emit the entry of a window that closes.

    kv_new, gate_new [B,coff*D]; state_kv, state_gate [B,span,coff*D] (ring, slot = position % span);
    write_slot [B] int32 (the new token's ring slot, span = no write); entry_index [B] int32 (the window w
    the new token closes, N = none); cos, sin [B,R/2] (angle of position w*m); cache_rows [B,N,D].
    Returns (entry [B,D] (0 where the row closes no window), new_state_kv, new_state_gate, new_cache_rows).
    """
    m = ratio
    span = _span(m, overlap)
    B, C = kv_new.shape
    D = C // 2 if overlap else C
    closes = entry_index < cache_rows.shape[1]
    new_kv = _write_state(state_kv, kv_new, write_slot)
    new_gate = _write_state(state_gate, gate_new, write_slot)
    # window w's span, oldest first: positions (w+1)*m - span .. (w+1)*m - 1 (the new token last)
    tok = (entry_index[:, None] + 1) * m - span + jnp.arange(span, dtype=jnp.int32)[None, :]
    slot = jnp.mod(tok, span)
    kv = jnp.take_along_axis(new_kv, slot[:, :, None], axis=1).astype(jnp.float32)
    lg = jnp.take_along_axis(new_gate, slot[:, :, None], axis=1).astype(jnp.float32)
    exists = (tok >= 0)[:, :, None]
    if overlap:
        values = jnp.concatenate([kv[:, :m, :D], kv[:, m:, D:]], axis=1)
        logits = jnp.concatenate([lg[:, :m, :D] + ape[:, :D], lg[:, m:, D:] + ape[:, D:]], axis=1)
    else:
        values, logits = kv, lg + ape
    values = jnp.where(exists, values, 0.0)
    logits = jnp.where(exists, logits, -jnp.inf)
    entry = _rms_norm_rope(_softmax_pool(values, logits), norm_weight, cos, sin, eps)
    entry = jnp.where(closes[:, None], entry, 0.0).astype(out_dtype)
    rows = jnp.arange(B)
    new_cache = cache_rows.at[rows, entry_index].set(entry.astype(cache_rows.dtype), mode="drop")
    return entry, new_kv, new_gate, new_cache


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


class _Group:
    """One half of a slot step: ``ts`` consecutive token rows per window, channels [c0, c0 + d).

    row0 [Wb] int32: first token row of the step per window (clamped in range where invalid); valid [Wb]
    bool: the window's slots exist; new: optional (kv [d], gate [d], slot) for decode: step slot ``slot``
    (an int, possibly traced; outside 0..ts-1 when the new token is not in this step) is the new token,
    taken from registers instead of the ring.
    """

    def __init__(self, row0, valid, c0: int, new=None):
        self.row0, self.valid, self.c0, self.new = row0, valid, c0, new


def _fold(carry, kvs, logits, masks, axis=None):
    """Online-softmax update of carry (max, sum, acc) [Wb, d] with slot tiles.

    Slot-rows layout (axis None): lists of [Wb, d] tiles, reduced elementwise (no cross-thread traffic).
    Tile layout (axis=1): one [Wb, Ts, d] tile per list entry, reduced over the slot axis.
    """
    mx, l, acc = carry
    red_max = (lambda x: x) if axis is None else (lambda x: jnp.max(x, axis=axis))
    red_sum = (lambda x: x) if axis is None else (lambda x: jnp.sum(x, axis=axis))
    expand = (lambda x: x) if axis is None else (lambda x: x[:, None, :])
    mx_new = mx
    for lg in logits:
        mx_new = jnp.maximum(mx_new, red_max(lg))
    alpha = jnp.exp(mx - mx_new)
    l = l * alpha
    acc = acc * alpha
    for kv, lg, mk in zip(kvs, logits, masks):
        p = jnp.where(mk, jnp.exp(lg - expand(mx_new)), 0.0)
        l = l + red_sum(p)
        acc = acc + red_sum(p * kv)
    return mx_new, l, acc


def _pool_step(kv_ref, g_ref, ape_ref, groups, ape_r0, *, ts: int, d: int, slot_rows: bool, carry):
    """Load the groups' slot tiles (token rows row0 + 0..ts-1, ape rows ape_r0 + 0..ts-1) and fold them in.

    slot_rows: one [Wb, d] tile per slot (small ts: CSA's 4 slots; reductions stay in registers), else one
    [Wb, ts, d] tile per group reduced over its slot axis (large ts: HCA's 32-token steps).
    """
    wb = groups[0].row0.shape[0]
    kvs, logits, masks = [], [], []
    cols = jnp.arange(d, dtype=jnp.int32)
    for grp in groups:
        if slot_rows:
            shape = (wb, d)
            c2 = jnp.broadcast_to((grp.c0 + cols)[None, :], shape)
            v2 = jnp.broadcast_to(grp.valid[:, None], shape)
            for s in range(ts):
                r2 = jnp.broadcast_to((grp.row0 + s)[:, None], shape)
                load = v2
                if grp.new is not None:
                    is_new = v2 & (grp.new[2] == s)
                    load = v2 & ~is_new
                kv = plt.load(kv_ref.at[r2, c2], mask=load, other=0).astype(jnp.float32)
                g = plt.load(g_ref.at[r2, c2], mask=load, other=0).astype(jnp.float32)
                if grp.new is not None:
                    kv = jnp.where(is_new, jnp.broadcast_to(grp.new[0][None, :], shape), kv)
                    g = jnp.where(is_new, jnp.broadcast_to(grp.new[1][None, :], shape), g)
                ape = ape_ref[pl.ds(ape_r0 + s, 1), pl.ds(grp.c0, d)].astype(jnp.float32)  # [1, d]
                kvs.append(kv)
                logits.append(jnp.where(v2, g + ape, NEG))
                masks.append(v2)
        else:
            shape = (wb, ts, d)
            k = jnp.arange(ts, dtype=jnp.int32)
            r3 = jnp.broadcast_to(grp.row0[:, None, None] + k[None, :, None], shape)
            c3 = jnp.broadcast_to((grp.c0 + cols)[None, None, :], shape)
            v3 = jnp.broadcast_to(grp.valid[:, None, None], shape)
            load = v3
            if grp.new is not None:
                is_new = v3 & jnp.broadcast_to((k == grp.new[2])[None, :, None], shape)
                load = v3 & ~is_new
            kv = plt.load(kv_ref.at[r3, c3], mask=load, other=0).astype(jnp.float32)
            g = plt.load(g_ref.at[r3, c3], mask=load, other=0).astype(jnp.float32)
            if grp.new is not None:
                kv = jnp.where(is_new, jnp.broadcast_to(grp.new[0][None, None, :], shape), kv)
                g = jnp.where(is_new, jnp.broadcast_to(grp.new[1][None, None, :], shape), g)
            ape = ape_ref[pl.ds(ape_r0, ts), pl.ds(grp.c0, d)].astype(jnp.float32)  # [ts, d]
            kvs.append(kv)
            logits.append(jnp.where(v3, g + ape[None, :, :], NEG))
            masks.append(v3)
    return _fold(carry, kvs, logits, masks, axis=None if slot_rows else 1)


def _init_carry(wb: int, d: int):
    return (jnp.full((wb, d), NEG, jnp.float32), jnp.zeros((wb, d), jnp.float32),
            jnp.zeros((wb, d), jnp.float32))


def _norm_rope(carry, w_ref, cos_ref, sin_ref, cs_rows, cs_valid, *, d: int, rope_dim: int, eps: float):
    """Finish: pooled = acc / sum, RMSNorm * weight, interleaved RoPE on the trailing rope_dim channels.

    cos_ref/sin_ref [rows, rope_dim/2]; cs_rows [Wb] row of each window's angle (clamped), cs_valid [Wb].
    Returns [Wb, d] fp32.
    """
    _, l, acc = carry
    wb = acc.shape[0]
    pooled = acc / jnp.where(l > 0, l, 1.0)
    ms = jnp.sum(pooled * pooled, axis=1) * (1.0 / d)
    y = pooled * lax.rsqrt(ms + eps)[:, None] * w_ref[...].astype(jnp.float32)[None, :]
    # RoPE: out = y * cos_c + swap_pairs(y) * sin_c with cos_c = 1, sin_c = 0 on the nope channels and
    # sin_c = -sin on even, +sin on odd rope channels.
    c = jnp.arange(d, dtype=jnp.int32)
    in_rope = c >= d - rope_dim
    ci = jnp.where(in_rope, lax.div(c - (d - rope_dim), 2), 0)
    shape = (wb, d)
    r2 = jnp.broadcast_to(cs_rows[:, None], shape)
    c2 = jnp.broadcast_to(ci[None, :], shape)
    m2 = jnp.broadcast_to(in_rope[None, :], shape) & jnp.broadcast_to(cs_valid[:, None], shape)
    cos = plt.load(cos_ref.at[r2, c2], mask=m2, other=1.0).astype(jnp.float32)
    sin = plt.load(sin_ref.at[r2, c2], mask=m2, other=0.0).astype(jnp.float32)
    odd = jnp.broadcast_to((lax.rem(c, 2) == 1)[None, :], shape)
    sin = jnp.where(odd, sin, -sin)
    e, o = jnp.unstack(y.reshape(wb, d // 2, 2), axis=-1)
    swapped = jnp.stack([o, e], axis=-1).reshape(wb, d)
    return y * cos + swapped * sin


def _prefill_kernel(kv_ref, g_ref, ape_ref, w_ref, cos_ref, sin_ref, o_ref, *, m: int, d: int, wb: int,
                    ts: int, n_win: int, overlap: bool, eps: float, rope_dim: int, slot_rows: bool):
    """One program: windows [j*wb, (j+1)*wb) of batch row b, all d channels.

    kv_ref/g_ref [S, coff*d]; ape_ref [m, coff*d]; w_ref [d]; cos_ref/sin_ref [nW, R/2]; o_ref [nW, d].
    """
    j = pl.program_id(1)
    win = j * wb + jnp.arange(wb, dtype=jnp.int32)
    wvalid = win < n_win
    win_c = jnp.where(wvalid, win, 0)
    valid_a = wvalid & (win >= 1)
    win_a = jnp.where(valid_a, win - 1, 0)

    def step(t, carry):
        # b-halves (channels [d:2d] with overlap, else all) of the window's own tokens
        groups = [_Group(win_c * m + t * ts, wvalid, d if overlap else 0)]
        if overlap:  # a-halves (channels [:d]) of the previous window's tokens; absent for w = 0
            groups.append(_Group(win_a * m + t * ts, valid_a, 0))
        return _pool_step(kv_ref, g_ref, ape_ref, groups, t * ts, ts=ts, d=d, slot_rows=slot_rows, carry=carry)

    n_steps = m // ts
    carry = _init_carry(wb, d)
    carry = step(0, carry) if n_steps == 1 else lax.fori_loop(0, n_steps, step, carry)
    out = _norm_rope(carry, w_ref, cos_ref, sin_ref, win_c, wvalid, d=d, rope_dim=rope_dim, eps=eps)
    # A slice store (not an index-array scatter): rows past nW are masked on the GPU and dropped by interpret
    # mode's padding, instead of aliasing a valid row.
    plt.store(o_ref.at[pl.ds(j * wb, wb), pl.ds(0, d)], out.astype(o_ref.dtype),
              mask=jnp.broadcast_to(wvalid[:, None], (wb, d)))


def _decode_kernel(slot_ref, index_ref, nkv_ref, ng_ref, skv_ref, sg_ref, ape_ref, w_ref, cos_ref, sin_ref, _,
                   o_ref, skv_out_ref, sg_out_ref, cache_out_ref, *, m: int, span: int, d: int, ts: int,
                   overlap: bool, eps: float, rope_dim: int, slot_rows: bool):
    """One program: batch row b. slot_ref [1] (ring slot of the new token, span = no write); index_ref [1]
    (the window w the new token closes = its entry's row in the compressed cache, N = none); nkv_ref/ng_ref
    [1, coff*d]; skv_ref/sg_ref [span, coff*d]; cos_ref/sin_ref [1, R/2]; the cache [N, d]. Outputs: o_ref
    [1, d]; skv_out_ref/sg_out_ref: the state buffers themselves (aliased), into which the new token is
    written; cache_out_ref, the cache itself (aliased), into which a closing window's entry is written."""
    w = index_ref[0]
    closes = w < cache_out_ref.shape[0]
    # Used only when the window closes (below).
    b_base = lax.rem(w * m, span)  # ring slot of the window's first token
    a_base = lax.rem(w * m + m, span)  # (overlap) slot of the previous window's first token: (w-1)*m mod 2m
    cb = d if overlap else 0
    valid_b = jnp.ones((1,), jnp.bool_)
    valid_a = jnp.broadcast_to(w >= 1, (1,))
    new_kv = nkv_ref[0, pl.ds(cb, d)]
    new_g = ng_ref[0, pl.ds(cb, d)]

    def step(t, carry):
        # the new token (position w*m + m - 1) is the window's last slot m-1
        new = (new_kv, new_g, m - 1 - t * ts)
        groups = [_Group(b_base + t * ts + jnp.zeros((1,), jnp.int32), valid_b, cb, new)]
        if overlap:
            groups.append(_Group(a_base + t * ts + jnp.zeros((1,), jnp.int32), valid_a, 0))
        return _pool_step(skv_ref, sg_ref, ape_ref, groups, t * ts, ts=ts, d=d, slot_rows=slot_rows, carry=carry)

    # A window closes once in m steps: the other steps only write the zero entry (the pooling cost the same
    # whether or not the window closed; docs/performance.md, Kernel design notes).
    @pl.when(closes)
    def _():
        n_steps = m // ts
        carry = _init_carry(1, d)
        carry = step(0, carry) if n_steps == 1 else lax.fori_loop(0, n_steps, step, carry)
        zero1 = jnp.zeros((1,), jnp.int32)
        out = _norm_rope(carry, w_ref, cos_ref, sin_ref, zero1, jnp.ones((1,), jnp.bool_), d=d,
                         rope_dim=rope_dim, eps=eps)
        o_ref[...] = out.astype(o_ref.dtype)
        cache_out_ref[pl.ds(w, 1), :] = out.astype(cache_out_ref.dtype)

    @pl.when(jnp.logical_not(closes))
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    # The ring write, after the pooling: the pooling reads the new token from nkv_ref / ng_ref, never from
    # its slot, so whichever value that slot holds when read does not matter.
    slot = slot_ref[0]

    @pl.when(slot < span)
    def _():
        skv_out_ref[pl.ds(slot, 1), :] = nkv_ref[...].astype(skv_out_ref.dtype)
        sg_out_ref[pl.ds(slot, 1), :] = ng_ref[...].astype(sg_out_ref.dtype)


# ----------------------------------------------------------------------------------------------------------
# Wrappers
# ----------------------------------------------------------------------------------------------------------


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _check_dims(C: int, overlap: bool, half_rope: int):
    D = C // 2 if overlap else C
    R = 2 * half_rope
    if overlap and C % 2:
        raise ValueError(f"overlap needs an even projection width, got {C}")
    if not (_pow2(D) and _pow2(R) and R <= D):
        raise ValueError(f"D={D} and R={R} must be powers of two with R <= D")
    return D, R


def _slot_step(m: int, d: int, wb: int, cap: int) -> int:
    """Largest power of two dividing m that keeps a [wb, Ts, d] tile within ``cap`` elements."""
    ts = m & -m  # largest power-of-two divisor
    while ts > 1 and wb * ts * d > cap:
        ts //= 2
    return ts


def _warps(tile_elems: int, d: int, many_windows: bool = False) -> int:
    """32 tile elements per thread per array (64 with more windows than half the SMs; 16 for narrow rows,
    whose layouts replicate more), 4..16 warps."""
    per_thread = ELEMS_PER_THREAD // 2 if d < 512 else ELEMS_PER_THREAD * (2 if many_windows else 1)
    return max(4, min(16, tile_elems // (32 * per_thread)))


def _check_pow2(config, names: tuple[str, ...]) -> None:
    for name in names:
        if not _pow2(getattr(config, name)):
            raise ValueError(f"compressor TuningConfig: {name}={getattr(config, name)} must be a power of two")


@dataclasses.dataclass(frozen=True)
class PrefillTuningConfig:
    """The launch choices of ``compress_prefill``: windows_per_block (Wb) windows per program and
    slots_per_step (Ts) tokens of a window per step (powers of two; Ts divides m), slot_rows: one [Wb, D]
    tile per slot (else one [Wb, Ts, D] tile per step), Triton's warps and stages (its pipeliner does not
    pipeline these loads)."""
    windows_per_block: int
    slots_per_step: int
    num_warps: int
    slot_rows: bool
    num_stages: int = 2

    def __post_init__(self):
        check_tuning(self, flags=("slot_rows",))
        _check_pow2(self, ("windows_per_block", "slots_per_step"))


@dataclasses.dataclass(frozen=True)
class DecodeTuningConfig:
    """The launch choices of ``compress_decode_step``: ``PrefillTuningConfig``'s, with one window per program."""
    slots_per_step: int
    num_warps: int
    slot_rows: bool
    num_stages: int = 2

    def __post_init__(self):
        check_tuning(self, flags=("slot_rows",))
        _check_pow2(self, ("slots_per_step",))


def choose_prefill_tuning(batch: int, n_windows: int, ratio: int, dim: int) -> PrefillTuningConfig:
    """``compress_prefill``'s tiling for ``batch`` rows of ``n_windows`` windows of ``ratio`` tokens, ``dim``
    channels. Wb: 1 for D >= 512 (CSA, HCA) or when a window takes several steps, else Wb*m*D near
    TILE_ELEMS = 4K elements (8 for the indexer's D = 128). Ts: the largest with Wb*Ts*D <= 16K elements, 8K once
    the windows exceed half the SMs (4 for CSA, 32 or 16 for HCA D = 512). Warps: tile / (32 x 32 elements),
    64 elements once the windows exceed half the SMs, 16 for D < 512, clipped to [4, 16] (4 for CSA D = 512,
    8 for D = 128, 16 or 4 for HCA). Slot rows for Ts <= 8.

    With more windows than half the SMs, HCA (m = 128, D = 512) pools 16-token steps at 4 warps instead of
    32-token steps at 16: measured faster from 128 windows (the engine's 16K prefill chunk) on, where the
    16-warp step tiles spill, and a tie at 64 windows, where the 16 warps keep more bytes in flight on the SMs
    that have work (docs/performance.md, Kernel design notes).
    """
    m, d = ratio, dim
    many = 2 * batch * n_windows > NUM_SMS
    cap = MANY_WINDOWS_STEP_ELEMS if many else MAX_STEP_ELEMS
    wide = _slot_step(m, d, 1, cap) < m or d >= 512  # measured: one window per program is faster for D = 512
    wb = 1 if wide else max(1, min(TILE_ELEMS // (m * d), pl.next_power_of_2(n_windows)))
    wb = 1 << (wb.bit_length() - 1)
    ts = _slot_step(m, d, wb, cap)
    return PrefillTuningConfig(windows_per_block=wb, slots_per_step=ts, num_warps=_warps(wb * ts * d, d, many),
                               slot_rows=ts <= SLOT_ROWS_MAX)


def choose_decode_tuning(ratio: int, dim: int) -> DecodeTuningConfig:
    """``compress_decode_step``'s tiling for windows of ``ratio`` tokens, ``dim`` channels: the prefill rule for
    one window per program (Ts * D <= 16K elements)."""
    ts = _slot_step(ratio, dim, 1, MAX_STEP_ELEMS)
    return DecodeTuningConfig(slots_per_step=ts, num_warps=_warps(ts * dim, dim), slot_rows=ts <= SLOT_ROWS_MAX)


def _check_step(slots_per_step: int, m: int) -> None:
    if m % slots_per_step:
        raise ValueError(f"compressor TuningConfig: slots_per_step={slots_per_step} must divide m={m}")


@functools.partial(jax.jit, static_argnames=("ratio", "overlap", "eps", "out_dtype", "tuning", "interpret",
                                             "poison_outputs"))
def compress_prefill(kv, gate, ape, norm_weight, cos, sin, *, ratio: int, overlap: bool, eps: float,
                     out_dtype=jnp.float32, tuning: PrefillTuningConfig | None = None, interpret: bool = False,
                     poison_outputs: bool = False):
    """Pallas (Triton) prefill compression; same arguments and result as ``reference_prefill``.

    tuning: None for ``choose_prefill_tuning(B, S // m, m, D)``. poison_outputs: testing aid (see
    ``common.triton_call``).
    """
    m = ratio
    B, S, C = kv.shape
    D, R = _check_dims(C, overlap, cos.shape[-1])
    nW = S // m
    assert gate.shape == kv.shape and ape.shape == (m, C) and norm_weight.shape == (D,)
    assert cos.shape == (B, nW, R // 2) and sin.shape == cos.shape, (cos.shape, (B, nW, R // 2))
    if nW == 0:
        return jnp.zeros((B, 0, D), out_dtype)
    tuning = tuning or choose_prefill_tuning(B, nW, m, D)
    wb, ts = tuning.windows_per_block, tuning.slots_per_step
    _check_step(ts, m)
    kernel = functools.partial(_prefill_kernel, m=m, d=D, wb=wb, ts=ts, n_win=nW, overlap=overlap, eps=eps,
                               rope_dim=R, slot_rows=tuning.slot_rows)
    in_specs = [
        pl.BlockSpec((None, S, C), lambda b, j: (b, 0, 0)),  # kv (whole row; tiles indexed in the kernel)
        pl.BlockSpec((None, S, C), lambda b, j: (b, 0, 0)),  # gate
        pl.BlockSpec((m, C), lambda b, j: (0, 0)),  # ape
        pl.BlockSpec((D,), lambda b, j: (0,)),  # norm weight
        pl.BlockSpec((None, nW, R // 2), lambda b, j: (b, 0, 0)),  # cos
        pl.BlockSpec((None, nW, R // 2), lambda b, j: (b, 0, 0)),  # sin
    ]
    out_shape = [jax.ShapeDtypeStruct((B, nW, D), out_dtype)]
    out_specs = [pl.BlockSpec((None, nW, D), lambda b, j: (b, 0, 0))]
    args = [kv, gate, ape.astype(jnp.float32), norm_weight.astype(jnp.float32), cos.astype(jnp.float32),
            sin.astype(jnp.float32)]
    (out,) = triton_call(kernel, args, grid=(B, pl.cdiv(nW, wb)), in_specs=in_specs, out_shape=out_shape,
                         out_specs=out_specs, num_warps=tuning.num_warps, num_stages=tuning.num_stages,
                         interpret=interpret, name=f"dsv4_compress_prefill_m{m}_d{D}_w{wb}_t{ts}",
                         poison=poison_outputs)
    return out


@functools.partial(jax.jit, static_argnames=("ratio", "overlap", "eps", "out_dtype", "tuning", "interpret",
                                             "poison_outputs"))
def compress_decode_step(kv_new, gate_new, state_kv, state_gate, write_slot, entry_index, ape, norm_weight, cos,
                         sin, cache_rows, *, ratio: int, overlap: bool, eps: float, out_dtype=jnp.float32,
                         tuning: DecodeTuningConfig | None = None, interpret: bool = False,
                         poison_outputs: bool = False):
    """Pallas (Triton) decode step; same arguments and result as ``reference_decode_step``. write_slot [B]:
    each row's ring slot for the new token, ``span`` for none (a row that is not decoding keeps its ring;
    the model's ``state_write_slot``). entry_index [B]: the window each row's new token closes, which is
    its entry's row in the compressed cache cache_rows [B, N, D]; N for none (the model's
    ``entry_write_index``).

    The kernel pools the closing window from the old ring plus the new token and writes the new token into
    the ring and the entry into the cache: those buffers are aliased to its outputs (in place when they
    are donated, as in the engine's decode step). As separate ``.at[row, slot].set`` scatters these writes
    were three more kernels per compressor, most of a decode step's scatter kernels (docs/performance.md,
    Kernel design notes).
    """
    m = ratio
    span = _span(m, overlap)
    B, C = kv_new.shape
    D, R = _check_dims(C, overlap, cos.shape[-1])
    assert gate_new.shape == (B, C) and state_kv.shape == (B, span, C) and state_gate.shape == (B, span, C)
    assert ape.shape == (m, C) and norm_weight.shape == (D,) and cos.shape == (B, R // 2) == sin.shape
    if cache_rows.shape[::2] != (B, D) or write_slot.shape != (B,) or entry_index.shape != (B,):
        raise ValueError(f"compress_decode_step: cache_rows {cache_rows.shape}, write_slot {write_slot.shape}, "
                         f"entry_index {entry_index.shape}: expected [{B}, N, {D}], [{B}] and [{B}]")
    tuning = tuning or choose_decode_tuning(m, D)
    ts = tuning.slots_per_step
    _check_step(ts, m)
    kernel = functools.partial(_decode_kernel, m=m, span=span, d=D, ts=ts, overlap=overlap, eps=eps,
                               rope_dim=R, slot_rows=tuning.slot_rows)
    state_spec = pl.BlockSpec((None, span, C), lambda b: (b, 0, 0))
    cache_spec = pl.BlockSpec((None, *cache_rows.shape[1:]), lambda b: (b, 0, 0))
    row_scalar = pl.BlockSpec((1,), lambda b: (b,))
    in_specs = [
        row_scalar,  # write slot
        row_scalar,  # entry index
        pl.BlockSpec((1, C), lambda b: (b, 0)),  # kv_new
        pl.BlockSpec((1, C), lambda b: (b, 0)),  # gate_new
        state_spec,  # state_kv
        state_spec,  # state_gate
        pl.BlockSpec((m, C), lambda b: (0, 0)),  # ape
        pl.BlockSpec((D,), lambda b: (0,)),  # norm weight
        pl.BlockSpec((1, R // 2), lambda b: (b, 0)),  # cos
        pl.BlockSpec((1, R // 2), lambda b: (b, 0)),  # sin
        cache_spec,  # compressed cache
    ]
    out_shape = [jax.ShapeDtypeStruct((B, D), out_dtype), jax.ShapeDtypeStruct(state_kv.shape, state_kv.dtype),
                 jax.ShapeDtypeStruct(state_gate.shape, state_gate.dtype),
                 jax.ShapeDtypeStruct(cache_rows.shape, cache_rows.dtype)]
    out_specs = [pl.BlockSpec((1, D), lambda b: (b, 0)), state_spec, state_spec, cache_spec]
    args = [write_slot.astype(jnp.int32), entry_index.astype(jnp.int32), kv_new, gate_new, state_kv, state_gate,
            ape.astype(jnp.float32), norm_weight.astype(jnp.float32), cos.astype(jnp.float32),
            sin.astype(jnp.float32), cache_rows]
    return tuple(triton_call(
        kernel, args, grid=(B,), in_specs=in_specs, out_shape=out_shape, out_specs=out_specs,
        num_warps=tuning.num_warps, num_stages=tuning.num_stages, interpret=interpret,
        name=f"dsv4_compress_decode_m{m}_d{D}_t{ts}",
        poison=poison_outputs, aliases={4: 1, 5: 2, 10: 3}))
