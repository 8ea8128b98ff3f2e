"""What every kernel module shares: the Triton-backend ``pallas_call`` with optional output poisoning, the SM
count the launch heuristics aim at, and the expert kernels' checks and FP4 weight format.

FP4 experts (the released checkpoints' routed experts): w int8 [G, N, K/2], two e2m1 codes a byte (low nibble
= even column k, high nibble = odd column), codes 0-7 the magnitudes ``E2M1``, 8-15 the same negated (bit 3 is
the sign); w_scales [G, N, K/32], one scale per 1 x 32 block, ue8m0 (``jnp.float8_e8m0fnu``, 2^(byte - 127))
or fp32. W = e2m1 value * scale, exact in bf16 for power-of-two scales.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


NUM_SMS = 132  # H100 SXM and H200
FP4_BLOCK = 32  # weight columns one FP4 scale covers
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the magnitudes of e2m1 codes 0-7
FP4_SCALE_DTYPES = (jnp.dtype(jnp.float8_e8m0fnu), jnp.dtype(jnp.float32))


def triton_call(kernel, args, *, grid, in_specs, out_shape: list, out_specs: list, num_warps: int, num_stages: int,
                interpret: bool, name: str, poison: bool = False, aliases: dict[int, int] | None = None) -> list:
    """``pl.pallas_call`` on the Triton backend; returns the list of outputs.

    ``aliases`` {input index: output index}: that output is the input's buffer (in place when the input is
    donated), so the elements the kernel does not write keep the input's values.
    ``poison`` (a testing aid): the other outputs are NaN-filled (integers: INT_MIN-filled) buffers aliased as
    extra inputs, so any element the kernel fails to write keeps that value. The kernel still sees only
    its inputs and outputs.
    """
    aliases = dict(aliases or {})
    if poison:
        n_in, n_out = len(args), len(out_shape)
        poisoned = [i for i in range(n_out) if i not in aliases.values()]
        aliases.update({n_in + j: i for j, i in enumerate(poisoned)})
        args = [*args, *(poison_like(out_shape[i].shape, out_shape[i].dtype) for i in poisoned)]
        in_specs = [*in_specs, *(out_specs[i] for i in poisoned)]
        inner = kernel

        def kernel(*refs):  # drop the poison input refs; those outputs are the same buffers
            return inner(*refs[:n_in], *refs[n_in + len(poisoned):])

    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(*args)


def expert_blocks(kernel: str, x, w, block_n: int, block_k: int, w_scales=None) -> tuple[int, int]:
    """Checks of the expert matmul kernels: x [M, K] and w [G, N, K] of one dtype, or with ``w_scales`` FP4
    weights (module docstring; x bf16); block_n / block_k (powers of two >= 16, block_k >= 64 for FP4: whole
    bytes and scale blocks) clipped to N / K, then dividing them. Returns the clipped (block_n, block_k)."""
    if w_scales is not None:
        check_fp4(kernel, x, w, w_scales)
    elif w.shape[2] != x.shape[1] or x.dtype != w.dtype:
        raise ValueError(f"{kernel}: x {x.shape} {x.dtype}, w {w.shape} {w.dtype}: expected x [M, K], w [G, N, K] "
                         f"of one dtype")
    K, N = x.shape[1], w.shape[1]
    smallest = 16 if w_scales is None else 2 * FP4_BLOCK
    block_n, block_k = min(block_n, N), min(block_k, K)
    for name, v, lo in (("block_n", block_n, 16), ("block_k", block_k, smallest)):
        if v < lo or v & (v - 1):
            raise ValueError(f"{kernel}: {name}={v} must be a power of two >= {lo}")
    if K % block_k or N % block_n:
        raise ValueError(f"{kernel}: K={K} and N={N} must be multiples of block_k={block_k} and block_n={block_n}")
    return block_n, block_k


def check_fp4_ptx(kernel: str, ptx: bool, interpret: bool) -> None:
    """One-line error for FP4 weights under ``fp4_ptx`` in interpret mode, which cannot run PTX."""
    if ptx and interpret:
        raise ValueError(f"{kernel}: fp4_ptx=True (inline PTX) needs a GPU; interpret mode runs fp4_ptx=False")


def check_fp4(kernel: str, x, w, w_scales) -> None:
    """One-line error unless x is bf16 [M, K], w int8 [G, N, K/2] and w_scales [G, N, K/32] ue8m0 or fp32."""
    ok = x.ndim == 2 and w.ndim == 3 and x.dtype == jnp.bfloat16 and w.dtype == jnp.int8
    if ok:
        K = x.shape[1]
        G, N, half = w.shape
        ok = (K % FP4_BLOCK == 0 and 2 * half == K and w_scales.shape == (G, N, K // FP4_BLOCK)
              and w_scales.dtype in FP4_SCALE_DTYPES)
    if not ok:
        raise ValueError(f"{kernel}: x {x.shape} {x.dtype}, w {w.shape} {w.dtype}, w_scales {w_scales.shape} "
                         f"{w_scales.dtype}: expected x [M, K] bfloat16 (K a multiple of {FP4_BLOCK}), w [G, N, K/2] "
                         f"int8 and w_scales [G, N, K/{FP4_BLOCK}] float8_e8m0fnu or float32")


def dequantize_fp4(w: jax.Array, w_scales: jax.Array, dtype) -> jax.Array:
    """The references' FP4 weights: w int8 [..., N, K/2], w_scales [..., N, K/32] -> [..., N, K] in ``dtype``,
    each code's value from a table times its block's scale in fp32."""
    b = lax.bitcast_convert_type(w, jnp.uint8)
    codes = jnp.stack([b & 15, b >> 4], axis=-1).reshape(*w.shape[:-1], 2 * w.shape[-1])
    values = jnp.asarray(E2M1 + tuple(-v for v in E2M1), jnp.float32)[codes]
    return (values * jnp.repeat(w_scales.astype(jnp.float32), FP4_BLOCK, axis=-1)).astype(dtype)


def e8m0_operand(w_scales: jax.Array) -> jax.Array:
    """w_scales as a kernel reads them: ue8m0 as its exponent bytes (uint8, a bitcast: Triton has no e8m0 type),
    fp32 as is."""
    return lax.bitcast_convert_type(w_scales, jnp.uint8) if w_scales.dtype == jnp.float8_e8m0fnu else w_scales


def e8m0_values(scales: jax.Array) -> jax.Array:
    """In a kernel: ``e8m0_operand``'s scales -> fp32: an exponent byte b is 2^(b - 127), fp32 as is."""
    if scales.dtype == jnp.uint8:
        return lax.bitcast_convert_type(scales.astype(jnp.int32) << 23, jnp.float32)
    return scales


