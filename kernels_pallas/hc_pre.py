"""The mHC step before each sub-block (DeepSeek-V4 §5) as one Pallas GPU kernel after the mixing logits.

    hc_pre(streams [T, n, d], fn [(2+n)n, n*d] f32, base [(2+n)n] f32, scale [3] f32, *, rms_eps, hc_eps,
           iters, norm_weight [d] f32 = None, norm_eps) -> (x [T, d], post [T, n] f32, comb [T, n, n] f32)

Meaning (``reference``; the model's XLA path computes the same): mixing logits ``fn @ RMS(vec(streams))``;
``pre = sigmoid(.) + eps``, ``post = 2 sigmoid(.)``, ``comb`` = the Sinkhorn
normalisation (row softmax + eps, a column normalisation, then ``iters - 1`` rounds of row and column
normalisation, each ``x / (sum + eps)``); the sub-block input ``x = sum_i pre_i X_i`` in fp32; with
``norm_weight``, the sub-block's RMSNorm of that fp32 sum in the streams' dtype.

Why a kernel: per token this is a 4 x 4 matrix, 24 logits and a weighted sum of 4 rows, but XLA runs it as ~10
small kernels per sub-block (the Sinkhorn alone as ~21 dependent row / column sums), 12 sub-blocks per step of
the 6-layer Flash-width slice: a large share of a batch-1 decode step's time and kernels (docs/performance.md,
Kernel design notes). Here XLA computes the mixing logits with the function the XLA path uses too
(``mix_logits``: the RMS factor and the products with the 1.5 MB of ``fn``, so both paths see the same logits),
and one kernel does the rest. Up to ``MIX_AS_SUM_MAX_TOKENS`` tokens XLA forms only the products and the kernel
applies the RMS factor with the same operations, from the streams' sum of squares: its own when a program holds
whole rows (with the norm), XLA's (``mix_sums``) otherwise.

Backend: the Pallas **Triton** backend. Grid ``(token blocks, d / block_d)``: a program owns ``block_t`` tokens
and ``block_d`` columns of each stream, so a one-token decode step still spreads its stream reads over
``d / block_d`` programs (one program walking all of ``d`` measured slow; docs/performance.md, Kernel design
notes). Each of the ``(2+n)n`` logits is its own ``[block_t]`` vector (a strided masked load), so the weights
and the Sinkhorn are elementwise arithmetic on those vectors: no reductions, reshapes or matmuls. Every
program computes ``pre`` for its sum; the programs of the first column block also compute and store ``post``
and ``comb``. The Sinkhorn rounds are a loop: unrolled, Triton took minutes to compile them. Tokens past the
end are masked on load and store.

With ``norm_weight`` a program owns whole rows (``block_d = d``, one token per program by default): the
RMSNorm needs the row's sum of squares, and fused here it saves the two XLA kernels (a reduction, then the
scaling) that followed the kernel at each of the step's 12 sub-blocks.
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

from .common import check_tuning, triton_call

__all__ = ["MIX_AS_SUM_MAX_TOKENS", "TuningConfig", "choose_tuning", "hc_pre", "mix_logits", "mix_sums", "reference",
           "sinkhorn_entries", "supported"]

# Up to this many tokens (decode) the mixing logits are products summed over vec(streams), with the RMS factor
# applied after: two reductions of the raw streams that XLA runs without a normalised copy or a GPU fp32 matmul
# (at full precision, two or three small kernels): the batch-1 step measured faster than with the factor
# applied first or with the matmul (docs/performance.md, Kernel design notes). Above it (prefill) the matmul,
# which does not re-read fn (1.5 MB at Flash width) per token.
MIX_AS_SUM_MAX_TOKENS = 16


def _rms_scale(xf, eps: float):
    """xf [..., D] fp32 -> 1 / sqrt(mean(xf^2) + eps) [..., 1]."""
    return lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def _rms_norm(x, weight, eps: float):
    """x [..., D] fp32 -> weight * x * _rms_scale(x), fp32."""
    return weight.astype(jnp.float32) * (x * _rms_scale(x, eps))


def mix_sums(flat: jax.Array, fn: jax.Array) -> tuple[jax.Array, jax.Array]:
    """flat [..., n*d] fp32 -> (fn @ flat [..., fn_rows], sum(flat^2) [..., 1]): the few-token mixing logits
    before their RMS factor ``rsqrt(sum / (n*d) + eps)`` (``hc_pre`` applies it in its kernel)."""
    return jnp.sum(flat[..., None, :] * fn.astype(jnp.float32), axis=-1), jnp.sum(flat * flat, axis=-1, keepdims=True)


def mix_logits(streams: jax.Array, fn: jax.Array, eps: float) -> jax.Array:
    """streams [..., n, d] -> fn @ RMS(vec(streams)) [..., fn_rows], fp32 at full precision, as
    the PyTorch reference computes them: the Sinkhorn and every later layer carry on their rounding."""
    flat = streams.reshape(*streams.shape[:-2], -1).astype(jnp.float32)
    if math.prod(flat.shape[:-1]) <= MIX_AS_SUM_MAX_TOKENS:
        return mix_sums(flat, fn)[0] * _rms_scale(flat, eps)
    # fp32 at HIGHEST: a GPU's default precision would round the inputs to TF32
    return jnp.einsum("...i,oi->...o", flat * _rms_scale(flat, eps), fn.astype(jnp.float32),
                      precision=lax.Precision.HIGHEST)


def reference(streams, fn, base, scale, *, rms_eps: float, hc_eps: float, iters: int, norm_weight=None,
              norm_eps: float = 0.0):
    """The meaning in plain jnp, all fp32: mixing logits, pre / post / the Sinkhorn comb, the weighted sum of
    the streams (then its RMSNorm, cast to the streams' dtype)."""
    n = streams.shape[-2]
    mix = mix_logits(streams, fn, rms_eps)
    base, scale = base.astype(jnp.float32), scale.astype(jnp.float32)
    pre = jax.nn.sigmoid(mix[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2.0 * jax.nn.sigmoid(mix[..., n : 2 * n] * scale[1] + base[n : 2 * n])
    comb = jax.nn.softmax(mix[..., 2 * n :].reshape(*mix.shape[:-1], n, n) * scale[2]
                          + base[2 * n :].reshape(n, n), axis=-1) + hc_eps
    comb = comb / (comb.sum(axis=-2, keepdims=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(axis=-1, keepdims=True) + hc_eps)
        comb = comb / (comb.sum(axis=-2, keepdims=True) + hc_eps)
    x = jnp.sum(pre[..., None] * streams.astype(jnp.float32), axis=-2)
    return (x if norm_weight is None else _rms_norm(x, norm_weight, norm_eps).astype(streams.dtype)), post, comb


def supported(n: int, d: int) -> bool:
    """Shapes the kernel takes: Triton vectors are a power of two long."""
    return n >= 1 and d >= 16 and not d & (d - 1)


def sinkhorn_entries(x: list[list], iters: int, eps: float) -> list[list]:
    """The Sinkhorn normalisation on an n x n matrix held as n * n same-shaped arrays (one per entry):
    elementwise arithmetic only, for any number of matrices at once. x: logits; returns comb."""
    n = len(x)
    c = []
    for i in range(n):  # row softmax (max-shifted, as jax.nn.softmax), + eps
        m = functools.reduce(jnp.maximum, x[i])
        e = [jnp.exp(v - m) for v in x[i]]
        r = 1.0 / functools.reduce(jnp.add, e)
        c.append([v * r + eps for v in e])

    # One reciprocal per row / column, then multiplies: n IEEE fp32 divides (each a multi-instruction
    # sequence) per half-iteration instead of n * n; each entry stays within 1 ulp of the division.
    def columns(c):
        inv = [1.0 / (functools.reduce(jnp.add, [c[i][j] for i in range(n)]) + eps) for j in range(n)]
        return [[c[i][j] * inv[j] for j in range(n)] for i in range(n)]

    def rows(c):
        inv = [1.0 / (functools.reduce(jnp.add, c[i]) + eps) for i in range(n)]
        return [[c[i][j] * inv[i] for j in range(n)] for i in range(n)]

    # A loop (the n * n entries are its carried values): unrolled, the rounds made Triton's compile slow.
    return lax.fori_loop(0, iters - 1, lambda _, c: columns(rows(c)), columns(c))


def _kernel(streams_ref, mix_ref, base_ref, scale_ref, *refs, n: int, d: int, iters: int, hc_eps: float,
            block_t: int, block_d: int, rms_eps: float | None, norm_eps: float | None):
    """streams_ref [T, n*d]; mix_ref [T, (2+n)n] f32 mixing logits (before their RMS factor when rms_eps is
    not None); base_ref [(2+n)n]; scale_ref [3]; [sum_squares_ref [T, 1] f32 of the streams when rms_eps is
    not None and a program holds only some columns (block_d < d; with whole rows it sums them itself);]
    [norm_ref [d] f32 when norm_eps is not None;] x_ref [T, d]; post_ref [T, n]; comb_ref [T, n*n]. One
    program: ``block_t`` tokens x ``block_d`` columns (all d with the norm)."""
    x_ref, post_ref, comb_ref = refs[-3:]
    extra = list(refs[:-3])
    sum_squares_ref = extra.pop(0) if rms_eps is not None and block_d < d else None
    norm_ref = extra.pop(0) if norm_eps is not None else None
    T = streams_ref.shape[0]
    start = pl.program_id(0) * block_t
    k0 = pl.multiple_of(pl.program_id(1) * block_d, block_d)
    valid = start + jnp.arange(block_t, dtype=jnp.int32) < T
    tokens = pl.ds(start, block_t)

    # stream i, this program's columns and tokens, fp32
    tiles = [plt.load(streams_ref.at[tokens, pl.ds(i * d + k0, block_d)], mask=valid[:, None],
                      other=0).astype(jnp.float32) for i in range(n)]
    rms = 1.0  # mix_logits' RMS factor by the same operations (1.0: XLA applied it already)
    if rms_eps is not None:
        if sum_squares_ref is not None:
            sum_squares = plt.load(sum_squares_ref.at[tokens, jnp.int32(0)], mask=valid, other=0.0)
        else:  # whole rows here: one XLA reduction kernel fewer per call
            sum_squares = functools.reduce(jnp.add, [jnp.sum(t * t, axis=1) for t in tiles])
        rms = lax.rsqrt(sum_squares / (n * d) + rms_eps)

    def logit(j, s):
        return plt.load(mix_ref.at[tokens, jnp.int32(j)], mask=valid, other=0.0) * rms * scale_ref[s] + base_ref[j]

    pre = [jax.nn.sigmoid(logit(i, 0)) + hc_eps for i in range(n)]
    acc = functools.reduce(jnp.add, [pre[i][:, None] * tiles[i] for i in range(n)])
    if norm_eps is not None:  # the XLA path's rms_norm of the unrounded sum: whole rows in this program
        acc = _rms_norm(acc, norm_ref[...], norm_eps)
    plt.store(x_ref.at[tokens, pl.ds(k0, block_d)], acc.astype(x_ref.dtype), mask=valid[:, None])

    @pl.when(pl.program_id(1) == 0)
    def _():
        for i in range(n):
            plt.store(post_ref.at[tokens, jnp.int32(i)], 2.0 * jax.nn.sigmoid(logit(n + i, 1)), mask=valid)
        comb = sinkhorn_entries([[logit(2 * n + i * n + j, 2) for j in range(n)] for i in range(n)], iters,
                                hc_eps)
        for i in range(n):
            for j in range(n):
                plt.store(comb_ref.at[tokens, jnp.int32(i * n + j)], comb[i][j], mask=valid)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """The launch choices of ``hc_pre``: block_t tokens per program (a power of two), block_d stream columns
    per program (a power of two >= 16 dividing d; d with the norm, which needs whole rows), Triton's warps."""
    block_t: int = 16
    block_d: int = 256
    num_warps: int = 4

    def __post_init__(self):
        check_tuning(self, blocks=("block_d",))
        if self.block_t & (self.block_t - 1):
            raise ValueError(f"hc_pre TuningConfig: block_t={self.block_t} must be a power of two")


def choose_tuning(d: int, norm: bool) -> TuningConfig:
    """Streams of width d, with or without the RMSNorm: 16 tokens x min(d, 256) columns per program (n fp32
    tiles of 16 x 256 in registers); with the norm one token's whole row."""
    return TuningConfig(block_t=1, block_d=d) if norm else TuningConfig(block_t=16, block_d=min(d, 256))


@functools.partial(jax.jit, static_argnames=("rms_eps", "hc_eps", "iters", "norm_eps", "tuning", "interpret",
                                             "poison_outputs"))
def hc_pre(streams, fn, base, scale, *, rms_eps: float, hc_eps: float, iters: int, norm_weight=None,
           norm_eps: float = 0.0, tuning: TuningConfig | None = None, interpret: bool = False,
           poison_outputs: bool = False):
    """Pallas (Triton) mHC pre-step; same arguments (``n`` from the shape) and results as ``reference``, for
    ``streams [..., n, d]``. tuning: None for ``choose_tuning(d, norm_weight is not None)``. poison_outputs:
    testing aid (``common.triton_call``)."""
    *lead, n, d = streams.shape
    R = (2 + n) * n
    if not supported(n, d) or fn.shape != (R, n * d) or base.shape != (R,) or scale.shape != (3,) or iters < 1:
        raise ValueError(f"hc_pre: streams {streams.shape}, fn {fn.shape}, base {base.shape}, scale {scale.shape}, "
                         f"iters {iters}: expected [..., n, d] with d a power of two >= 16, fn [(2+n)n, n*d], "
                         f"base [(2+n)n], scale [3], iters >= 1")
    norm = norm_weight is not None
    if norm and norm_weight.shape != (d,):
        raise ValueError(f"hc_pre: norm_weight {norm_weight.shape}, expected [{d}] (the streams' width)")
    tuning = tuning or choose_tuning(d, norm)
    bt, bd = tuning.block_t, tuning.block_d
    if d % bd or (norm and bd != d):
        raise ValueError(f"hc_pre: block_d={bd} must divide d={d}"
                         + (", equal to it with norm_weight" if norm else ""))
    flat = streams.reshape(-1, n * d)
    T = flat.shape[0]
    rms_in_kernel = T <= MIX_AS_SUM_MAX_TOKENS  # one XLA kernel fewer; with whole rows, two
    if rms_in_kernel:
        mix, sum_squares = mix_sums(flat.astype(jnp.float32), fn)
    else:
        mix = mix_logits(flat.reshape(T, n, d), fn, rms_eps)
    whole = lambda *shape: pl.BlockSpec(shape, lambda t, k: (0,) * len(shape))  # the kernel indexes its block
    inputs = [(flat, whole(T, n * d)), (mix, whole(T, R)), (base.astype(jnp.float32), whole(R)),
              (scale.astype(jnp.float32), whole(3))]
    if rms_in_kernel and bd < d:
        inputs.append((sum_squares, whole(T, 1)))
    if norm:
        inputs.append((norm_weight.astype(jnp.float32), whole(d)))
    args, in_specs = map(list, zip(*inputs))
    x, post, comb = triton_call(
        functools.partial(_kernel, n=n, d=d, iters=iters, hc_eps=hc_eps, block_t=bt, block_d=bd,
                          rms_eps=rms_eps if rms_in_kernel else None, norm_eps=norm_eps if norm else None),
        args, grid=(pl.cdiv(T, bt), d // bd), in_specs=in_specs,
        out_shape=[jax.ShapeDtypeStruct((T, d), streams.dtype if norm else jnp.float32),
                   jax.ShapeDtypeStruct((T, n), jnp.float32),
                   jax.ShapeDtypeStruct((T, n * n), jnp.float32)],
        out_specs=[whole(T, d), whole(T, n), whole(T, n * n)],
        num_warps=tuning.num_warps, num_stages=1, interpret=interpret, name=f"dsv4_hc_pre_n{n}_i{iters}" + "_norm" * norm,
        poison=poison_outputs)
    return x.reshape(*lead, d), post.reshape(*lead, n), comb.reshape(*lead, n, n)
