"""The mHC pre-step: mixing weights (pre, post, Sinkhorn comb) and the sub-block's normed input.

XLA: ``hc_weights``, ``collapse`` and the norm; Pallas: the mixing logits (``mix_logits``, kernels_pallas/hc_pre.py's,
which the XLA path uses too), then that file's kernel.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from kernels_pallas import hc_pre as hc_pre_kernel
from kernels_pallas.hc_pre import mix_logits

from .choice import interpret, pallas
from .dense import rms_norm


# Up to this many tokens the Pallas pre-step also applies the sub-block's RMSNorm (one program per token holds
# whole rows), saving two XLA kernels per sub-block; above it (prefill) the kernel's column-split grid, then
# XLA's norm, which was faster there (docs/performance.md, the mHC pre-step under "Tried and reverted").
NORM_IN_KERNEL_MAX_TOKENS = 32


def sinkhorn(comb_logits: jax.Array, iters: int, eps: float) -> jax.Array:
    """[..., n, n] logits -> row softmax (+eps), then alternate column/row normalisation, column last."""
    comb = jax.nn.softmax(comb_logits, axis=-1) + eps
    comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)
        comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    return comb


def hc_weights(streams, fn, base, scale, *, n: int, rms_eps: float, hc_eps: float, sinkhorn_iters: int):
    """streams [..., n, d] -> (pre [..., n], post [..., n], comb [..., n, n]), all fp32, as buffers computed once
    (an optimization barrier): otherwise XLA's GPU fusion pulls the Sinkhorn into ``expand``'s elementwise
    fusion, recomputing its 20 iterations per output element, and a Flash-width decode step compiled for an H100
    in 162 s, not 31."""
    mix = mix_logits(streams, fn, rms_eps)
    pre_w, post_w, comb_w = mix[..., :n], mix[..., n : 2 * n], mix[..., 2 * n :]
    base = base.astype(jnp.float32)
    scale = scale.astype(jnp.float32)
    pre = jax.nn.sigmoid(pre_w * scale[0] + base[:n]) + hc_eps
    post = 2.0 * jax.nn.sigmoid(post_w * scale[1] + base[n : 2 * n])
    comb_logits = comb_w.reshape(*comb_w.shape[:-1], n, n) * scale[2] + base[2 * n :].reshape(n, n)
    return jax.lax.optimization_barrier((pre, post, sinkhorn(comb_logits, sinkhorn_iters, hc_eps)))


def collapse(streams: jax.Array, pre: jax.Array) -> jax.Array:
    """[..., n, d] x [..., n] -> [..., d] fp32: the sub-block input before its norm. Not rounded to the
    streams' dtype: the norm reads it in fp32 anyway, and XLA's GPU fusion drops that rounding on its own
    (excess precision), so rounding here would make the kernel path (kernels_pallas/hc_pre.py) less accurate
    than the XLA path on a GPU while equal on the CPU."""
    return jnp.sum(pre[..., None] * streams.astype(jnp.float32), axis=-2)


def hc_pre(streams, fn, base, scale, norm_weight, *, rms_eps: float, hc_eps: float, iters: int, norm_eps: float,
           weights=None):
    """streams [..., n, d] -> (the sub-block input ``rms_norm(sum_i pre_i X_i)`` [..., d] in the streams' dtype,
    post [..., n], comb [..., n, n] fp32). fn [(2+n)n, n*d], base [(2+n)n], scale [3]: the mHC weights;
    norm_weight [d], norm_eps: the sub-block's RMSNorm. ``weights``: the XLA path's (pre, post, comb) of the
    streams (default ``hc_weights``; the model passes its module's method, which introspection records).

    Pallas where the kernel takes the shape (``supported``): the mixing logits, then one kernel where XLA runs
    ~10 small kernels, which applies the norm too up to ``NORM_IN_KERNEL_MAX_TOKENS`` tokens."""
    *lead, n, d = streams.shape
    if not (pallas("hc_pre") and hc_pre_kernel.supported(n, d)):
        pre, post, comb = (weights or functools.partial(hc_weights, fn=fn, base=base, scale=scale, n=n,
                                                         rms_eps=rms_eps, hc_eps=hc_eps,
                                                         sinkhorn_iters=iters))(streams)
        return rms_norm(collapse(streams, pre), norm_weight, norm_eps).astype(streams.dtype), post, comb
    fused = math.prod(lead) <= NORM_IN_KERNEL_MAX_TOKENS
    x, post, comb = hc_pre_kernel.hc_pre(streams, fn, base, scale, rms_eps=rms_eps, hc_eps=hc_eps, iters=iters,
                                         interpret=interpret(),
                                         **(dict(norm_weight=norm_weight, norm_eps=norm_eps) if fused else {}))
    return (x if fused else rms_norm(x, norm_weight, norm_eps).astype(streams.dtype)), post, comb
