"""``QuantArray``: a weight kept in a released block-scaled format (spec §11.1) instead of dequantised floats.

A registered pytree (codes and scales are its leaves, the block shape is static), so it can be a
parameter's value, cross ``jax.jit`` and be placed like any array tree; ``dequantize`` gives the floats
back, bit for bit what quantization.py's numpy dequantisers give at load.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from . import quantization


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantArray:
    """Codes plus one power-of-two scale per block of ``block`` = (rows, columns).

    FP8 (``fp8``): ``values`` e4m3 [..., out, in], block (128, 128). FP4 (``fp4``): ``values`` e2m1 codes
    packed two per int8 byte [..., out, in/2] (low nibble = even column), block (1, 32). ``scales``:
    [..., ceil(out/rows), ceil(in/columns)], ue8m0 (or fp32, as transformers writes them).
    """

    values: jax.Array
    scales: jax.Array
    block: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def fp8(cls, values, scales) -> QuantArray:
        """e4m3 values [..., out, in] with scales [..., ceil(out/128), ceil(in/128)]."""
        _check(values, ml_dtypes.float8_e4m3fn, "FP8 values")
        _check_scales(scales, quantization.fp8_scale_shape(values.shape), "FP8", values.shape)
        return cls(jnp.asarray(values), jnp.asarray(scales), quantization.FP8_BLOCK_SHAPE)

    @classmethod
    def fp4(cls, packed, scales) -> QuantArray:
        """e2m1 codes packed in int8 [..., out, in/2] with scales [..., out, in/32]."""
        _check(packed, np.int8, "packed FP4 values")
        *lead, out, half = packed.shape
        _check_scales(scales, quantization.fp4_scale_shape((*lead, out, 2 * half)), "FP4", packed.shape)
        return cls(jnp.asarray(packed), jnp.asarray(scales), quantization.FP4_BLOCK_SHAPE)

    @classmethod
    def abstract(cls, shape, block: tuple[int, int]) -> QuantArray:
        """ShapeDtypeStructs of a weight of logical ``shape`` [..., out, in] quantised in ``block``
        (quantization.FP8_BLOCK_SHAPE or FP4_BLOCK_SHAPE): no memory, for an abstract model."""
        *lead, out, cols = shape
        if tuple(block) == quantization.FP8_BLOCK_SHAPE:
            values = jax.ShapeDtypeStruct(tuple(shape), jnp.float8_e4m3fn)
            scales = quantization.fp8_scale_shape(shape)
        elif tuple(block) == quantization.FP4_BLOCK_SHAPE:
            values = jax.ShapeDtypeStruct((*lead, out, cols // 2), jnp.int8)
            scales = quantization.fp4_scale_shape(shape)
        else:
            raise ValueError(f"block {block} is neither FP8's {quantization.FP8_BLOCK_SHAPE} nor FP4's "
                             f"{quantization.FP4_BLOCK_SHAPE}")
        return cls(values, jax.ShapeDtypeStruct(scales, jnp.float8_e8m0fnu), tuple(block))

    @property
    def packed(self) -> bool:
        """Whether ``values`` holds two e2m1 codes per int8 byte (FP4)."""
        return self.values.dtype == jnp.int8

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape [..., out, in] (for FP4 twice the packed last axis)."""
        *lead, cols = self.values.shape
        return (*lead, 2 * cols) if self.packed else (*lead, cols)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """-> [..., out, in] in ``dtype``; exact in fp32 (a 3- or 1-bit mantissa times a power of two)."""
        codes = quantization.e2m1_values(self.values, jnp) if self.packed else self.values.astype(jnp.float32)
        return quantization.scale_blocks(codes, self.scales, self.block, jnp).astype(dtype)


def _check(values, dtype, what: str) -> None:
    if values.dtype != dtype or values.ndim < 2:
        raise ValueError(f"{what} must be {np.dtype(dtype).name} [..., out, in], got {values.dtype} "
                         f"{tuple(values.shape)}")


def _check_scales(scales, want: tuple[int, ...], fmt: str, values_shape) -> None:
    if tuple(scales.shape) != want:
        raise ValueError(f"{fmt} scales have shape {tuple(scales.shape)} but values {tuple(values_shape)} need {want}")
