"""DeepSeek's released weight formats quantised in numpy (float64 exponent arithmetic): an independent reference
for dsv4_jax.weights.quantization's jax quantisers, and the writer of the tests' released-format checkpoints."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from dsv4_jax.weights.quantization import (
    E2M1_GRID, E2M1_MAX, E4M3_MAX, FP4_BLOCK, FP8_BLOCK, block_scales, fp8_scale_shape)

_UE8M0_MIN_EXP, _UE8M0_MAX_EXP = -127, 127


def pack_fp4(codes: np.ndarray) -> np.ndarray:
    """e2m1 codes [..., out, in] (in even) -> int8 [..., out, in/2]."""
    c = codes.astype(np.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(np.int8)

def power_of_two_exponents(amax: np.ndarray, max_code: float) -> np.ndarray:
    """Smallest k (clipped to ue8m0's [-127, 127]) with amax <= max_code * 2^k, per block; 0 for empty blocks.

    ``log2`` only guesses k; the two exact comparisons fix any off-by-one from its rounding.
    """
    amax = amax.astype(np.float64)
    k = np.ceil(np.log2(np.where(amax > 0, amax, max_code) / max_code)).astype(np.int64)
    k = np.where(amax > np.ldexp(max_code, k), k + 1, k)
    k = np.where(amax <= np.ldexp(max_code, k - 1), k - 1, k)
    return np.clip(np.where(amax > 0, k, 0), _UE8M0_MIN_EXP, _UE8M0_MAX_EXP)

def _ue8m0(exponents: np.ndarray) -> np.ndarray:
    return np.ldexp(np.float32(1), exponents).astype(ml_dtypes.float8_e8m0fnu)

def quantise_fp8_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [out, in] -> (e4m3 [out, in], ue8m0 scales [ceil(out/128), ceil(in/128)]).

    Each 128 x 128 block gets the smallest power-of-two scale whose range (448 * scale) holds the
    block's largest magnitude; w / scale is then rounded to nearest (ties to even) onto e4m3.
    """
    w = np.asarray(w, np.float32)
    out, cols = w.shape
    rb, cb = fp8_scale_shape(w.shape)
    padded = np.zeros((rb * FP8_BLOCK, cb * FP8_BLOCK), np.float32)
    padded[:out, :cols] = np.abs(w)
    amax = padded.reshape(rb, FP8_BLOCK, cb, FP8_BLOCK).max(axis=(1, 3))
    scale = _ue8m0(power_of_two_exponents(amax, E4M3_MAX))
    q = w / block_scales(scale, out, cols, FP8_BLOCK, FP8_BLOCK)  # exact: division by a power of two
    return q.astype(ml_dtypes.float8_e4m3fn), scale

def _nearest_e2m1_codes(a: np.ndarray) -> np.ndarray:
    """Magnitudes a in [0, 6] -> codes 0-7, round to nearest, ties to the even code (IEEE style)."""
    lower = np.clip(np.searchsorted(E2M1_GRID, a, side="right") - 1, 0, 7)
    upper = np.minimum(lower + 1, 7)
    mid = (E2M1_GRID[lower] + E2M1_GRID[upper]) / 2  # exact: grid values are small dyadic numbers
    take_upper = (a > mid) | ((a == mid) & (upper % 2 == 0))
    return np.where(take_upper, upper, lower).astype(np.uint8)

def quantise_fp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [out, in] (in a multiple of 32) -> (packed int8 [out, in/2], ue8m0 scales [out, in/32]).

    Each 1 x 32 block gets the smallest power-of-two scale whose range (6 * scale) holds its largest
    magnitude; |w| / scale is rounded to the nearest e2m1 value and the sign kept (also for -0).
    """
    w = np.asarray(w, np.float32)
    out, cols = w.shape
    if cols % FP4_BLOCK:
        raise ValueError(f"FP4 needs the input width to be a multiple of {FP4_BLOCK}, got shape {w.shape}")
    amax = np.abs(w).reshape(out, cols // FP4_BLOCK, FP4_BLOCK).max(axis=-1)
    scale = _ue8m0(power_of_two_exponents(amax, E2M1_MAX))
    a = np.abs(w) / block_scales(scale, out, cols, 1, FP4_BLOCK)
    codes = _nearest_e2m1_codes(a) | (np.signbit(w).astype(np.uint8) << 3)
    return pack_fp4(codes), scale
