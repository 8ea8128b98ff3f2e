"""DeepSeek's released weight formats (spec §11.1): dequantisers in numpy that also run in jax.numpy
(``xp=jnp``, for quant_array.QuantArray), and quantisers in jax (any device: random released-format weights
at device speed, weights/random_init.py; tests/released_format.py is their independent numpy reference).

* FP8 linears: e4m3 weight [..., out, in] with one ue8m0 scale (a power of two, 2^(byte - 127)) per
  128 x 128 block, scale [..., ceil(out/128), ceil(in/128)]; W = Wq * scale (multiply, even where
  transformers calls the scale ``weight_scale_inv``).
* FP4 routed experts: e2m1 codes packed two per int8 byte, weight [..., out, in/2] (low nibble = even
  column, high nibble = odd column), one ue8m0 scale per 1 x 32 block, scale [..., out, in/32].

Leading ``...`` axes (transformers' stacked experts) are batch axes. Dequantised values are fp32 and
exact: a 3- or 1-bit mantissa times a power of two is representable in fp32 and in bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


def fp8_scale_shape(weight_shape) -> tuple[int, ...]:
    """[..., out, in] -> [..., ceil(out/128), ceil(in/128)]."""
    *lead, out, cols = weight_shape
    return (*lead, -(-out // FP8_BLOCK), -(-cols // FP8_BLOCK))


def fp4_scale_shape(weight_shape) -> tuple[int, ...]:
    """Logical (unpacked) [..., out, in] -> [..., out, in/32]; ``in`` must be a multiple of 32."""
    *lead, out, cols = weight_shape
    return (*lead, out, cols // FP4_BLOCK)


def block_scales(scale: np.ndarray, rows: int, cols: int, block_rows: int, block_cols: int, xp=np) -> np.ndarray:
    """One scale per block [..., R, C] -> one per element [..., rows, cols], fp32."""
    s = xp.asarray(scale).astype(xp.float32)
    return xp.repeat(xp.repeat(s, block_rows, axis=-2), block_cols, axis=-1)[..., :rows, :cols]


def scale_blocks(values: np.ndarray, scale: np.ndarray, block: tuple[int, int], xp=np) -> np.ndarray:
    """values fp32 [..., out, in] times their block's scale, scale [..., ceil(out/br), ceil(in/bc)] for
    ``block`` (br, bc) -> fp32 [..., out, in]."""
    out, cols = values.shape[-2:]
    return values * block_scales(scale, out, cols, *block, xp=xp)


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


def dequantise_fp4(packed: np.ndarray, scale: np.ndarray, xp=np) -> np.ndarray:
    """packed int8 [..., out, in/2], scale ue8m0 [..., out, in/32] -> fp32 [..., out, in]."""
    return scale_blocks(e2m1_values(packed, xp), scale, FP4_BLOCK_SHAPE, xp)


# ----- quantisers, in jax (any device; tests/released_format.py is an independent numpy reference) -----
def _ue8m0(exponents: jax.Array) -> jax.Array:
    """Power-of-two exponents in [-127, 127] -> ue8m0 scales (byte = exponent + 127)."""
    return jax.lax.bitcast_convert_type((exponents + 127).astype(jnp.uint8), jnp.float8_e8m0fnu)


def scale_exponents(amax: jax.Array, max_code: float) -> jax.Array:
    """The smallest k in [-127, 127] with
    amax <= max_code * 2^k per block (0 for an empty block); the fp32 ``log2`` only guesses k, two exact
    comparisons fix it."""
    top = jnp.float32(max_code)
    k = jnp.ceil(jnp.log2(jnp.where(amax > 0, amax, top) / top)).astype(jnp.int32)
    k = jnp.where(amax > jnp.ldexp(top, k), k + 1, k)
    k = jnp.where(amax <= jnp.ldexp(top, k - 1), k - 1, k)
    return jnp.clip(jnp.where(amax > 0, k, 0), -127, 127)


def quantise_fp8_blocks(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w fp32 [out, in] -> (e4m3 [out, in], ue8m0 scales [ceil(out/128), ceil(in/128)]).

    Each 128 x 128 block gets the smallest power-of-two scale whose range (448 * scale) holds the block's
    largest magnitude; w / scale is then rounded to nearest (ties to even) onto e4m3. Subnormal fp32 input may
    flush to zero on the device (the numpy reference keeps it)."""
    out, cols = w.shape
    rb, cb = fp8_scale_shape(w.shape)
    b = FP8_BLOCK
    amax = jnp.pad(jnp.abs(w), ((0, rb * b - out), (0, cb * b - cols))).reshape(rb, b, cb, b).max(axis=(1, 3))
    k = scale_exponents(amax, E4M3_MAX)
    # w / 2^k as w * 2^-k: the same value, both exact
    q = scale_blocks(w, jnp.ldexp(jnp.float32(1), -k), FP8_BLOCK_SHAPE, jnp)
    return q.astype(jnp.float8_e4m3fn), _ue8m0(k)


def quantise_fp4(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w fp32 [out, in] (in a multiple of 32) -> (packed int8 [out, in/2], ue8m0 scales [out, in/32]).

    Each 1 x 32 block gets the smallest power-of-two scale whose range (6 * scale) holds its largest
    magnitude; |w| / scale is rounded to the nearest e2m1 value (ties to the even code) and the sign kept."""
    out, cols = w.shape
    if cols % FP4_BLOCK:
        raise ValueError(f"FP4 needs the input width to be a multiple of {FP4_BLOCK}, got shape {w.shape}")
    amax = jnp.abs(w).reshape(out, cols // FP4_BLOCK, FP4_BLOCK).max(axis=-1)
    k = scale_exponents(amax, E2M1_MAX)
    a = scale_blocks(jnp.abs(w), jnp.ldexp(jnp.float32(1), -k), FP4_BLOCK_SHAPE, jnp)
    # Nearest e2m1 magnitude code: one step up per midpoint passed; a tie goes to the even code (IEEE style).
    grid = E2M1_GRID
    codes = sum(((a >= m) if (i + 1) % 2 == 0 else (a > m)).astype(jnp.uint8)
                for i, m in enumerate((grid[:-1] + grid[1:]) / 2))
    codes = codes | (jnp.signbit(w).astype(jnp.uint8) << 3)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return jax.lax.bitcast_convert_type(packed, jnp.int8), _ue8m0(k)
