"""Manifold-constrained hyper-connections (mHC): n residual streams per token.

Each sub-block reads ``u = sum_i pre_i X_i`` and writes back ``X'_j = post_j f + sum_i C[i,j] X_i``,
where C is pushed towards a doubly stochastic matrix by Sinkhorn iterations. All weights are fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .. import ops
from ..ops.hyper_connection import collapse, hc_weights, mix_logits
from .layers import RMSNorm
from .config import DeepseekV4Config
from .spec import Storage, param


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

    def __call__(self, streams, norm: RMSNorm):
        """The step before a sub-block: streams [..., n, d] -> (its input ``norm(sum_i pre_i X_i)`` [..., d],
        post, comb)."""
        c = self.cfg
        return ops.hc_pre(streams, self.fn[...], self.base[...], self.scale[...], norm.weight[...],
                          rms_eps=c.rms_norm_eps, hc_eps=c.hc_eps, iters=c.hc_sinkhorn_iters, norm_eps=norm.eps,
                          weights=self.weights)


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
