"""The mHC step before each sub-block (DeepSeek-V4 §5) as Pallas GPU kernels, with the expand of the sub-block
before it fused in at decode sizes.

    hc_pre(streams [T, n, d], fn [(2+n)n, n*d] f32, base [(2+n)n] f32, scale [3] f32, *, rms_eps, hc_eps,
           iters) -> (x [T, d] in streams' dtype, post [T, n] f32, comb [T, n, n] f32)
    hc_expand_pre(streams, block_out [T, d], post, comb, fn, base, scale, ...) -> (expanded streams, x, post,
           comb): the previous sub-block's ``expand`` into the streams, then ``hc_pre`` on them

Meaning (``reference``, ``expand_reference``: ``dsv4_jax.hyper_connection``'s ``hc_weights`` then
``collapse``, after ``expand``): mixing logits ``fn @ RMS(vec(streams))``; ``pre = sigmoid(.) + eps``,
``post = 2 sigmoid(.)``, ``comb`` = the Sinkhorn normalisation (row softmax + eps, a column normalisation,
then ``iters - 1`` rounds of row and column normalisation, each ``x / (sum + eps)``); the sub-block input
``x = sum_i pre_i X_i``.

Why kernels: per token this is a 4 x 4 matrix, 24 logits and a weighted sum of 4 rows, but XLA runs it as
~10 small kernels per sub-block (the Sinkhorn alone as ~21 dependent row / column sums), 12 sub-blocks per
step of the 6-layer Flash-width slice: 213 us and ~118 kernels of a 1.9 ms batch-1 decode step on an H200.
With the Sinkhorn in a kernel, the mixing logits and the expand were still ~5 XLA kernels per sub-block
(run 22's profile: 163 us of a 1.65 ms step), so at decode sizes (``MIX_AS_SUM_MAX_TOKENS`` tokens or
fewer) a first kernel (``mix_kernel``) does those.

Backend: the Pallas **Triton** backend. At decode sizes two kernels, one token per program (a 16-row tile,
the tensor-core minimum, left 15 rows idle: GPU run 26), one warp each (reductions within a warp):

* ``mix_kernel``, grid ``(tokens, d / block_c)``: a program owns ``block_c`` columns of each of the n streams.
  With ``expand`` it first forms and stores the new streams at those columns (the n-term sum needs all n
  streams of a column, hence this split of the columns). Then the products of those columns with the
  matching ``[(2+n)n, block_c]`` slices of ``fn`` in fp32 (rows past ``(2+n)n`` masked to zero) and the
  streams' sum of squares: one row of ``Rp`` partial sums per program, ``Rp`` a power of two above
  ``(2+n)n``, whose column ``(2+n)n`` holds the sum of squares. Spreading the 1.5 MB of ``fn`` over
  d / block_c programs keeps each program's reads short.
* ``decode_weights_kernel``, grid ``(tokens, d / block_d)``: sums the partial rows into scalar logits,
  applies the RMS factor, and computes ``pre`` for its ``block_d`` columns of x; the program of the first
  column block also stores ``post`` and ``comb``, the Sinkhorn being scalar arithmetic.

Above the decode sizes XLA computes the mixing logits (a matmul, which does not re-read ``fn`` per token
block) and ``weights_kernel`` does the rest with grid ``(token blocks, d / block_d)``: each of the
``(2+n)n`` logits is its own ``[block_t]`` vector, so the weights and the Sinkhorn are elementwise
arithmetic on those vectors. The Sinkhorn rounds are a loop in both (unrolled, Triton took minutes to
compile them). Tokens past the end are masked on load and store.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dsv4_jax.hyper_connection import MIX_AS_SUM_MAX_TOKENS, collapse, expand, hc_weights, mix_logits

from .common import triton_call

__all__ = ["hc_pre", "hc_expand_pre", "reference", "expand_reference", "sinkhorn_entries", "supported"]


def reference(streams, fn, base, scale, *, rms_eps: float, hc_eps: float, iters: int):
    """The XLA path (``HyperConnection``'s): ``hc_weights``, then ``collapse``."""
    pre, post, comb = hc_weights(streams, fn, base, scale, n=streams.shape[-2], rms_eps=rms_eps, hc_eps=hc_eps,
                                 sinkhorn_iters=iters)
    return collapse(streams, pre), post, comb


def expand_reference(streams, block_out, post, comb, fn, base, scale, **kw):
    """The XLA path of a sub-block boundary: ``expand``, then ``reference`` on the new streams."""
    new = expand(streams, block_out, post, comb)
    return new, *reference(new, fn, base, scale, **kw)


def supported(n: int, d: int) -> bool:
    """Shapes the kernels take: Triton vectors are a power of two long."""
    return n >= 1 and d >= 16 and not d & (d - 1)


def partial_width(n: int) -> int:
    """Rp: the partial-sum row width, the power of two above (2+n)n (Triton vectors are a power of two long)."""
    return 1 << ((2 + n) * n).bit_length()


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


def mix_kernel(*refs, n: int, d: int, block_c: int, with_expand: bool):
    """refs: streams [T, n*d], (with_expand: block_out [T, d], post [T, n], comb [T, n*n] f32), fn [R, n*d] f32;
    outputs (with_expand: new streams [T, n*d]), partials [T, Rp, d / block_c] f32. One program: one token,
    ``block_c`` columns of each stream."""
    if with_expand:
        streams_ref, out_ref, post_ref, comb_ref, fn_ref, new_ref, part_ref = refs
    else:
        streams_ref, fn_ref, part_ref = refs
    R, Rp = fn_ref.shape[0], part_ref.shape[1]
    t, g = pl.program_id(0), pl.program_id(1)
    c0 = pl.multiple_of(g * block_c, block_c)

    def row(ref, col):  # [block_c] fp32
        return ref[t, pl.ds(col, block_c)].astype(jnp.float32)

    xs = [row(streams_ref, i * d + c0) for i in range(n)]
    if with_expand:  # X'_j = post_j f + sum_i C[i, j] X_i, in expand's order of operations, stored rounded
        f = row(out_ref, c0)
        new = []
        for j in range(n):
            mixed = functools.reduce(jnp.add, [comb_ref[t, i * n + j] * xs[i] for i in range(n)])
            v = (post_ref[t, j] * f + mixed).astype(new_ref.dtype)
            new_ref[t, pl.ds(j * d + c0, block_c)] = v
            new.append(v.astype(jnp.float32))
        xs = new

    rows = jnp.arange(Rp, dtype=jnp.int32)
    acc = jnp.zeros((Rp, block_c), jnp.float32)
    squares = jnp.zeros((block_c,), jnp.float32)
    for i in range(n):
        w = plt.load(fn_ref.at[pl.ds(0, Rp), pl.ds(i * d + c0, block_c)], mask=(rows < R)[:, None], other=0.0)
        acc += w * xs[i][None, :]
        squares += xs[i] * xs[i]
    part_ref[t, :, g] = jnp.where(rows == R, jnp.sum(squares), jnp.sum(acc, axis=1))


def _store_weights(post_ref, comb_ref, at, logit, *, n: int, iters: int, hc_eps: float, **store):
    """post and comb of one program's tokens (``at``: their index) from ``logit(j, scale_index)``."""
    for i in range(n):
        plt.store(post_ref.at[at, jnp.int32(i)], 2.0 * jax.nn.sigmoid(logit(n + i, 1)), **store)
    comb = sinkhorn_entries([[logit(2 * n + i * n + j, 2) for j in range(n)] for i in range(n)], iters, hc_eps)
    for i in range(n):
        for j in range(n):
            plt.store(comb_ref.at[at, jnp.int32(i * n + j)], comb[i][j], **store)


def decode_weights_kernel(streams_ref, part_ref, base_ref, scale_ref, x_ref, post_ref, comb_ref, *, n: int, d: int,
                          iters: int, rms_eps: float, hc_eps: float, block_d: int):
    """streams_ref [T, n*d]; part_ref [T, Rp, G] f32 (mix_kernel's partial sums, the sum of squares in column
    R); base_ref [R]; scale_ref [3]; x_ref [T, d]; post_ref [T, n]; comb_ref [T, n*n]. One program: one
    token, ``block_d`` columns; each logit is a scalar, so the Sinkhorn is scalar arithmetic."""
    t, k = pl.program_id(0), pl.program_id(1)
    k0 = pl.multiple_of(k * block_d, block_d)
    R = base_ref.shape[0]

    def total(j):
        return jnp.sum(part_ref[t, j, :])

    factor = lax.rsqrt(total(R) / (n * d) + rms_eps)  # mix_logits' decode form: the raw sums, then the factor

    def logit(j, s):
        return total(j) * factor * scale_ref[s] + base_ref[j]

    pre = [jax.nn.sigmoid(logit(i, 0)) + hc_eps for i in range(n)]
    x = functools.reduce(jnp.add, [pre[i] * streams_ref[t, pl.ds(i * d + k0, block_d)].astype(jnp.float32)
                                   for i in range(n)])
    x_ref[t, pl.ds(k0, block_d)] = x.astype(x_ref.dtype)
    pl.when(k == 0)(lambda: _store_weights(post_ref, comb_ref, t, logit, n=n, iters=iters, hc_eps=hc_eps))


def weights_kernel(streams_ref, mix_ref, base_ref, scale_ref, x_ref, post_ref, comb_ref, *, n: int, d: int,
                   iters: int, hc_eps: float, block_t: int, block_d: int):
    """streams_ref [T, n*d]; mix_ref [T, R] f32 mixing logits; base_ref [R]; scale_ref [3]; x_ref [T, d];
    post_ref [T, n]; comb_ref [T, n*n]. One program: ``block_t`` tokens x ``block_d`` columns; each logit is
    a ``[block_t]`` vector."""
    T = streams_ref.shape[0]
    start = pl.program_id(0) * block_t
    k0 = pl.multiple_of(pl.program_id(1) * block_d, block_d)
    valid = start + jnp.arange(block_t, dtype=jnp.int32) < T
    tokens = pl.ds(start, block_t)

    def logit(j, s):
        return plt.load(mix_ref.at[tokens, jnp.int32(j)], mask=valid, other=0.0) * scale_ref[s] + base_ref[j]

    def tile(i):  # stream i, this program's columns and tokens, fp32
        return plt.load(streams_ref.at[tokens, pl.ds(i * d + k0, block_d)], mask=valid[:, None],
                        other=0).astype(jnp.float32)

    pre = [jax.nn.sigmoid(logit(i, 0)) + hc_eps for i in range(n)]
    acc = functools.reduce(jnp.add, [pre[i][:, None] * tile(i) for i in range(n)])
    plt.store(x_ref.at[tokens, pl.ds(k0, block_d)], acc.astype(x_ref.dtype), mask=valid[:, None])
    pl.when(pl.program_id(1) == 0)(lambda: _store_weights(post_ref, comb_ref, tokens, logit, n=n, iters=iters,
                                                          hc_eps=hc_eps, mask=valid))


def _check(streams, fn, base, scale, iters, block_t, block_d, block_c):
    *_, n, d = streams.shape
    R = (2 + n) * n
    if not supported(n, d) or fn.shape != (R, n * d) or base.shape != (R,) or scale.shape != (3,) or iters < 1:
        raise ValueError(f"hc_pre: streams {streams.shape}, fn {fn.shape}, base {base.shape}, scale {scale.shape}, "
                         f"iters {iters}: expected [..., n, d] with d a power of two >= 16, fn [(2+n)n, n*d], "
                         f"base [(2+n)n], scale [3], iters >= 1")
    bd, bc = block_d or min(d, 256), block_c or min(d, 64)
    for name, v in (("block_t", block_t), ("block_d", bd), ("block_c", bc)):
        if v < 16 or v & (v - 1) or (name != "block_t" and d % v):
            raise ValueError(f"hc_pre: {name}={v} must be a power of two >= 16" + ("" if name == "block_t" else
                                                                                   f" dividing d={d}"))
    return n, d, bd, bc


def _whole(*shape):  # a BlockSpec of the whole array: the kernels index their own blocks
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _weights_outputs(T, n, d, dtype):
    shapes = [jax.ShapeDtypeStruct((T, d), dtype), jax.ShapeDtypeStruct((T, n), jnp.float32),
              jax.ShapeDtypeStruct((T, n * n), jnp.float32)]
    return dict(out_shape=shapes, out_specs=[_whole(*o.shape) for o in shapes])


def _decode(flat, fn, base, scale, expand_args, *, n, d, iters, rms_eps, hc_eps, block_d, block_c, num_warps,
            interpret, poison):
    """Decode sizes, one token per program: mix_kernel (with the expand if ``expand_args``), then
    decode_weights_kernel. Returns (new flat streams or None, x, post, comb)."""
    T = flat.shape[0]
    R, Rp, G = fn.shape[0], partial_width(n), d // block_c
    part = jax.ShapeDtypeStruct((T, Rp, G), jnp.float32)
    args, specs, outs = [flat], [_whole(T, n * d)], [part]
    if expand_args is not None:
        block_out, post, comb = expand_args
        args += [block_out.reshape(T, d), post.reshape(T, n).astype(jnp.float32),
                 comb.reshape(T, n * n).astype(jnp.float32)]
        specs += [_whole(T, d), _whole(T, n), _whole(T, n * n)]
        outs = [jax.ShapeDtypeStruct(flat.shape, flat.dtype), part]
    res = triton_call(
        functools.partial(mix_kernel, n=n, d=d, block_c=block_c, with_expand=expand_args is not None),
        [*args, fn.astype(jnp.float32)], grid=(T, G), in_specs=[*specs, _whole(R, n * d)], out_shape=outs,
        out_specs=[_whole(*o.shape) for o in outs], num_warps=num_warps, num_stages=1, interpret=interpret,
        name=f"dsv4_hc_mix_n{n}" + ("_expand" if expand_args is not None else ""), poison=poison)
    new = res[0] if expand_args is not None else None
    flat = flat if new is None else new
    x, post, comb = triton_call(
        functools.partial(decode_weights_kernel, n=n, d=d, iters=iters, rms_eps=rms_eps, hc_eps=hc_eps,
                          block_d=block_d),
        [flat, res[-1], base.astype(jnp.float32), scale.astype(jnp.float32)], grid=(T, d // block_d),
        in_specs=[_whole(T, n * d), _whole(T, Rp, G), _whole(R), _whole(3)], **_weights_outputs(T, n, d, flat.dtype),
        num_warps=num_warps, num_stages=1, interpret=interpret, name=f"dsv4_hc_weights_n{n}_i{iters}", poison=poison)
    return new, x, post, comb


def _prefill(flat, fn, base, scale, *, n, d, iters, rms_eps, hc_eps, block_t, block_d, interpret, poison):
    """Above the decode sizes: XLA's mixing logits (a matmul), then weights_kernel. Returns (x, post, comb)."""
    T, R = flat.shape[0], fn.shape[0]
    mix = mix_logits(flat.reshape(T, n, d), fn, rms_eps)
    return triton_call(
        functools.partial(weights_kernel, n=n, d=d, iters=iters, hc_eps=hc_eps, block_t=block_t, block_d=block_d),
        [flat, mix, base.astype(jnp.float32), scale.astype(jnp.float32)], grid=(pl.cdiv(T, block_t), d // block_d),
        in_specs=[_whole(T, n * d), _whole(T, R), _whole(R), _whole(3)], **_weights_outputs(T, n, d, flat.dtype),
        num_warps=4, num_stages=1, interpret=interpret, name=f"dsv4_hc_pre_n{n}_i{iters}", poison=poison)


def _pre(flat, fn, base, scale, expand_args, *, n, d, iters, rms_eps, hc_eps, block_t, block_d, block_c, num_warps,
         interpret, poison):
    """flat streams [T, n*d] (and the expand's arguments or None) -> (new flat streams or None, x, post, comb)."""
    T = flat.shape[0]
    kw = dict(n=n, d=d, iters=iters, rms_eps=rms_eps, hc_eps=hc_eps, block_d=block_d, interpret=interpret,
              poison=poison)
    if T <= MIX_AS_SUM_MAX_TOKENS:
        return _decode(flat, fn, base, scale, expand_args, block_c=block_c, num_warps=num_warps, **kw)
    new = None
    if expand_args is not None:
        block_out, post, comb = expand_args
        flat = new = expand(flat.reshape(T, n, d), block_out.reshape(T, d), post.reshape(T, n),
                            comb.reshape(T, n, n)).reshape(T, n * d)
    return new, *_prefill(flat, fn, base, scale, block_t=block_t, **kw)


_STATIC = ("rms_eps", "hc_eps", "iters", "block_t", "block_d", "block_c", "num_warps", "interpret", "poison_outputs")


@functools.partial(jax.jit, static_argnames=_STATIC)
def hc_pre(streams, fn, base, scale, *, rms_eps: float, hc_eps: float, iters: int, block_t: int = 16,
           block_d: int | None = None, block_c: int | None = None, num_warps: int = 1, interpret: bool = False,
           poison_outputs: bool = False):
    """Pallas (Triton) mHC pre-step; same arguments (``n`` from the shape) and results as ``reference``, for
    ``streams [..., n, d]``. block_d: stream columns per weights program (power of two, divides d; default
    min(d, 256)); block_c: stream columns per mix_kernel program (default min(d, 64)); num_warps: of the
    decode-size kernels; block_t: tokens per weights_kernel program above the decode sizes (power of two >=
    16). poison_outputs: testing aid (``common.triton_call``)."""
    *lead, n, d = streams.shape
    n, d, bd, bc = _check(streams, fn, base, scale, iters, block_t, block_d, block_c)
    _, x, post, comb = _pre(streams.reshape(-1, n * d), fn, base, scale, None, n=n, d=d, iters=iters,
                            rms_eps=rms_eps, hc_eps=hc_eps, block_t=block_t, block_d=bd, block_c=bc,
                            num_warps=num_warps, interpret=interpret, poison=poison_outputs)
    return x.reshape(*lead, d), post.reshape(*lead, n), comb.reshape(*lead, n, n)


@functools.partial(jax.jit, static_argnames=_STATIC)
def hc_expand_pre(streams, block_out, post, comb, fn, base, scale, *, rms_eps: float, hc_eps: float, iters: int,
                  block_t: int = 16, block_d: int | None = None, block_c: int | None = None, num_warps: int = 1,
                  interpret: bool = False, poison_outputs: bool = False):
    """A sub-block boundary: ``expand(streams, block_out [..., d], post [..., n], comb [..., n, n])``, then
    ``hc_pre`` on the result; returns (new streams, x, post, comb) as ``expand_reference``. At decode sizes one
    kernel forms the new streams and their mixing sums; above, XLA's expand. Blocks as ``hc_pre``."""
    *lead, n, d = streams.shape
    n, d, bd, bc = _check(streams, fn, base, scale, iters, block_t, block_d, block_c)
    if block_out.shape != (*lead, d) or post.shape != (*lead, n) or comb.shape != (*lead, n, n):
        raise ValueError(f"hc_expand_pre: block_out {block_out.shape}, post {post.shape}, comb {comb.shape}: "
                         f"expected {(*lead, d)}, {(*lead, n)}, {(*lead, n, n)} for streams {streams.shape}")
    new, x, post, comb = _pre(streams.reshape(-1, n * d), fn, base, scale, (block_out, post, comb), n=n, d=d,
                              iters=iters, rms_eps=rms_eps, hc_eps=hc_eps, block_t=block_t, block_d=bd,
                              block_c=bc, num_warps=num_warps, interpret=interpret, poison=poison_outputs)
    return new.reshape(streams.shape), x.reshape(*lead, d), post.reshape(*lead, n), comb.reshape(*lead, n, n)


# ----------------------------------------------------------------------------------------------------------
# Benchmarks (scripts/bench_kernels.py)
# ----------------------------------------------------------------------------------------------------------


def _inputs(key, T, n, d):
    k1, k2, k3 = jax.random.split(key, 3)
    R = (2 + n) * n
    return (jax.random.normal(k1, (T, n, d), jnp.bfloat16), 0.02 * jax.random.normal(k2, (R, n * d), jnp.float32),
            0.1 * jax.random.normal(k3, (R,), jnp.float32), jnp.ones((3,), jnp.float32))


def _expand_inputs(key, T, n, d):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    streams, fn, base, scale = _inputs(k1, T, n, d)
    post = 2 * jax.nn.sigmoid(jax.random.normal(k3, (T, n), jnp.float32))
    comb = jax.nn.softmax(jax.random.normal(k4, (T, n, n), jnp.float32), axis=-1)
    return streams, jax.random.normal(k2, (T, d), jnp.bfloat16), post, comb, fn, base, scale


def bench_cases():
    """Flash mHC (n = 4, d = 4096, 20 Sinkhorn iterations): a batch-1 and a batch-128 decode step's tokens,
    and a 16384-token prefill chunk; against the XLA path. Bytes: fn once, the streams twice, x once. The
    boundary with the expand at one token: also the sub-block output once and the new streams once more."""
    n, d, iters = 4, 4096, 20
    kwargs = {"rms_eps": 1e-6, "hc_eps": 1e-6, "iters": iters}
    fn_bytes = (2 + n) * n * n * d * 4
    return [{
        "name": f"hc_pre_T{T}",
        "shapes": {"T": T, "n": n, "d": d, "iters": iters},
        "args": functools.partial(_inputs, T=T, n=n, d=d),
        "kwargs": kwargs,
        "bytes": fn_bytes + T * (2 * n * d + d) * 2,
        "flops": 2 * T * (2 + n) * n * n * d,
        "pallas": hc_pre,
        "reference": reference,
    } for T in (1, 128, 16384)] + [{
        "name": "hc_expand_pre_T1",
        "shapes": {"T": 1, "n": n, "d": d, "iters": iters},
        "args": functools.partial(_expand_inputs, T=1, n=n, d=d),
        "kwargs": kwargs,
        "bytes": fn_bytes + (3 * n * d + 2 * d) * 2,
        "flops": 2 * (2 + n) * n * n * d,
        "pallas": hc_expand_pre,
        "reference": expand_reference,
    }]
