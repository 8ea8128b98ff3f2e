"""Manifold-constrained hyper-connections (mHC): n residual streams per token.

Each sub-block reads ``u = sum_i pre_i X_i`` and writes back ``X'_j = post_j f + sum_i C[i,j] X_i``,
where C is pushed towards a doubly stochastic matrix by Sinkhorn iterations. All weights are fp32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import FP32, RMSNorm, linear, rms_scale, unweighted_rms_norm
from .config import DeepseekV4Config
from .spec import Storage, param


# Up to this many tokens (decode) the mixing logits are products summed over vec(streams), with the RMS factor
# applied after: two reductions of the raw streams that XLA runs without a normalised copy or a GPU fp32 matmul
# (at full precision, two or three small kernels). An H200 batch-1 step of the Flash-width slice took 1.664 ms
# against 1.682 with the factor applied first and 1.686 with the matmul (docs/performance.md, run 21). Above
# it (prefill) the matmul, which does not re-read fn (1.5 MB at Flash width) per token.
MIX_AS_SUM_MAX_TOKENS = 16

# Up to this many tokens the Pallas pre-step also applies the sub-block's RMSNorm (one program per token holds
# whole rows), saving two XLA kernels per sub-block: on an H200 (run 31, one process) a Flash-width slice's
# decode step took 1.692 against 1.713 ms at batch 1, 4.27 against 4.40 at batch 8, and tied at batch 32.
# Above it (prefill) the kernel's column-split grid, then XLA's norm: a 4K prefill tied, and at 16384 tokens
# the kernel with the norm was busy 1317 us against 1205 without.
NORM_IN_KERNEL_MAX_TOKENS = 32


def mix_sums(flat: jax.Array, fn: jax.Array) -> tuple[jax.Array, jax.Array]:
    """flat [..., n*d] fp32 -> (fn @ flat [..., fn_rows], sum(flat^2) [..., 1]): the few-token mixing logits
    before their RMS factor ``rsqrt(sum / (n*d) + eps)`` (kernels_pallas.hc_pre applies it in its kernel)."""
    return jnp.sum(flat[..., None, :] * fn.astype(jnp.float32), axis=-1), jnp.sum(flat * flat, axis=-1, keepdims=True)


def mix_logits(streams: jax.Array, fn: jax.Array, eps: float) -> jax.Array:
    """streams [..., n, d] -> fn @ RMS(vec(streams)) [..., fn_rows], fp32 at full precision (``FP32``), as
    the reference computes them: the Sinkhorn and every later layer carry on their rounding."""
    flat = streams.reshape(*streams.shape[:-2], -1).astype(jnp.float32)
    if math.prod(flat.shape[:-1]) <= MIX_AS_SUM_MAX_TOKENS:
        return mix_sums(flat, fn)[0] * rms_scale(flat, eps)
    return linear(unweighted_rms_norm(flat, eps), fn.astype(jnp.float32), precision=FP32)


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


def expand(streams: jax.Array, block_out: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """X'_j = post_j * f + sum_i C[i, j] X_i: contracts C's *first* index (C is not symmetric).

    The n-term sum is written out as fp32 multiply-adds, so XLA fuses the whole step into one elementwise
    kernel; as an einsum it was a GPU dot plus separate add and convert kernels."""
    s = streams.astype(jnp.float32)
    mixed = sum(comb[..., i, :, None] * s[..., i, None, :] for i in range(streams.shape[-2]))
    return (post[..., None] * block_out.astype(jnp.float32)[..., None, :] + mixed).astype(streams.dtype)


class HyperConnection(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, *, rngs: nnx.Rngs):
        n = cfg.hc_mult
        self.cfg = cfg
        self.fn = param(0.02 * jax.random.normal(rngs.params(), ((2 + n) * n, n * cfg.hidden_size), jnp.float32),
                        ("hc", "hc_embed"), Storage.FP32)
        self.base = param(jnp.zeros(((2 + n) * n,), jnp.float32), ("hc",), Storage.FP32)
        self.scale = param(jnp.ones((3,), jnp.float32), ("hc",), Storage.FP32)

    def weights(self, streams):
        """streams [..., n, d] -> (pre, post, comb) by ``hc_weights`` (recorded by dsv4_jax.model.introspect)."""
        c = self.cfg
        return hc_weights(streams, self.fn[...], self.base[...], self.scale[...], n=c.hc_mult, rms_eps=c.rms_norm_eps,
                          hc_eps=c.hc_eps, sinkhorn_iters=c.hc_sinkhorn_iters)

    def __call__(self, streams, norm: RMSNorm, kernels: str = "xla"):
        """The step before a sub-block: streams [..., n, d] -> (its input ``norm(sum_i pre_i X_i)`` [..., d],
        post, comb). ``kernels="pallas"``: the mixing logits, then one kernel (kernels_pallas/hc_pre.py) where
        XLA runs ~10 small kernels, which applies ``norm`` too up to ``NORM_IN_KERNEL_MAX_TOKENS`` tokens."""
        c = self.cfg
        if kernels == "pallas":
            from kernels_pallas import hc_pre
            from kernels_pallas.common import interpret_default

            if hc_pre.supported(c.hc_mult, streams.shape[-1]):
                fused = math.prod(streams.shape[:-2]) <= NORM_IN_KERNEL_MAX_TOKENS
                x, post, comb = hc_pre.hc_pre(
                    streams, self.fn[...], self.base[...], self.scale[...], rms_eps=c.rms_norm_eps, hc_eps=c.hc_eps,
                    iters=c.hc_sinkhorn_iters, interpret=interpret_default(),
                    **(dict(norm_weight=norm.weight[...], norm_eps=norm.eps) if fused else {}))
                return (x if fused else norm(x).astype(streams.dtype)), post, comb
        pre, post, comb = self.weights(streams)
        return norm(collapse(streams, pre)).astype(streams.dtype), post, comb


def hyper_head(streams, fn, base, scale, *, rms_eps: float, hc_eps: float) -> jax.Array:
    """Final stream collapse [..., n, d] -> [..., d]: sigmoid weights, no Sinkhorn, no post."""
    mix = mix_logits(streams, fn, rms_eps)
    pre = jax.nn.sigmoid(mix * scale.astype(jnp.float32) + base.astype(jnp.float32)) + hc_eps
    return collapse(streams, pre).astype(streams.dtype)


class HyperHead(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, *, rngs: nnx.Rngs):
        n = cfg.hc_mult
        self.cfg = cfg
        self.hc_fn = param(0.02 * jax.random.normal(rngs.params(), (n, n * cfg.hidden_size), jnp.float32),
                           ("hc", "hc_embed"), Storage.FP32)
        self.hc_base = param(jnp.zeros((n,), jnp.float32), ("hc",), Storage.FP32)
        self.hc_scale = param(jnp.ones((1,), jnp.float32), ("hc",), Storage.FP32)

    def __call__(self, streams):
        return hyper_head(streams, self.hc_fn[...], self.hc_base[...], self.hc_scale[...],
                          rms_eps=self.cfg.rms_norm_eps, hc_eps=self.cfg.hc_eps)
