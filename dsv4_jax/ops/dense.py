"""Dense linear layers and the RMS norms: plain XLA (quantized weights will be handled here)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .parallel import current_axes, tp_sum

# For the fp32 products the reference computes in fp32 (router logits, mHC mixing): a GPU's default
# precision rounds fp32 inputs to TF32 (10-bit mantissa), which PyTorch's default does not.
FP32 = jax.lax.Precision.HIGHEST


def linear(x: jax.Array, weight: jax.Array, out_dtype=None, precision=None) -> jax.Array:
    """``x [..., in] @ weight[out, in]^T -> [..., out]``."""
    return jnp.einsum("...i,oi->...o", x, weight.astype(x.dtype), preferred_element_type=out_dtype,
                      precision=precision)


def row_parallel_linear(x: jax.Array, weight: jax.Array, out_dtype=None) -> jax.Array:
    """``linear`` whose input dimension may be split over tensor-parallel devices (x [..., in_shard], weight
    [out, in_shard]): each shard's partial product, summed over the shards in fp32 before the cast."""
    if current_axes().tp is None:
        return linear(x, weight, out_dtype)
    return tp_sum(linear(x, weight, jnp.float32)).astype(out_dtype or x.dtype)


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