FP16_CODE_SCALE = 2.0 ** 14  # fp4_decode's fp16 bits hold the e2m1 value times 2^-14; the scale makes up for it


def fp4_decode(packed: jax.Array, scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    """In a kernel: packed int8 [..., n] -> (low, high) bf16 [..., n], each byte's even- and odd-column weight
    times ``scales`` (fp32, broadcastable to [..., n]: each byte's block scale).

    Bit arithmetic, no table: a code's magnitude bits (e1 e0 m) become an fp16's two low exponent bits and top
    mantissa bit, its sign bit the sign, which is the e2m1 value times 2^-14, codes 1 and 9 (+-0.5) included as
    fp16 subnormals (exact in the conversion to fp32); the fp32 product with 2^14 * scale is exact, so its
    rounding to bf16 is too. Exponent bytes 2 .. 240 (2^-125 .. 2^113; the release's scales lie far inside)."""
    scales = scales * FP16_CODE_SCALE
    b = packed.astype(jnp.int32)

    def decode(fp16_bits):
        codes = lax.bitcast_convert_type(fp16_bits.astype(jnp.uint16), jnp.float16)  # < 2^16: in range
        return (codes.astype(jnp.float32) * scales).astype(jnp.bfloat16)

    return (decode(((b << 9) & 0x0E00) | ((b << 12) & 0x8000)),  # bits 0-2 to 9-11, bit 3 to 15
            decode(((b << 5) & 0x0E00) | ((b << 8) & 0x8000)))   # bits 4-6 to 9-11, bit 7 to 15


# fp4_decode's arithmetic on 4 bytes at once, two weights per 32-bit operation: bytes (0, 1) and (2, 3) spread to
# the halves of a word (prmt), each half's nibble made fp16 bits by two shifts, a mask and a lop3
# ((a & 0x0E000E00) | b), the fp16 pairs widened to fp32, times the bytes' scales.
# $0-$3: the 4 weights in fp32; $4: the 4 bytes; $5-$8: their scales. SHIFTS: the low nibble's (bits 0-2 to 9-11,
# bit 3 to 15) or the high one's (bits 4-6 to 9-11, bit 7 to 15).
# fp32 results, not bf16x2 words: the Triton in jaxlib lowers fp4_tile's stack (tt.join) of two bf16 inline-asm
# results two elements at a time, so each bf16x2 register of one asm reached the dot as a (k, k + 2) pair, not
# (k, k + 1) (tests/test_fp4_ptx_lowering.py). Converted to bf16 outside the asm, each pair is one fptrunc of
# the low and the high nibble's weight, still one cvt.rn.bf16x2 a pair.
_FP4_PTX = """{{
.reg .b32 t0, t1, a, b, w0, w1;
.reg .b16 h<4>;
.reg .f32 f<4>;
prmt.b32 t0, $4, 0, 0x4140; prmt.b32 t1, $4, 0, 0x4342;
shl.b32 a, t0, {0}; shl.b32 b, t0, {1}; and.b32 b, b, 0x80008000; lop3.b32 w0, a, b, 0x0E000E00, 0xEC;
shl.b32 a, t1, {0}; shl.b32 b, t1, {1}; and.b32 b, b, 0x80008000; lop3.b32 w1, a, b, 0x0E000E00, 0xEC;
mov.b32 {{h0, h1}}, w0; mov.b32 {{h2, h3}}, w1;
cvt.f32.f16 f0, h0; cvt.f32.f16 f1, h1; cvt.f32.f16 f2, h2; cvt.f32.f16 f3, h3;
mul.f32 $0, f0, $5; mul.f32 $1, f1, $6; mul.f32 $2, f2, $7; mul.f32 $3, f3, $8;
}}"""


def fp4_decode_ptx(packed: jax.Array, scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``fp4_decode`` (the same values, bit for bit) in inline PTX, two weights per 32-bit operation; a GPU
    only (interpret mode cannot run PTX). ``scales`` fp32 of ``packed``'s shape."""
    scales = scales * FP16_CODE_SCALE
    out = jax.ShapeDtypeStruct(packed.shape, jnp.float32)
    return tuple(plt.elementwise_inline_asm(_FP4_PTX.format(*shifts), args=[packed, scales], pack=4,
                                            constraints="=f,=f,=f,=f,r,f,f,f,f",
                                            result_shape_dtypes=[out])[0].astype(jnp.bfloat16)
                 for shifts in ((9, 12), (5, 8)))


def fp4_tile(packed: jax.Array, scales: jax.Array, ptx: bool = False) -> jax.Array:
    """In a Triton kernel: packed int8 [bn, bk/2], scales [bn, bk/32] (``e8m0_operand``'s) -> the weight
    tile bf16 [bn, bk] (``fp4_decode``, or ``fp4_decode_ptx`` with ``ptx``; the two halves interleaved: the low
    nibble is the even column)."""
    bn, half = packed.shape
    # each scale over its block's 16 bytes
    scales = jnp.broadcast_to(e8m0_values(scales)[:, :, None], (bn, half // 16, 16)).reshape(bn, half)
    return jnp.stack((fp4_decode_ptx if ptx else fp4_decode)(packed, scales), axis=-1).reshape(bn, 2 * half)


def expert_tile(w_ref, s_ref, g, i, block_k: int, ptx: bool = False):
    """In a Triton kernel: K step i's weight tile of matrix g, [bn, block_k] in x's dtype; w_ref [G, bn, K] as
    is, or with s_ref FP4 w_ref [G, bn, K/2] and s_ref [G, bn, K/32] dequantised in registers (``fp4_tile``;
    ``ptx``: its inline-PTX decode)."""
    if s_ref is None:
        return w_ref[g, :, pl.ds(pl.multiple_of(i * block_k, block_k), block_k)]
    half, n_scales = block_k // 2, block_k // FP4_BLOCK
    return fp4_tile(w_ref[g, :, pl.ds(pl.multiple_of(i * half, half), half)],
                    s_ref[g, :, pl.ds(pl.multiple_of(i * n_scales, n_scales), n_scales)], ptx)


def check_tuning(config, *, blocks: tuple[str, ...] = (), flags: tuple[str, ...] = ()) -> None:
    """A TuningConfig's checks: the fields named in ``flags`` bools, every other field a positive int, the
    fields named in ``blocks`` powers of two >= 16 (clipped to the matrix later, so the clipped block stays
    one)."""
    kind = type(config).__module__.rsplit(".", 1)[-1]
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if f.name in flags:
            if not isinstance(v, bool):
                raise ValueError(f"{kind} TuningConfig: {f.name}={v!r}: expected a bool")
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{kind} TuningConfig: {f.name}={v!r}: expected a positive int")
        if f.name in blocks and (v < 16 or v & (v - 1)):
            raise ValueError(f"{kind} TuningConfig: {f.name}={v} must be a power of two >= 16")


def poison_like(shape, dtype):
    """NaN-filled buffer (integers: the dtype's minimum), so unwritten elements fail comparisons."""
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.full(shape, jnp.nan, dtype)
    return jnp.full(shape, jnp.iinfo(dtype).min, dtype)
