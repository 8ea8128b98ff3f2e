"""Basic building blocks: linear layers, RMS norms, and the non-trained ``Buffer`` variable.

Weights keep the Hugging Face layout ``[out, in]`` so checkpoint import is a name lookup,
and ``x @ W^T`` is one ``dot_general`` (XLA contracts the stored layout without a copy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .spec import Storage, param


class Buffer(nnx.Variable):
    """Checkpointed state that gradients do not train (hash table, routing bias)."""


def rms_scale(xf: jax.Array, eps: float) -> jax.Array:
    """xf [..., D] fp32 -> 1 / sqrt(mean(xf^2) + eps) [..., 1]: the factor every RMSNorm applies."""
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Weighted RMSNorm over the last axis: fp32 compute, fp32 weight, one cast back at the end."""
    xf = x.astype(jnp.float32)
    return (weight.astype(jnp.float32) * (xf * rms_scale(xf, eps))).astype(x.dtype)


def unweighted_rms_norm(x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm without a weight (per-head query norm, mHC input norm); the scale is taken in fp32."""
    return x * rms_scale(x.astype(jnp.float32), eps).astype(x.dtype)


# For the fp32 products the reference computes in fp32 (router logits, mHC mixing): a GPU's default
# precision rounds fp32 inputs to TF32 (10-bit mantissa), which PyTorch's default does not.
FP32 = jax.lax.Precision.HIGHEST


def linear(x: jax.Array, weight: jax.Array, out_dtype=None, precision=None) -> jax.Array:
    """``x [..., in] @ weight[out, in]^T -> [..., out]``."""
    return jnp.einsum("...i,oi->...o", x, weight.astype(x.dtype), preferred_element_type=out_dtype,
                      precision=precision)


def _normal(rngs: nnx.Rngs, shape, std=0.02):
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class Linear(nnx.Module):
    """``axes``: the weight's logical axes, [out, in] (model/spec.py); ``storage``: its storage precision."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], storage: Storage, dtype,
                 rngs: nnx.Rngs):
        self.weight = param(_normal(rngs, (out_features, in_features)), axes, storage, dtype)

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        return linear(x, self.weight[...], out_dtype)


class RMSNorm(nnx.Module):
    """Weighted RMSNorm; the weight is held in fp32 whatever the model dtype (checkpoints store bf16).
    ``axis``: the logical axis of the normed dimension (model/spec.py)."""

    def __init__(self, size: int, eps: float, axis: str):
        self.weight = param(jnp.ones((size,)), (axis,), Storage.FP32)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)
