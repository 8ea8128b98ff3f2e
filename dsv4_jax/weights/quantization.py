"""DeepSeek's released weight formats (spec §11.1) and the project's own quantisers for them, in numpy;
the dequantisers also run in jax.numpy (``xp=jnp``), for quant_array.QuantArray.

* FP8 linears: e4m3 weight [..., out, in] with one ue8m0 scale (a power of two, 2^(byte - 127)) per
  128 x 128 block, scale [..., ceil(out/128), ceil(in/128)]; W = Wq * scale (multiply, even where
  transformers calls the scale ``weight_scale_inv``).
* FP4 routed experts: e2m1 codes packed two per int8 byte, weight [..., out, in/2] (low nibble = even
  column, high nibble = odd column), one ue8m0 scale per 1 x 32 block, scale [..., out, in/32].

Leading ``...`` axes (transformers' stacked experts) are batch axes. Dequantised values are fp32 and
exact: a 3- or 1-bit mantissa times a power of two is representable in fp32 and in bf16.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

FP8_BLOCK = 128
FP4_BLOCK = 32
FP8_BLOCK_SHAPE = (FP8_BLOCK, FP8_BLOCK)  # (rows, columns) one scale covers
FP4_BLOCK_SHAPE = (1, FP4_BLOCK)
E4M3_MAX = 448.0
E2M1_MAX = 6.0
# e2m1 magnitudes for codes 0-7; codes 8-15 are the same values negated (bit 3 is the sign).
E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
E2M1_LUT = np.concatenate([E2M1_GRID, -E2M1_GRID])
_UE8M0_MIN_EXP, _UE8M0_MAX_EXP = -127, 127


def fp8_scale_shape(weight_shape) -> tuple[int, ...]:
    """[..., out, in] -> [..., ceil(out/128), ceil(in/128)]."""
    *lead, out, cols = weight_shape
    return (*lead, -(-out // FP8_BLOCK), -(-cols // FP8_BLOCK))


def fp4_scale_shape(weight_shape) -> tuple[int, ...]:
    """Logical (unpacked) [..., out, in] -> [..., out, in/32]; ``in`` must be a multiple of 32."""
    *lead, out, cols = weight_shape
    return (*lead, out, cols // FP4_BLOCK)


def _block_scales(scale: np.ndarray, rows: int, cols: int, block_rows: int, block_cols: int, xp=np) -> np.ndarray:
    """One scale per block [..., R, C] -> one per element [..., rows, cols], fp32."""
    s = xp.asarray(scale).astype(xp.float32)
    return xp.repeat(xp.repeat(s, block_rows, axis=-2), block_cols, axis=-1)[..., :rows, :cols]


def scale_blocks(values: np.ndarray, scale: np.ndarray, block: tuple[int, int], xp=np) -> np.ndarray:
    """values fp32 [..., out, in] times their block's scale, scale [..., ceil(out/br), ceil(in/bc)] for
    ``block`` (br, bc) -> fp32 [..., out, in]."""
    out, cols = values.shape[-2:]
    return values * _block_scales(scale, out, cols, *block, xp=xp)


def dequantise_fp8(weight: np.ndarray, scale: np.ndarray, xp=np) -> np.ndarray:
    """weight e4m3 [..., out, in], scale [..., ceil(out/128), ceil(in/128)] (ue8m0 or fp32) -> fp32 [..., out, in]."""
    return scale_blocks(weight.astype(xp.float32), scale, FP8_BLOCK_SHAPE, xp)


def unpack_fp4(packed: np.ndarray, xp=np) -> np.ndarray:
    """int8 [..., out, in/2] -> e2m1 codes uint8 [..., out, in]; the low nibble is the even column."""
    b = xp.asarray(packed).view(xp.uint8)
    return xp.stack([b & 0x0F, b >> 4], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])


def e2m1_values(packed: np.ndarray, xp=np) -> np.ndarray:
    """int8 [..., out, in/2] -> the e2m1 values fp32 [..., out, in], before scaling."""
    return xp.asarray(E2M1_LUT)[unpack_fp4(packed, xp)]


def pack_fp4(codes: np.ndarray) -> np.ndarray:
    """e2m1 codes [..., out, in] (in even) -> int8 [..., out, in/2]."""
    c = codes.astype(np.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(np.int8)


def dequantise_fp4(packed: np.ndarray, scale: np.ndarray, xp=np) -> np.ndarray:
    """packed int8 [..., out, in/2], scale ue8m0 [..., out, in/32] -> fp32 [..., out, in]."""
    return scale_blocks(e2m1_values(packed, xp), scale, FP4_BLOCK_SHAPE, xp)


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
    q = w / _block_scales(scale, out, cols, FP8_BLOCK, FP8_BLOCK)  # exact: division by a power of two
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
    a = np.abs(w) / _block_scales(scale, out, cols, 1, FP4_BLOCK)
    codes = _nearest_e2m1_codes(a) | (np.signbit(w).astype(np.uint8) << 3)
    return pack_fp4(codes), scale
