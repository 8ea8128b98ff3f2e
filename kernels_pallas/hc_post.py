"""The mHC step after a sub-block (DeepSeek-V4 §5) fused with the next pre-step's mixing matmul, as one Pallas
GPU kernel.

    hc_post(streams [T, n, d], block_out [T, d], post [T, n] f32, comb [T, n, n] f32, fn [(2+n)n, n*d] f32)
        -> (new streams [T, n, d] in streams' dtype, raw [P, T, (2+n)n] f32, sq [P, T] f32)

Meaning (``reference``): the new streams are ``dsv4_jax.hyper_connection.expand``:
``X'_j = post_j f + sum_i C[i, j] X_i``; ``raw`` and ``sq`` are partial sums (over P column blocks) of the
next pre-step's mixing matmul ``vec(X') @ fn^T`` and of ``vec(X')^2``, both of the new streams as stored
(rounded to their dtype). ``kernels_pallas.hc_pre.hc_pre_partials`` takes them from there, so the two
kernels do between two sub-blocks what XLA runs as the expand's einsum and adds, the RMS reduction, the
fp32 conversion and the mixing matmul (~7 kernels per sub-block in run 13's batch-1 profile).

Backend: the Pallas **Triton** backend. Grid ``(token blocks, d / block_d)``: a program owns ``block_t``
tokens and ``block_d`` columns of every stream, reads them and the sub-block output once, writes its
columns of the new streams, and reduces them against its columns of ``fn`` into partial logits. Those
products are elementwise multiplies and row sums in fp32 (tensor-core dots would round fp32 to TF32,
which the reference does not); the ``(2+n)n`` rows of ``fn`` are a loop, not unrolled (Triton's compile
time grows fast with unrolled code: see ``hc_pre``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dsv4_jax.hyper_connection import expand

from .common import triton_call
from .hc_pre import check_blocks, mix_partials, supported

__all__ = ["hc_post", "reference", "bench_cases"]


def reference(streams, block_out, post, comb, fn):
    """The XLA meaning: ``expand``, then the mixing matmul and sum of squares of its result as one partial."""
    new = expand(streams, block_out, post, comb)
    return (new, *mix_partials(new, fn))


def _kernel(streams_ref, out_ref, post_ref, comb_ref, fn_ref, new_ref, raw_ref, sq_ref, *, n: int, d: int,
            block_t: int, block_d: int):
    """streams_ref [T, n*d]; out_ref [T, d]; post_ref [T, n]; comb_ref [T, n*n]; fn_ref [R, n*d] -> new_ref
    [T, n*d]; raw_ref [P, T, R]; sq_ref [P, T]. One program: ``block_t`` tokens x ``block_d`` columns."""
    T = streams_ref.shape[0]
    part = pl.program_id(1)
    start = pl.program_id(0) * block_t
    k0 = pl.multiple_of(part * block_d, block_d)
    valid = start + jnp.arange(block_t, dtype=jnp.int32) < T
    tokens = pl.ds(start, block_t)

    def weight(ref, j):  # [block_t]
        return plt.load(ref.at[tokens, jnp.int32(j)], mask=valid, other=0.0)

    def tile(ref, col):  # [block_t, block_d] fp32
        return plt.load(ref.at[tokens, pl.ds(col, block_d)], mask=valid[:, None], other=0).astype(jnp.float32)

    f = tile(out_ref, k0)
    xs = [tile(streams_ref, i * d + k0) for i in range(n)]
    new = []
    for j in range(n):  # as expand: post_j f + (sum_i C[i, j] X_i), rounded to the streams' dtype
        mixed = functools.reduce(jnp.add, [weight(comb_ref, i * n + j)[:, None] * xs[i] for i in range(n)])
        x_new = (weight(post_ref, j)[:, None] * f + mixed).astype(new_ref.dtype)
        plt.store(new_ref.at[tokens, pl.ds(j * d + k0, block_d)], x_new, mask=valid[:, None])
        new.append(x_new.astype(jnp.float32))
    plt.store(sq_ref.at[part, tokens], functools.reduce(jnp.add, [jnp.sum(x * x, axis=1) for x in new]),
              mask=valid)

    @pl.loop(0, fn_ref.shape[0])
    def _(r):
        def row(j):  # fn[r] over stream j's columns of this program, [1, block_d]
            return plt.load(fn_ref.at[r, pl.ds(j * d + k0, block_d)])[None, :]

        logit = functools.reduce(jnp.add, [jnp.sum(new[j] * row(j), axis=1) for j in range(n)])
        plt.store(raw_ref.at[part, tokens, r], logit, mask=valid)


@functools.partial(jax.jit, static_argnames=("block_t", "block_d", "interpret", "poison_outputs"))
def hc_post(streams, block_out, post, comb, fn, *, block_t: int = 16, block_d: int | None = None,
            interpret: bool = False, poison_outputs: bool = False):
    """Pallas (Triton) expand + partial mixing sums; same arguments and results as ``reference`` (with
    P = d / block_d partials), for ``streams [..., n, d]``. block_t: tokens per program (power of two >= 16);
    block_d: columns per program (power of two dividing d; default min(d, 128): n + 1 fp32 input tiles and
    n new ones of 16 x 128 in registers). poison_outputs: testing aid (``common.triton_call``)."""
    *lead, n, d = streams.shape
    R = (2 + n) * n
    if (not supported(n, d) or block_out.shape != (*lead, d) or post.shape != (*lead, n)
            or comb.shape != (*lead, n, n) or fn.shape != (R, n * d)):
        raise ValueError(f"hc_post: streams {streams.shape}, block_out {block_out.shape}, post {post.shape}, "
                         f"comb {comb.shape}, fn {fn.shape}: expected streams [..., n, d] with d a power of two "
                         f">= 16, block_out [..., d], post [..., n], comb [..., n, n], fn [(2+n)n, n*d]")
    bd = check_blocks("hc_post", block_t, block_d or min(d, 128), d)
    flat = streams.reshape(-1, n * d)
    T, P = flat.shape[0], d // bd
    whole = lambda *shape: pl.BlockSpec(shape, lambda t, k: (0,) * len(shape))  # the kernel indexes its block
    new, raw, sq = triton_call(
        functools.partial(_kernel, n=n, d=d, block_t=block_t, block_d=bd),
        [flat, block_out.reshape(T, d), post.reshape(T, n).astype(jnp.float32),
         comb.reshape(T, n * n).astype(jnp.float32), fn.astype(jnp.float32)],
        grid=(pl.cdiv(T, block_t), P),
        in_specs=[whole(T, n * d), whole(T, d), whole(T, n), whole(T, n * n), whole(R, n * d)],
        out_shape=[jax.ShapeDtypeStruct((T, n * d), streams.dtype), jax.ShapeDtypeStruct((P, T, R), jnp.float32),
                   jax.ShapeDtypeStruct((P, T), jnp.float32)],
        out_specs=[whole(T, n * d), whole(P, T, R), whole(P, T)],
        num_warps=4, num_stages=1, interpret=interpret, name=f"dsv4_hc_post_n{n}", poison=poison_outputs)
    return new.reshape(*lead, n, d), raw, sq


# ----------------------------------------------------------------------------------------------------------
# Benchmarks (scripts/bench_kernels.py)
# ----------------------------------------------------------------------------------------------------------


def _inputs(key, T, n, d):
    k = jax.random.split(key, 5)
    comb = jax.nn.softmax(jax.random.normal(k[3], (T, n, n), jnp.float32), axis=-1)
    return (jax.random.normal(k[0], (T, n, d), jnp.bfloat16), jax.random.normal(k[1], (T, d), jnp.bfloat16),
            2 * jax.nn.sigmoid(jax.random.normal(k[2], (T, n), jnp.float32)), comb,
            0.02 * jax.random.normal(k[4], ((2 + n) * n, n * d), jnp.float32))


def bench_cases():
    """Flash mHC (n = 4, d = 4096): a batch-1 and a batch-128 decode step's tokens and a 16384-token prefill
    chunk, against the XLA meaning (expand, then the mixing matmul at full fp32 and the sum of squares).
    Bytes: fn once, the streams read and written, the sub-block output read."""
    n, d = 4, 4096
    return [{
        "name": f"hc_post_T{T}",
        "shapes": {"T": T, "n": n, "d": d},
        "args": functools.partial(_inputs, T=T, n=n, d=d),
        "bytes": (2 + n) * n * n * d * 4 + T * (2 * n * d + d) * 2,
        "flops": 2 * T * (2 + n) * n * n * d,
        "pallas": hc_post,
        "reference": reference,
    } for T in (1, 128, 16384)]
