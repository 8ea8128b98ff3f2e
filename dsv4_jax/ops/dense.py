"""Dense linear layers and the RMS norms. A linear's weight may be an FP8 ``QuantArray`` (the released block-scaled
format kept on the device): XLA dequantises it inside the step, Pallas streams the FP8 bytes through
kernels_pallas/fp8_linear.py, which dequantises in registers; the opt-in "fp8_gemm" implementation of "linear"
quantises the activations of larger chunks to FP8 as DeepSeek's inference does (kernels_pallas/fp8_gemm.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from kernels_pallas.fp8_gemm import quantized_linear
from kernels_pallas.fp8_linear import fp8_linear

from ..weights.quant_array import QuantArray
from .choice import current, interpret, pallas
from .parallel import current_axes, tp_sum

# For the fp32 products the reference computes in fp32 (router logits, mHC mixing): a GPU's default
# precision rounds fp32 inputs to TF32 (10-bit mantissa), which PyTorch's default does not.
FP32 = jax.lax.Precision.HIGHEST


# The FP8 kernel is weight-only, for few rows (decode); more rows than this dequantise and use XLA's dot, or
# under "fp8_gemm" quantise the activations too.
FP8_KERNEL_MAX_ROWS = 64


def linear(x: jax.Array, weight: jax.Array | QuantArray, out_dtype=None, precision=None) -> jax.Array:
    """``x [..., in] @ weight[out, in]^T -> [..., out]``; ``weight`` an array or an FP8 QuantArray."""
    if isinstance(weight, QuantArray):
        y = _fp8_kernel(x.reshape(-1, x.shape[-1]), weight, out_dtype or x.dtype)
        if y is not None:
            return y.reshape(*x.shape[:-1], -1)
        weight = dense(weight, x.dtype)
    return jnp.einsum("...i,oi->...o", x, weight.astype(x.dtype), preferred_element_type=out_dtype,
                      precision=precision)


def _fp8_kernel(x2: jax.Array, weight: QuantArray, out_dtype, groups: int = 1) -> jax.Array | None:
    """x2 [rows, groups * in] with an FP8 block-scaled weight [out, in] -> [rows, out] through an FP8 kernel
    where one applies: under "fp8_gemm" above FP8_KERNEL_MAX_ROWS rows, x2 quantised per 1 x 128 block and the
    FP8 x FP8 kernel; under "pallas" or "fp8_gemm", the weight-only kernel for bf16 activations of at most
    FP8_KERNEL_MAX_ROWS rows. Else None: the caller dequantises the weight (exact) for XLA's dot."""
    if weight.packed or weight.values.ndim != 2:
        raise ValueError(f"a linear takes an FP8 QuantArray [out, in]; got values {weight.values.dtype} "
                         f"{tuple(weight.values.shape)}")
    rows, out_dtype = x2.shape[0], jnp.dtype(out_dtype)
    if current().of("linear") == "fp8_gemm" and rows > FP8_KERNEL_MAX_ROWS:
        return quantized_linear(x2, weight.values, weight.scales.astype(jnp.float32), out_dtype=out_dtype,
                                groups=groups, interpret=interpret())
    if pallas("linear") and x2.dtype == jnp.bfloat16 and rows <= FP8_KERNEL_MAX_ROWS:
        # the ue8m0 scales as stored: the kernel decodes them (no conversion kernel per linear and step)
        return fp8_linear(x2, weight.values, weight.scales, out_dtype=out_dtype, groups=groups, interpret=interpret())
    return None


def grouped_linear(x: jax.Array, weight: jax.Array | QuantArray, out_per_group: int) -> jax.Array:
    """Block-diagonal projection: x [..., G, in] with weight [G * out_per_group, in] (an array or an FP8
    QuantArray) -> [..., G, out_per_group]: group g through its own rows. An FP8 weight goes through an FP8 kernel
    in its ``groups`` form where one applies (``_fp8_kernel``), else is dequantised here."""
    *lead, G, K = x.shape
    if isinstance(weight, QuantArray):
        y = _fp8_kernel(x.reshape(-1, G * K), weight, x.dtype, G)
        if y is not None:
            return y.reshape(*lead, G, out_per_group)
    w = dense(weight, x.dtype).reshape(-1, out_per_group, K)
    return jnp.einsum("...gi,goi->...go", x, w)


def dense(weight: jax.Array | QuantArray, dtype) -> jax.Array:
    """A weight as a plain array of ``dtype``: a QuantArray dequantised (exact, for a bf16 or fp32 dtype)."""
    return weight.dequantize(dtype) if isinstance(weight, QuantArray) else weight.astype(dtype)


def row_parallel_linear(x: jax.Array, weight: jax.Array | QuantArray, out_dtype=None) -> jax.Array:
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
