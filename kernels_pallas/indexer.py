"""Lightning indexer scores (DeepSeek-V4 §7) as Pallas GPU kernels (the top-k that follows: ``topk.py``).

    I[t, s] = sum_h w[t, h] * relu(q[t, h] . K[s])          (fp32; -inf where s >= n_visible[t])

    index_scores_decode(q [B,HI,DI], keys [B,N,DI], weights [B,HI], n_valid [B])           -> [B,N]   f32
    index_scores_prefill(q [B,S,HI,DI], keys [B,N,DI], weights [B,S,HI], n_visible [B,S]) -> [B,S,N] f32

``weights`` already carry the D_I^-1/2 * H_I^-1/2 scale (the model's ``w``). ``reference_decode`` /
``reference_prefill`` below are the plain-jnp definitions: the model's XLA scores plus the
visibility mask.

Backend: the Pallas **Triton** backend (``jax.experimental.pallas.triton``). It is deprecated upstream but
present and working in the pinned jax 0.11.2. Both kernels are made of exactly what Triton lowers and Mosaic
GPU does not (reference/jax_tooling.md §1.2): **masked loads/stores** (ragged ``n_valid``, N / S not a
multiple of the block, no padding copies of the 256 MB key cache; Mosaic GPU's ``load`` has no mask),
``jnp.dot`` on register values (Triton picks the tensor-core ``wgmma``/``mma``; bf16 x bf16 -> fp32) and
row reductions without layout annotations. The Mosaic GPU port (TMA-fed wgmma, explicit layouts) is the one
to do when Triton is removed; the public functions are the seam.

Decode design (memory-bound: every key row is read once, 256 B of keys against 16 KFLOP of tensor work):

* Grid ``(key chunks, B)``: a program owns ``blocks_per_program`` consecutive key blocks of one sequence and
  walks them in a ``fori_loop`` that Triton software-pipelines (``num_stages`` loads in flight). Per block:
  ``keys[block_k, DI] @ q^T[DI, HI]`` on tensor cores -> ``[block_k, HI]`` fp32, ReLU, times ``w[HI]``,
  sum over heads, one masked store of ``block_k`` fp32 scores. q (16 KB) and w stay in registers/SMEM.
* Rows ``s >= n_valid[b]`` are masked off the load (predicated: no HBM traffic) and written as -inf, so
  garbage/NaN in unused cache slots never reaches the output. Heads are padded with zeros to a power of two
  >= 16 (the smallest tensor-core tile) inside the wrapper: zero q and zero weight add exactly 0.

Prefill design (compute-bound: 2 * HI * DI FLOPs per visible (t, s) pair, 2.2 TFLOP at S = 32K causal):

* Grid ``(key blocks, query blocks, B)``, one ``[block_q, block_k]`` output tile per program; the key-block
  axis is the fastest (CUDA blockIdx.x) so the programs that re-read one query block's q (block_q * 16 KB)
  run together and hit L2. The key tile is loaded once; a ``fori_loop`` over the HI heads loads that head's
  ``q[block_q, DI]`` (rows strided by HI*DI, each row a contiguous 256 B) and its weight column (from a
  ``[B, HI, S]`` transposed copy of w, contiguous), does ``q_h @ K^T`` on tensor cores and accumulates
  ``w_h * relu(.)`` in an fp32 ``[block_q, block_k]`` register tile. Per-head scores are never stored.
* Causal skipping: a tile whose first key is >= max(n_visible) over its queries skips the head loop and only
  writes -inf (n_visible may be any array; the block maximum makes the skip exact for any pattern).

Measured: the decode kernel reads the keys at the rate of XLA's plain row-sum over them, and no decode
setting tried beat the default; the prefill's 64 x 128 tiles are the default though 128 x 64 was faster at
S = 8K. Figures: docs/performance.md (Kernels; Kernel design notes).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .common import check_tuning, triton_call

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------
# References (the definition)
# ----------------------------------------------------------------------------------------------------------


def reference_prefill(q, keys, weights, n_visible):
    """q [B,S,HI,DI], keys [B,N,DI], weights [B,S,HI] f32, n_visible [B,S] -> [B,S,N] f32, -inf if s >= n_visible.

    Materialises the per-head scores [B,S,HI,N] (that is what runs out of memory at 32K).
    """
    dots = jnp.einsum("bshd,bnd->bshn", q, keys, preferred_element_type=jnp.float32)
    scores = jnp.einsum("bshn,bsh->bsn", jnp.maximum(dots, 0.0), weights.astype(jnp.float32))
    entry = jnp.arange(keys.shape[1], dtype=jnp.int32)
    return jnp.where(entry < n_visible[..., None], scores, NEG_INF)


def reference_decode(q, keys, weights, n_valid):
    """q [B,HI,DI], keys [B,N,DI], weights [B,HI] f32, n_valid [B] -> [B,N] f32, -inf if s >= n_valid."""
    return reference_prefill(q[:, None], keys, weights[:, None], n_valid[:, None])[:, 0]


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def _pow2_at_least(n: int, lo: int = 16) -> int:
    return max(lo, pl.next_power_of_2(n))


def _pad_axis(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _call(kernel, n_in, *, grid, in_specs, out_spec, out_shape, args, poison, num_warps, num_stages, interpret,
          name):
    """One-output ``triton_call`` (``n_in`` kept for the call sites' readability: the inputs count)."""
    assert len(args) == n_in
    return triton_call(kernel, args, grid=grid, in_specs=in_specs, out_shape=[out_shape], out_specs=[out_spec],
                       num_warps=num_warps, num_stages=num_stages, interpret=interpret, name=name, poison=poison)[0]


# ----------------------------------------------------------------------------------------------------------
# Decode kernel
# ----------------------------------------------------------------------------------------------------------


def _decode_kernel(n_ref, q_ref, w_ref, k_ref, o_ref, *, block_k: int, blocks_per_program: int):
    """n_ref [1] int32; q_ref [HIp, DI]; w_ref [HIp] f32; k_ref [N, DI]; o_ref [N] f32 (one sequence)."""
    chunk = pl.program_id(0)
    N = k_ref.shape[0]
    n = jnp.minimum(n_ref[0], N)
    q = q_ref[...]
    w = w_ref[...]
    base = chunk * (blocks_per_program * block_k)

    def body(i, carry):
        start = base + i * block_k
        rows = start + jnp.arange(block_k, dtype=jnp.int32)
        valid = rows < n
        k = plt.load(k_ref.at[pl.ds(start, block_k), :], mask=valid[:, None], other=0)
        s = lax.dot_general(k, q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [bk, HIp]
        sc = jnp.sum(jnp.maximum(s, 0.0) * w[None, :], axis=1)
        plt.store(o_ref.at[pl.ds(start, block_k)], jnp.where(valid, sc, NEG_INF), mask=rows < N)
        return carry

    lax.fori_loop(0, blocks_per_program, body, 0)


@dataclasses.dataclass(frozen=True)
class DecodeTuningConfig:
    """The launch choices of ``index_scores_decode``: block_k keys per tensor-core step (a power of two >= 16),
    blocks_per_program key blocks one program walks (a pipelined loop; clipped to the keys), Triton's warps
    and software-pipelining stages."""
    block_k: int = 128
    blocks_per_program: int = 4
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        check_tuning(self, blocks=("block_k",))


def choose_decode_tuning() -> DecodeTuningConfig:
    """One choice for every shape (blocks_per_program is clipped to the keys in the kernel)."""
    return DecodeTuningConfig()


@functools.partial(jax.jit, static_argnames=("tuning", "interpret", "poison_outputs"))
def index_scores_decode(q, keys, weights, n_valid, *, tuning: DecodeTuningConfig | None = None,
                        interpret: bool = False, poison_outputs: bool = False):
    """Pallas (Triton) indexer scores for one query per sequence. Same arguments and result as
    ``reference_decode``: q [B,HI,DI], keys [B,N,DI], weights [B,HI] (scales folded in), n_valid [B] int32
    -> [B,N] fp32 with -inf for s >= n_valid[b].

    tuning: None for ``choose_decode_tuning()``. poison_outputs: testing aid; the kernel writes into a
    NaN-filled aliased buffer, so any element it fails to write stays NaN.
    """
    B, HI, DI = q.shape
    N = keys.shape[1]
    assert keys.shape == (B, N, DI) and weights.shape == (B, HI) and n_valid.shape == (B,)
    tuning = tuning or choose_decode_tuning()
    block_k = tuning.block_k
    HIp, DIp = _pow2_at_least(HI), _pow2_at_least(DI)
    q = _pad_axis(_pad_axis(q, 1, HIp), 2, DIp)
    keys = _pad_axis(keys, 2, DIp)
    w = _pad_axis(weights.astype(jnp.float32), 1, HIp)
    n = n_valid.astype(jnp.int32).reshape(B, 1)
    bpp = max(1, min(tuning.blocks_per_program, pl.cdiv(N, block_k)))
    n_chunks = pl.cdiv(N, block_k * bpp)

    kernel = functools.partial(_decode_kernel, block_k=block_k, blocks_per_program=bpp)
    in_specs = [
        pl.BlockSpec((None, 1), lambda c, b: (b, 0)),  # n_valid
        pl.BlockSpec((None, HIp, DIp), lambda c, b: (b, 0, 0)),  # q
        pl.BlockSpec((None, HIp), lambda c, b: (b, 0)),  # weights
        pl.BlockSpec((None, N, DIp), lambda c, b: (b, 0, 0)),  # keys (whole sequence; masked loads inside)
    ]
    out_spec = pl.BlockSpec((None, N), lambda c, b: (b, 0))
    return _call(kernel, 4, grid=(n_chunks, B), in_specs=in_specs, out_spec=out_spec,
                 out_shape=jax.ShapeDtypeStruct((B, N), jnp.float32), args=(n, q, w, keys),
                 poison=poison_outputs, num_warps=tuning.num_warps, num_stages=tuning.num_stages,
                 interpret=interpret, name=f"dsv4_indexer_decode_k{block_k}x{bpp}")


# ----------------------------------------------------------------------------------------------------------
# Prefill kernel
# ----------------------------------------------------------------------------------------------------------


def _prefill_kernel(nv_ref, q_ref, w_ref, k_ref, o_ref, *, block_q: int, block_k: int, n_heads: int):
    """nv_ref [S] int32; q_ref [S, HI, DI]; w_ref [HI, S] f32; k_ref [N, DI]; o_ref [S, N] f32 (one sequence)."""
    j = pl.program_id(0)  # key block (fastest grid axis)
    i = pl.program_id(1)  # query block
    S, N = o_ref.shape
    DI = k_ref.shape[1]
    q0, k0 = i * block_q, j * block_k
    qrows = q0 + jnp.arange(block_q, dtype=jnp.int32)
    krows = k0 + jnp.arange(block_k, dtype=jnp.int32)
    q_in = qrows < S
    out_mask = q_in[:, None] & (krows < N)[None, :]
    nv = plt.load(nv_ref.at[pl.ds(q0, block_q)], mask=q_in, other=0)  # [bq]; 0 for rows past S
    nv_max = jnp.minimum(jnp.max(nv), N)
    visible = k0 < nv_max

    @pl.when(visible)
    def _compute():
        kmask = krows < nv_max
        k = plt.load(k_ref.at[pl.ds(k0, block_k), :], mask=kmask[:, None], other=0)  # [bk, DI]
        qmask = jnp.broadcast_to(q_in[:, None], (block_q, DI))

        def head(h, acc):
            qh = plt.load(q_ref.at[pl.ds(q0, block_q), h, :], mask=qmask, other=0)  # [bq, DI]
            wh = plt.load(w_ref.at[h, pl.ds(q0, block_q)], mask=q_in, other=0.0)  # [bq]
            s = lax.dot_general(qh, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            return acc + wh[:, None] * jnp.maximum(s, 0.0)

        acc = lax.fori_loop(0, n_heads, head, jnp.zeros((block_q, block_k), jnp.float32))
        res = jnp.where(krows[None, :] < nv[:, None], acc, NEG_INF)
        plt.store(o_ref.at[pl.ds(q0, block_q), pl.ds(k0, block_k)], res, mask=out_mask)

    @pl.when(jnp.logical_not(visible))
    def _masked():
        plt.store(o_ref.at[pl.ds(q0, block_q), pl.ds(k0, block_k)],
                  jnp.full((block_q, block_k), NEG_INF, jnp.float32), mask=out_mask)


@dataclasses.dataclass(frozen=True)
class PrefillTuningConfig:
    """The launch choices of ``index_scores_prefill``: the output tile (block_q queries x block_k keys, powers
    of two >= 16), Triton's warps and software-pipelining stages."""
    block_q: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        check_tuning(self, blocks=("block_q", "block_k"))


def choose_prefill_tuning() -> PrefillTuningConfig:
    """One choice for every shape."""
    return PrefillTuningConfig()


@functools.partial(jax.jit, static_argnames=("tuning", "interpret", "poison_outputs"))
def index_scores_prefill(q, keys, weights, n_visible, *, tuning: PrefillTuningConfig | None = None,
                         interpret: bool = False, poison_outputs: bool = False):
    """Pallas (Triton) indexer scores for a chunk of queries. Same arguments and result as
    ``reference_prefill``: q [B,S,HI,DI], keys [B,N,DI], weights [B,S,HI], n_visible [B,S] int32
    -> [B,S,N] fp32 with -inf for s >= n_visible[b,t]. Per-head scores are never materialised.

    tuning: None for ``choose_prefill_tuning()``. poison_outputs: see ``index_scores_decode``.
    """
    B, S, HI, DI = q.shape
    N = keys.shape[1]
    assert keys.shape == (B, N, DI) and weights.shape == (B, S, HI) and n_visible.shape == (B, S)
    tuning = tuning or choose_prefill_tuning()
    block_q, block_k = tuning.block_q, tuning.block_k
    DIp = _pow2_at_least(DI)
    q = _pad_axis(q, 3, DIp)
    keys = _pad_axis(keys, 2, DIp)
    w_t = jnp.swapaxes(weights.astype(jnp.float32), 1, 2)  # [B, HI, S]: per-head rows are contiguous
    nv = n_visible.astype(jnp.int32)

    kernel = functools.partial(_prefill_kernel, block_q=block_q, block_k=block_k, n_heads=HI)
    in_specs = [
        pl.BlockSpec((None, S), lambda j, i, b: (b, 0)),  # n_visible
        pl.BlockSpec((None, S, HI, DIp), lambda j, i, b: (b, 0, 0, 0)),  # q
        pl.BlockSpec((None, HI, S), lambda j, i, b: (b, 0, 0)),  # weights^T
        pl.BlockSpec((None, N, DIp), lambda j, i, b: (b, 0, 0)),  # keys
    ]
    out_spec = pl.BlockSpec((None, S, N), lambda j, i, b: (b, 0, 0))
    grid = (pl.cdiv(N, block_k), pl.cdiv(S, block_q), B)
    return _call(kernel, 4, grid=grid, in_specs=in_specs, out_spec=out_spec,
                 out_shape=jax.ShapeDtypeStruct((B, S, N), jnp.float32), args=(nv, q, w_t, keys),
                 poison=poison_outputs, num_warps=tuning.num_warps, num_stages=tuning.num_stages,
                 interpret=interpret, name=f"dsv4_indexer_prefill_q{block_q}_k{block_k}")
