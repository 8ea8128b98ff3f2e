"""Sparse MQA attention with a per-head sink (DeepSeek-V4 §8), decode: one query token per sequence.

    sparse_attention_decode(q [B,H,D], window_kv [B,Wk,D], window_valid [B,Wk] bool, entries [B,N,D],
                            entry_idx [B,K] int32 (-1 = none), sinks [H] f32, scale) -> [B,H,D]

Keys are the valid window rows plus ``entries[b, entry_idx[b, j]]`` for every ``entry_idx >= 0``; the
values are the keys (K = V, one KV head shared by all H query heads). Logits ``q.k * scale`` in fp32, one
softmax over all keys plus the raw sink logit ``sinks[h]`` (denominator only, zero value). A row without any
valid key returns 0. ``reference`` below is the plain-jnp definition; ``sparse_attention_decode`` the kernel.

Backend: the Pallas **Triton** backend (``jax.experimental.pallas.triton``). It is deprecated upstream but
present and working in the pinned jax 0.11.2, and it is the only Pallas GPU backend that lowers what this
kernel is made of: a **gather by index array** (``entries_ref.at[idx]``, fails in Mosaic GPU with
"int_indexer_shape non-empty"), **masked loads** (``plt.load(..., mask=, other=)``; Mosaic GPU has none) and
``jnp.dot`` on register values (tensor-core ``mma``/``wgmma`` chosen by Triton; bf16 x bf16 -> fp32).
Mosaic GPU would need a hand-written TMA gather pipeline; that is the port to do when Triton is removed.

Design (flash-decoding over a gathered key list):

* Grid ``(H/block_h, num_splits, B)``; the head block is the fastest grid axis (CUDA ``blockIdx.x``), so the
  programs that share one sequence's keys run side by side and the key rows re-read by the other head blocks
  of that sequence come from L2, not HBM.
* One program owns ``block_h`` heads of one sequence and streams ``block_k`` keys per step with an online
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
  ~66 programs (small batch) the default drops to ``block_h = 16`` to double the programs. Heads are padded
  inside the wrapper to a multiple of ``block_h`` (>= 16, the smallest tensor-core M) for odd head counts; the
  real 64 / 128 heads need no padding. D must be a power of two (Triton block shapes); 512 and 64 are.
  With M = 16-32 rows Triton most likely emits ``mma.sync`` rather than ``wgmma`` (which wants 64 rows per
  warpgroup; not checked in the PTX); the matmul rate, not HBM, bounds the kernel at large batch (below).
* The sink is folded into the online softmax of split 0 as its initial state (m = sink, l = 1, acc = 0), so
  no special case exists for "no valid key": that row ends with acc = 0, output 0.
* Work skipping: the wrapper reduces the validity masks to per-sequence lengths (last valid window row + 1,
  last valid ``entry_idx`` + 1). The kernel only walks blocks below those, so HCA's ``arange(N)`` masked to the
  visible count costs the visible entries, not N. -1 holes below the length are masked, not skipped.
* Split-K (``num_splits`` > 1) for small batches: the sequence's (window + entry) key blocks are divided
  evenly among the splits (dynamically, from the actual lengths); each split writes a normalised bf16 partial
  plus its running max / sum, and a small fp32 JAX epilogue merges them (log-sum-exp). With D = 512 and 64
  heads a partial is as large as 64 key rows, so splitting costs HBM traffic; the default (``num_splits=None``)
  splits only when ``B * H/block_h`` programs leave over a quarter of the 132 SMs idle, and then aims at about
  two programs per SM. With one split the kernel writes the final bf16 output directly and no epilogue runs.

Measured on one H200 (jax 0.11.2, triton 3.6; H=64, D=512, Wk=128, N=8192, all keys valid; each time is
per call inside one jitted chain of 20 dependent calls, median of 10; reference = ``reference`` under XLA):

    B    K     kernel (defaults)   reference    HBM bytes / time
    1    1024     14.6 us           18.8 us      0.09 TB/s   (latency: 18 key blocks over 18 splits)
    4    512      17.9 us           20.4 us      0.18 TB/s
    8    1024     32.2 us           28.5 us      0.33 TB/s   (8 splits measured 27.5 us; heuristic retuned after)
    32   512      36.2 us           53.7 us      0.70 TB/s
    32   1024     53.0 us           66.3 us      0.79 TB/s
    128  512      70.4 us          135.1 us      1.43 TB/s
    128  1024    104.4 us          219.3 us      1.61 TB/s   (~185 TFLOP/s of QK + PV)

so the large-batch cases run at ~1/3 of the HBM roofline (4.8 TB/s) and ~20 % of the bf16 tensor peak: the
small-M tensor-core matmuls are the limit, not memory. Getting closer needs 64-row ``wgmma`` tiles
with the 512-wide accumulator split over two warpgroups (FlashMLA-style), i.e. a Mosaic GPU kernel.

Entries with ``entry_idx >= N`` are treated as invalid (never read) in both the kernel and the reference;
callers should not pass them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .common import triton_call

LOG2E = math.log2(math.e)
NEG = -1e30  # finite "minus infinity": keeps exp2(m_old - m_new) finite when nothing is valid yet
NUM_SMS = 132  # H100 SXM; H200 has the same count


# ----------------------------------------------------------------------------------------------------------
# Reference (the definition)
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


# ----------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------


def _decode_kernel(lens_ref, q_ref, wkv_ref, wval_ref, ent_ref, idx_ref, sink_ref, *out_refs,
                   block_k: int, num_splits: int, qk_scale: float):
    """One program: ``block_h`` heads of one sequence, one split of its key blocks.

    lens_ref [2] (window length, entry length); q_ref [Bh,D]; wkv_ref [Wk,D]; wval_ref [Wk] int32;
    ent_ref [N,D]; idx_ref [K] int32; sink_ref [Bh] f32. Outputs: o_ref [Bh,D] (+ m_ref, l_ref [Bh] f32 when
    split). Logits are in the log2 domain (qk_scale = scale * log2 e).
    """
    o_ref = out_refs[0]
    split = pl.program_id(1)
    Wk, D = wkv_ref.shape
    N = ent_ref.shape[0]
    K = idx_ref.shape[0]
    bh = q_ref.shape[0]

    win_len = lens_ref[0]
    ent_len = lens_ref[1]
    n_win = (win_len + block_k - 1) // block_k
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
        rows = i * block_k + jnp.arange(block_k, dtype=jnp.int32)
        inb = rows < Wk
        valid = plt.load(wval_ref.at[pl.ds(i * block_k, block_k)], mask=inb, other=0) != 0
        k = plt.load(wkv_ref.at[pl.ds(i * block_k, block_k), :],
                     mask=jnp.broadcast_to(valid[:, None], (block_k, D)), other=0)
        return update(k, valid, carry)

    def entry_step(i, carry):
        j = i - n_win
        cols = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
        idx = plt.load(idx_ref.at[pl.ds(j * block_k, block_k)], mask=cols < K, other=-1)
        valid = (idx >= 0) & (idx < N)
        # Row gather as a pure integer-array index (rows x columns): lowers to one tensor of pointers in
        # Triton, and interpret mode supports it (mixed array/slice indexing it does not).
        rows = jnp.broadcast_to(jnp.where(valid, idx, 0)[:, None], (block_k, D))
        cols = jnp.broadcast_to(jnp.arange(D, dtype=jnp.int32)[None, :], (block_k, D))
        k = plt.load(ent_ref.at[rows, cols], mask=jnp.broadcast_to(valid[:, None], (block_k, D)), other=0)
        return update(k, valid, carry)

    carry = lax.fori_loop(lo, jnp.minimum(hi, n_win), window_step, (m0, l0, acc0))
    m, l, acc = lax.fori_loop(jnp.maximum(lo, n_win), hi, entry_step, carry)

    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
    if num_splits > 1:
        out_refs[1][...] = m
        out_refs[2][...] = l


def _last_valid_plus_one(valid):
    """valid [B,L] bool -> [B] int32: index of the last True + 1 (0 if none)."""
    L = valid.shape[1]
    pos = jnp.arange(1, L + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(valid, pos, 0), axis=1).astype(jnp.int32)


def _auto_block_h(batch: int, heads: int) -> int:
    """32 heads per program (fastest per key on H200) unless that leaves over half the SMs without a program."""
    return 32 if batch * pl.cdiv(heads, 32) * 2 >= NUM_SMS else 16


def _auto_splits(batch: int, head_blocks: int, max_blocks: int) -> int:
    programs = batch * head_blocks
    if programs * 4 >= NUM_SMS * 3:  # >= ~3/4 of the SMs busy with one split: don't pay for partials
        return 1
    return max(1, min(pl.cdiv(2 * NUM_SMS, programs), max_blocks, 32))


@functools.partial(jax.jit, static_argnames=("scale", "block_h", "block_k", "num_splits", "num_warps",
                                             "num_stages", "interpret", "poison_outputs"))
def sparse_attention_decode(q, window_kv, window_valid, entries, entry_idx, sinks, scale: float, *,
                            block_h: int | None = None, block_k: int = 64, num_splits: int | None = None,
                            num_warps: int = 4, num_stages: int = 3, interpret: bool = False,
                            poison_outputs: bool = False):
    """Pallas (Triton) sparse sink attention, decode. Same arguments and result as ``reference``.

    block_h: heads per program (power of two >= 16; clipped to the padded head count); None = 32, or 16 when
      the batch is too small to give every other SM a program.
    block_k: keys per inner step (power of two >= 16).
    num_splits: programs per (sequence, head block) over disjoint key blocks; None = automatic.
    poison_outputs: testing aid; the kernel writes into NaN-filled aliased buffers, so any element it fails
      to write stays NaN.
    """
    B, H, D = q.shape
    _, Wk, _ = window_kv.shape
    N = entries.shape[1]
    K = entry_idx.shape[1]
    if D & (D - 1) or D < 16:
        raise ValueError(f"head dim {D} must be a power of two >= 16")
    block_h = block_h or _auto_block_h(B, H)
    if block_k & (block_k - 1) or block_k < 16 or block_h & (block_h - 1) or block_h < 16:
        raise ValueError("block_h and block_k must be powers of two >= 16")
    assert window_kv.shape == (B, Wk, D) and entries.shape == (B, N, D) and window_valid.shape == (B, Wk)
    assert entry_idx.shape == (B, K) and sinks.shape == (H,)

    bh = min(block_h, max(16, pl.next_power_of_2(H)))
    Hp = pl.cdiv(H, bh) * bh
    if Hp != H:
        q = jnp.pad(q, ((0, 0), (0, Hp - H), (0, 0)))
        sinks = jnp.pad(sinks, (0, Hp - H))
    sinks = sinks.astype(jnp.float32)
    n_hb = Hp // bh
    entry_idx = entry_idx.astype(jnp.int32)
    ent_valid = (entry_idx >= 0) & (entry_idx < N)
    lens = jnp.stack([_last_valid_plus_one(window_valid), _last_valid_plus_one(ent_valid)], axis=1)
    wval = window_valid.astype(jnp.int32)

    S = num_splits or _auto_splits(B, n_hb, pl.cdiv(Wk, block_k) + pl.cdiv(K, block_k))
    kernel = functools.partial(_decode_kernel, block_k=block_k, num_splits=S, qk_scale=scale * LOG2E)

    in_specs = [
        pl.BlockSpec((None, 2), lambda h, s, b: (b, 0)),  # lens
        pl.BlockSpec((None, bh, D), lambda h, s, b: (b, h, 0)),  # q
        pl.BlockSpec((None, Wk, D), lambda h, s, b: (b, 0, 0)),  # window_kv
        pl.BlockSpec((None, Wk), lambda h, s, b: (b, 0)),  # window_valid
        pl.BlockSpec((None, N, D), lambda h, s, b: (b, 0, 0)),  # entries
        pl.BlockSpec((None, K), lambda h, s, b: (b, 0)),  # entry_idx
        pl.BlockSpec((bh,), lambda h, s, b: (h,)),  # sinks
    ]
    if S == 1:
        out_shape = [jax.ShapeDtypeStruct((B, Hp, D), q.dtype)]
        out_specs = [pl.BlockSpec((None, bh, D), lambda h, s, b: (b, h, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((S, B, Hp, D), q.dtype),
                     jax.ShapeDtypeStruct((S, B, Hp), jnp.float32),
                     jax.ShapeDtypeStruct((S, B, Hp), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, bh, D), lambda h, s, b: (s, b, h, 0)),
                     pl.BlockSpec((None, None, bh), lambda h, s, b: (s, b, h)),
                     pl.BlockSpec((None, None, bh), lambda h, s, b: (s, b, h))]
    args = [lens, q, window_kv, wval, entries, entry_idx, sinks]
    outs = triton_call(kernel, args, grid=(n_hb, S, B), in_specs=in_specs, out_shape=out_shape, out_specs=out_specs,
                       num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                       name=f"dsv4_sparse_attn_decode_h{bh}_k{block_k}_s{S}", poison=poison_outputs)

    if S == 1:
        out = outs[0]
    else:
        o, m, l = outs  # [S,B,Hp,D], [S,B,Hp] x2 (m in the log2 domain)
        m_all = jnp.max(m, axis=0)
        w = l * jnp.exp2(m - m_all[None])  # [S,B,Hp]; split 0 carries the sink, so sum(w) > 0
        out = jnp.einsum("sbh,sbhd->bhd", w, o.astype(jnp.float32)) / jnp.sum(w, axis=0)[..., None]
        out = out.astype(q.dtype)
    return out[:, :H]


# ----------------------------------------------------------------------------------------------------------
# Benchmarks (scripts/bench_kernels.py)
# ----------------------------------------------------------------------------------------------------------


def _decode_inputs(key, B, H, D, Wk, K, N, dtype=jnp.bfloat16):
    """Random decode inputs with full window and every entry_idx valid and distinct per row."""
    kq, kw, ke, ki, ks = jax.random.split(key, 5)
    q = jax.random.normal(kq, (B, H, D), jnp.float32).astype(dtype)
    window_kv = jax.random.normal(kw, (B, Wk, D), jnp.float32).astype(dtype)
    window_valid = jnp.ones((B, Wk), bool)
    entries = jax.random.normal(ke, (B, N, D), jnp.float32).astype(dtype)
    idx = jax.vmap(lambda k: jax.random.permutation(k, N)[:K])(jax.random.split(ki, B)).astype(jnp.int32)
    sinks = jax.random.normal(ks, (H,), jnp.float32)
    return q, window_kv, window_valid, entries, idx, sinks


def bench_cases():
    """Decode at Flash sizes: H=64, D=512, window 128, N=8192 entries, top-k 512 / 1024, B=32 / 128."""
    H, D, Wk, N = 64, 512, 128, 8192
    cases = []
    for B in (32, 128):
        for K in (512, 1024):
            T = Wk + K
            itemsize = 2
            cases.append({
                "name": f"decode_B{B}_K{K}",
                "shapes": {"B": B, "H": H, "D": D, "Wk": Wk, "K": K, "N": N},
                "args": functools.partial(_decode_inputs, B=B, H=H, D=D, Wk=Wk, K=K, N=N),
                "kwargs": {"scale": D ** -0.5},
                # q + each distinct key row once + indices + output
                "bytes": B * (H * D * itemsize + T * D * itemsize + K * 4 + Wk + H * D * itemsize),
                "flops": 4 * B * H * T * D,  # QK^T and PV
                "pallas": sparse_attention_decode,
                "reference": reference,
            })
    return cases
