"""The indexer's top-k selection (DeepSeek-V4 §7) as a Pallas GPU kernel: a radix select on the scores' bits.

    topk_indices(scores [..., N] f32, n_visible [...] int, k) -> ids [..., k] int32

The ids of the ``k`` largest visible, finite scores (``entry < n_visible``), in **ascending entry order**,
then -1 where fewer than ``k`` are pickable. ``reference`` below (a stable sort; the model's XLA path is one
``lax.top_k``) is the definition of the set; ties at the k-th value go to the lower entry ids, as in
``lax.top_k``. The order is ascending ids, not descending scores, because every consumer (the sparse
attention) is order-free and gathers its key rows in memory order.

Backend: the Pallas **Triton** backend (``jax.experimental.pallas.triton``), like the indexer kernels it
follows: no top-k or sort lowers inside either Pallas GPU backend, but Triton lowers what a threshold
select needs: block reductions, ``cumsum`` (Triton's scan), bit casts, masked loads and a masked scatter
store by an index array. Mosaic GPU has no masked or indexed store.

Why a select and not a sort: XLA's ``lax.top_k`` with k > 16 is a sort of every row (the chunked ``lax.top_k``
tournament before this kernel took longer than computing the scores; docs/performance.md, Kernel design notes).
Selection needs only the k-th largest value ``t``; then the picks are ``score > t`` plus the first few
``score == t``, written in place by a prefix sum.

Design (one program per row; the row lives in registers):

* Load the row's ``block`` = next power of two >= N scores once (invisible, NaN and +-inf masked off) and map
  each to an int32 whose signed order is the float order (``bits`` for x >= 0, ``bits ^ 0x7FFFFFFF`` below;
  masked entries get INT32_MIN, below every finite key).
* Bisection over the int32 range for the largest ``t`` with ``count(key >= t) >= k``: 32 fixed steps of one
  compare and one block-wide sum each, all in registers. With fewer than ``k`` pickable entries ``t`` stays
  below every finite key, so all of them are picked.
* Picks = ``key > t`` plus the first ``k - count(key > t)`` of ``key == t``; each pick's output slot is its
  prefix count, one masked scatter store writes the ids, a second fills the unused slots with -1. The lanes
  that are not picked get distinct slots after the picks (a permutation of the row), so no two lanes ever
  target the same slot: the store is well defined even where masking is emulated (interpret mode).

So the row is read from HBM once (128 KB at N = 32K) and everything else is register and shared-memory work,
bounded by the 32 reductions. A decode step has only B rows (32 programs for 132 SMs at batch 32), so
``topk_indices`` splits few long rows into slices (``segmented``: the top-k of each slice, then of the
candidates; exact), measured faster at decode sizes (docs/performance.md, Kernel design notes). Rows longer
than ``MAX_BLOCK`` (N > 64K: over 256K tokens of context at ratio 4) do not fit in one program's registers;
they take ``tournament``, a chunked ``lax.top_k`` (top k of each 4096-entry chunk, then of the candidates),
with its result put in the same ascending order.

Measured on an H200: see docs/performance.md (``scripts/bench_kernels.py --only topk``).
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

from .common import NUM_SMS, triton_call

NEG_INF = float("-inf")
INT_MIN = -(2**31)
MAX_BLOCK = 65536  # scores per row kept in registers: 64 per thread at 32 warps


# ----------------------------------------------------------------------------------------------------------
# Reference (the definition)
# ----------------------------------------------------------------------------------------------------------


def reference(scores, n_visible, k: int):
    """scores [..., N], n_visible [...] -> ids [..., k] int32 of the k largest visible finite scores by
    descending score (ties to the lower id, as ``lax.top_k``), then -1 where fewer than k are pickable."""
    pickable = (jnp.arange(scores.shape[-1]) < n_visible[..., None]) & jnp.isfinite(scores)
    order = jnp.argsort(-jnp.where(pickable, scores, -jnp.inf), axis=-1, stable=True)[..., :k]
    return jnp.where(jnp.take_along_axis(pickable, order, axis=-1), order, -1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------


def _select_kernel(n_ref, x_ref, o_ref, *, k: int):
    """n_ref [1] int32 (visible count); x_ref [block] f32 (one row, padded); o_ref [kp] int32 (kp >= k)."""
    block = x_ref.shape[0]
    kp = o_ref.shape[0]
    pos = jnp.arange(block, dtype=jnp.int32)
    x = plt.load(x_ref.at[pl.ds(0, block)], mask=pos < n_ref[0], other=NEG_INF)
    bits = lax.bitcast_convert_type(x, jnp.int32)
    key = jnp.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed int order == float order
    finite = (x == x) & (jnp.abs(x) < jnp.inf)  # masked-off lanes are -inf, so not finite either
    key = jnp.where(finite, key, INT_MIN)

    def bisect(_, lohi):
        lo, hi = lohi
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without int32 overflow
        enough = jnp.sum((key >= mid).astype(jnp.int32)) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    # Invariant when at least k keys are finite: count(key >= lo) >= k > count(key >= hi). The range is
    # under 2**32, so 32 halvings leave hi = lo + 1 and lo is the k-th largest key.
    lo0 = jnp.int32(INT_MIN + 1)
    t, _ = lax.fori_loop(0, 32, bisect, (lo0, jnp.maximum(jnp.max(key), lo0) + 1))

    above = key > t
    tie = key == t
    need = k - jnp.sum(above.astype(jnp.int32))
    picked = above | (tie & (jnp.cumsum(tie.astype(jnp.int32)) <= need))
    rank = jnp.cumsum(picked.astype(jnp.int32))  # inclusive prefix count of picks
    n_picked = jnp.sum(picked.astype(jnp.int32))
    slot = jnp.where(picked, rank - 1, n_picked + pos - rank)  # a permutation of [0, block)
    plt.store(o_ref.at[slot], pos, mask=picked)
    out_pos = jnp.arange(kp, dtype=jnp.int32)
    plt.store(o_ref.at[pl.ds(0, kp)], jnp.full((kp,), -1, jnp.int32), mask=out_pos >= n_picked)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """The launch choices of ``topk_indices``: ``segments`` slices per row (see ``segmented``; 1: one round)
    and Triton's warps per program (None: one warp per 2048 scores of each round's padded row, 4 to 32)."""
    segments: int = 1
    num_warps: int | None = None

    def __post_init__(self):
        if not isinstance(self.segments, int) or self.segments < 1:
            raise ValueError(f"topk TuningConfig: segments={self.segments!r}: expected a positive int")
        if self.num_warps is not None and (not isinstance(self.num_warps, int) or self.num_warps < 1):
            raise ValueError(f"topk TuningConfig: num_warps={self.num_warps!r}: expected None or a positive int")


def choose_tuning(rows: int, n: int, k: int) -> TuningConfig:
    """``rows`` rows of ``n`` scores, top ``k``: ``auto_segments`` slices, of 8 warps each when slicing."""
    segments = auto_segments(rows, n, k)
    return TuningConfig(segments=segments, num_warps=8 if segments > 1 else None)


@functools.partial(jax.jit, static_argnames=("k", "num_warps", "interpret", "poison_outputs"))
def topk_select(scores, n_visible, k: int, *, num_warps: int | None = None, interpret: bool = False,
                poison_outputs: bool = False):
    """The Pallas radix select for rows of at most ``MAX_BLOCK`` scores; same result as ``topk_indices``.

    num_warps: as ``TuningConfig.num_warps``. poison_outputs: testing aid; the kernel writes into an aliased
    buffer filled with INT32_MIN, so an unwritten slot fails the tests.
    """
    N = scores.shape[-1]
    lead = scores.shape[:-1]
    block = max(16, pl.next_power_of_2(N))
    if block > MAX_BLOCK:
        raise ValueError(f"rows of {N} scores exceed the kernel's {MAX_BLOCK}; use topk_indices")
    kp = max(16, pl.next_power_of_2(k))
    x = scores.reshape(-1, N).astype(jnp.float32)
    if block != N:
        x = jnp.pad(x, ((0, 0), (0, block - N)))  # padding lanes are masked off by n_visible <= N
    R = x.shape[0]
    n = jnp.clip(n_visible.reshape(R, 1), 0, N).astype(jnp.int32)
    warps = num_warps or min(32, max(4, block // 2048))
    out = triton_call(functools.partial(_select_kernel, k=k), [n, x], grid=(R,),
                      in_specs=[pl.BlockSpec((None, 1), lambda r: (r, 0)),
                                pl.BlockSpec((None, block), lambda r: (r, 0))],
                      out_shape=[jax.ShapeDtypeStruct((R, kp), jnp.int32)],
                      out_specs=[pl.BlockSpec((None, kp), lambda r: (r, 0))],
                      num_warps=warps, num_stages=1, interpret=interpret, name=f"dsv4_topk_select_k{k}",
                      poison=poison_outputs)[0]
    return out[:, :k].reshape(*lead, k)


def tournament(scores, n_visible, k: int, *, chunk: int = 4096):
    """Rows too long for ``topk_select``: ``lax.top_k`` within chunks of ``chunk`` entries (``chunk >= 2k``),
    keep k candidates per chunk, repeat while more than two chunks' worth remain, then one ``lax.top_k``;
    the same set as one ``lax.top_k`` (every member of the global top-k is in the top-k of its chunk), put
    in ascending id order."""
    N = scores.shape[-1]
    lead = scores.shape[:-1]
    entry = jnp.arange(N, dtype=jnp.int32)
    x = jnp.where((entry < n_visible[..., None]) & jnp.isfinite(scores), scores.astype(jnp.float32), NEG_INF)
    x = x.reshape(-1, N)
    R = x.shape[0]
    chunk = max(chunk, 2 * k)
    ids = None  # [R, M] global entry ids of the candidates in x (None: x is the full row, id = position)
    while x.shape[1] > 2 * chunk:  # two chunks or fewer: one lax.top_k is as fast (measured, H200)
        M = x.shape[1]
        nc = pl.cdiv(M, chunk)
        c = pl.cdiv(M, nc)  # equal chunks, as few padding entries as possible
        pad = nc * c - M
        xc = jnp.pad(x, ((0, 0), (0, pad)), constant_values=NEG_INF).reshape(R, nc, c)
        v, i = lax.top_k(xc, k)  # [R, nc, k]
        gi = i + (jnp.arange(nc, dtype=jnp.int32) * c)[None, :, None]
        if ids is not None:
            ids_c = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=-1).reshape(R, nc * c)
            gi = jnp.take_along_axis(ids_c, gi.reshape(R, nc * k), axis=1)
        x, ids = v.reshape(R, nc * k), gi.reshape(R, nc * k)
    v, i = lax.top_k(x, k)
    if ids is not None:
        i = jnp.take_along_axis(ids, i, axis=1)
    big = jnp.iinfo(jnp.int32).max
    i = jnp.sort(jnp.where(v > NEG_INF, i, big), axis=1)  # ascending ids, the unpicked slots last
    return jnp.where(i == big, -1, i).astype(jnp.int32).reshape(*lead, k)


def segmented(scores, n_visible, k: int, segments: int, *, num_warps: int | None = None,
              interpret: bool = False):
    """scores [R, N], n_visible [R] -> ``topk_indices`` in two ``topk_select`` rounds, so that a few long rows
    occupy ``segments`` times as many programs: the top-k of each of ``segments`` equal slices of a row,
    then the top-k of those candidates. Exact: every member of a row's top-k is in the top-k of its slice,
    with ties at the k-th value going to the lower ids in both rounds."""
    R, N = scores.shape
    L = pl.cdiv(N, segments)
    kk = min(k, L)
    x = jnp.pad(scores, ((0, 0), (0, segments * L - N))).reshape(R * segments, L)
    start = jnp.arange(segments, dtype=jnp.int32) * L
    n_slice = jnp.clip(n_visible[:, None] - start[None, :], 0, L).reshape(R * segments)
    local = topk_select(x, n_slice, kk, num_warps=num_warps, interpret=interpret).reshape(R, segments, kk)
    ids = jnp.where(local >= 0, local + start[None, :, None], -1).reshape(R, segments * kk)
    cand = jnp.where(ids >= 0, jnp.take_along_axis(scores, jnp.maximum(ids, 0), axis=1), NEG_INF)
    pick = topk_select(cand, jnp.full((R,), segments * kk, jnp.int32), k, num_warps=num_warps,
                       interpret=interpret)  # positions in cand: ascending, so the ids are too
    return jnp.where(pick >= 0, jnp.take_along_axis(ids, jnp.maximum(pick, 0), axis=1), -1)


def auto_segments(rows: int, n: int, k: int) -> int:
    """Slices per row: the largest power of two up to 8 that keeps ``rows * segments`` within the SM count
    and slices of at least 2k entries (so the first round discards at least half). Measured: [32, 32768],
    k = 512 fastest in 4 slices of 8 warps; [2048, 8192] is already 2048 programs and fastest in one round
    (docs/performance.md, Kernel design notes)."""
    segments = 1
    while segments < 8 and rows * segments * 2 <= NUM_SMS and n // (segments * 2) >= 2 * k:
        segments *= 2
    return segments


@functools.partial(jax.jit, static_argnames=("k", "tuning", "interpret"))
def topk_indices(scores, n_visible, k: int, *, tuning: TuningConfig | None = None, interpret: bool = False):
    """scores [..., N] f32, n_visible [...] int -> entry ids [..., k] int32 (-1 where fewer than k are
    pickable): the set ``reference`` selects, in ascending id order, then the -1s. The Pallas select for
    N <= ``MAX_BLOCK``, in ``tuning.segments`` slices per row when > 1 (see ``segmented``; tuning None:
    ``choose_tuning``), the chunked ``tournament`` above that."""
    N = scores.shape[-1]
    lead = scores.shape[:-1]
    if not 0 < k <= N:
        raise ValueError(f"k={k} must be in [1, N={N}]")
    if n_visible.shape != lead:
        raise ValueError(f"n_visible has shape {n_visible.shape}, expected {lead}")
    if pl.next_power_of_2(N) > MAX_BLOCK:
        return tournament(scores, n_visible, k)
    tuning = tuning or choose_tuning(math.prod(lead), N, k)
    segments, num_warps = tuning.segments, tuning.num_warps
    if segments == 1:
        return topk_select(scores, n_visible, k, num_warps=num_warps, interpret=interpret)
    x = scores.reshape(-1, N).astype(jnp.float32)
    n = jnp.clip(n_visible.reshape(-1), 0, N).astype(jnp.int32)
    return segmented(x, n, k, segments, num_warps=num_warps, interpret=interpret).reshape(*lead, k)
