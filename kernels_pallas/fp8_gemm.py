"""A linear layer with FP8 activations and FP8 weights (W8A8), DeepSeek's official inference numerics, for prefill.

    quantize_activations(x [M, G*K], groups=G) -> (x_q [M, G*K] float8_e4m3fn, x_scales [M, G*ceil(K/128)] fp32)
    fp8_gemm(x_q, x_scales, w_q [N, K] float8_e4m3fn, w_scale [ceil(N/128), ceil(K/128)] fp32,
             out_dtype=bf16, groups=G) -> y [M, N] in out_dtype (fp32 accumulate)
    quantized_linear(x, w_q, w_scale, ...) = fp8_gemm(*quantize_activations(x, groups), w_q, w_scale, ...)

Numerics: deepseek-ai/DeepSeek-V3.2-Exp inference/kernel.py at 3b99a53 (``act_quant``, ``fp8_gemm``; V3's alike).
``quantize_activations`` is ``act_quant`` at block size 128 and scale_fmt "ue8m0" (the V4 checkpoints'
quantization_config): per 1 x 128 block of a row, amax = max(max |x|, 1e-4) in fp32, the scale amax / 448 rounded
up to a power of two (from its fp32 bits, as V3.2's ``fast_round_scale``: the exponent, plus one unless the
mantissa is zero), x / scale clipped to +-448 and cast to e4m3 (round to nearest even). With ``groups`` G > 1
each group's K columns are blocked on their own. ``fp8_gemm`` (``reference``): for each 128-wide K block, the
e4m3 x e4m3 dot accumulated in fp32, times the row's activation scale and the weight block's scale (powers of
two: exact), added to an fp32 accumulator block after block; the weights' scales as in
kernels_pallas/fp8_linear.py (one per 128 x 128 block, ue8m0 decoded to fp32 by the caller), the ``groups``
form too (the attention output projection ``o_a``: output columns [g*N/G, (g+1)*N/G) read input columns
[g*K, (g+1)*K)).

Why: a prefill chunk's linears are matmuls (2048+ rows), bound by the tensor cores, not by the weight bytes that
bound fp8_linear's decode. Hopper's FP8 tensor cores run at twice the bf16 rate; the weight-only kernel and the
dequantise-then-dot path both multiply in bf16. The price is the activations' e4m3 rounding, which the official
inference pays too.

Backend: the Pallas **Triton** backend. ``quantize_activations`` is plain JAX (one fused XLA elementwise +
reduction pass over x, inside the caller's jit). On sm_90 the dot is FP8 ``wgmma`` on e4m3 tiles: Triton picks it
only for a dot marked to accumulate imprecisely, which Triton's own frontend does for FP8 dots and Pallas'
lowering does not, so this module marks them (``_marks_fp8_dots``; tests/test_kernel_fp8_gemm.py pins the
instruction in the cubin).

Design:
* Grid ``(cdiv(N, block_n), cdiv(M, block_m))``. A program owns a ``[block_m, block_n]`` output tile
  (block_n <= 128: one weight scale row) and walks the K blocks: e4m3 tiles x ``[block_m, 128]`` and
  w ``[block_n, 128]`` into one ``dot`` with fp32 accumulation (DeepSeek's promotion of each 128-deep
  partial product out of the tensor cores' accumulator), the partial product times the ``[block_m]``
  activation scales times the weight block's scale, added to the fp32 accumulator; Triton
  software-pipelines ``num_stages`` tile loads. One cast and store at the end.
* M, N and K need not be multiples of the blocks: rows past M, weight rows past N and columns past K are
  masked loads of 0 (a padded row's scale loads as 0 too) and masked stores; each mask is static, absent where
  the block divides the matrix (every FP8 linear of the released models has N and K multiples of 128).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.pallas.triton import lowering as triton_lowering
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .common import check_tuning, triton_call
from .fp8_linear import BLOCK, OUT_DTYPES

__all__ = ["quantize_activations", "fp8_gemm", "quantized_linear", "reference", "TuningConfig", "BLOCK"]

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
AMAX_FLOOR = 1e-4  # act_quant's clamp of a block's amax (an all-zero block gets a finite scale)


# Triton's own frontend marks an FP8 x FP8 dot on sm_90 with maxNumImpreciseAcc = 2^30 (the tensor cores'
# accumulator kept across the dot's K); Pallas' lowering (jax 0.11.2) leaves it at 0, and Triton then converts
# the e4m3 tiles to f16 for mma.sync. Each of this kernel's dots spans one 128-wide K block whose partial sum is
# scaled and added in fp32 outside the dot, DeepSeek's promotion, so the mark costs no accuracy beyond theirs.
IMPRECISE_ACC = 2**30


def _marks_fp8_dots(rule):
    """Pallas' Triton lowering of dot_general, then every e4m3 x e4m3 ``tt.dot`` of the block marked as Triton's
    frontend marks it."""
    def lower(ctx, *args, **params):
        out = rule(ctx, *args, **params)
        e4m3 = ir.Float8E4M3FNType.get()
        for op in ir.InsertionPoint.current.block.operations:
            op = op.operation
            if op.name == "tt.dot" and all(ir.RankedTensorType(v.type).element_type == e4m3
                                           for v in list(op.operands)[:2]):
                op.attributes["maxNumImpreciseAcc"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32),
                                                                         IMPRECISE_ACC)
        return out

    lower.marks_fp8_dots = True
    return lower


if not getattr(triton_lowering.triton_lowering_rules[lax.dot_general_p], "marks_fp8_dots", False):
    triton_lowering.triton_lowering_rules[lax.dot_general_p] = _marks_fp8_dots(
        triton_lowering.triton_lowering_rules[lax.dot_general_p])


def ceil_power_of_two(s: jax.Array) -> jax.Array:
    """Positive normal fp32 s -> the smallest power of two >= s, from the bits (no log2 rounding): the exponent,
    plus one unless the mantissa is zero."""
    bits = lax.bitcast_convert_type(s, jnp.int32)
    exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).astype(jnp.int32)
    return lax.bitcast_convert_type(exponent << 23, jnp.float32)


@functools.partial(jax.jit, static_argnames=("groups",))
def quantize_activations(x: jax.Array, groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """x [M, G*K] (any float dtype) -> (x_q [M, G*K] e4m3, x_scales [M, G*ceil(K/128)] fp32): each 1 x 128
    block of a group's K columns (the last one ragged when 128 does not divide K) over its power-of-two scale
    (module docstring). x ~ x_q * its block's scale."""
    M, GK = x.shape
    if groups < 1 or GK % groups:
        raise ValueError(f"quantize_activations: x {x.shape}, groups={groups}: expected x [M, groups*K]")
    K = GK // groups
    blocks = pl.cdiv(K, BLOCK)
    xf = jnp.pad(x.astype(jnp.float32).reshape(M, groups, K), ((0, 0), (0, 0), (0, blocks * BLOCK - K)))
    xf = xf.reshape(M, groups, blocks, BLOCK)  # zero padding leaves each block's amax as it is
    amax = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1), AMAX_FLOOR)
    scales = ceil_power_of_two(amax / E4M3_MAX)
    x_q = jnp.clip(xf / scales[..., None], -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
    return x_q.reshape(M, groups, blocks * BLOCK)[:, :, :K].reshape(M, GK), scales.reshape(M, groups * blocks)


@functools.partial(jax.jit, static_argnames=("out_dtype", "groups"))
def reference(x_q, x_scales, w_q, w_scale, *, out_dtype=jnp.bfloat16, groups: int = 1):
    """x_q [M, G*K] e4m3, x_scales [M, G*ceil(K/128)], w_q [N, K] e4m3, w_scale [ceil(N/128), ceil(K/128)] ->
    [M, N] in out_dtype: per K block, XLA's e4m3 dot with fp32 accumulation (HIGHEST: no reduced-precision
    accumulation on a GPU) times both scales, added to the fp32 sum in block order."""
    M = x_q.shape[0]
    N, K = w_q.shape
    n = N // groups
    x = x_q.reshape(M, groups, K)
    w = w_q.reshape(groups, n, K)
    x_s = x_scales.reshape(M, groups, -1)
    w_s = jnp.repeat(w_scale, BLOCK, axis=0)[:N].reshape(groups, n, -1)  # each weight row's scale per K block
    acc = jnp.zeros((M, groups, n), jnp.float32)
    for k in range(pl.cdiv(K, BLOCK)):
        cols = slice(k * BLOCK, (k + 1) * BLOCK)
        part = jnp.einsum("mgk,gnk->mgn", x[:, :, cols], w[:, :, cols], preferred_element_type=jnp.float32,
                          precision=lax.Precision.HIGHEST)
        acc = acc + part * (x_s[:, :, k, None] * w_s[None, :, :, k])
    return acc.reshape(M, N).astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """The launch choices of ``fp8_gemm``: block_m rows and block_n weight rows per program (powers of two
    >= 16, Triton's smallest tensor-core tile; block_n <= 128, one weight scale row; both clipped to the
    matrix, block_n also to the largest power of two dividing a group's outputs), Triton's warps and
    software-pipelining stages."""
    block_m: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        check_tuning(self, blocks=("block_m", "block_n"))
        if self.block_n > BLOCK:
            raise ValueError(f"fp8_gemm TuningConfig: block_n={self.block_n}: expected at most {BLOCK} (one "
                             f"weight scale row per program)")


def _kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, *, block_m: int, block_n: int, n_per_group: int):
    """x_ref [M, G*K] e4m3; xs_ref [M, G*kb] fp32; w_ref [N, K] e4m3; ws_ref [cdiv(N,128), kb] fp32;
    o_ref [M, N] (kb = cdiv(K, 128)).

    Program (n, r): output rows r*bm .. r*bm + bm - 1 and columns n*bn .. n*bn + bn - 1 (one group's, one
    weight scale row's) over every K block."""
    n, r = pl.program_id(0), pl.program_id(1)
    M = x_ref.shape[0]
    N, K = w_ref.shape
    k_blocks = pl.cdiv(K, BLOCK)
    n0, m0 = n * block_n, r * block_m
    group = n0 // n_per_group
    x0, s0 = group * K, group * k_blocks  # the group's first input column and activation scale column
    s_row = n0 // BLOCK
    rows = m0 + jnp.arange(block_m, dtype=jnp.int32)
    rows_ok = rows < M if M % block_m else None  # static: None where block_m divides M
    outs_ok = n0 + jnp.arange(block_n, dtype=jnp.int32) < N if N % block_n else None
    k_lane = jnp.arange(BLOCK, dtype=jnp.int32)

    def both(a, b):  # the conjunction of two optional masks
        return b if a is None else a if b is None else a & b

    def load(ref, mask, other):  # Triton takes ``other`` only with a mask
        return ref[...] if mask is None else plt.load(ref, mask=mask, other=other)

    def step(kb, acc):
        k0 = pl.multiple_of(kb * BLOCK, BLOCK)
        k_ok = (k0 + k_lane < K)[None, :] if K % BLOCK else None
        x_ok = both(None if rows_ok is None else rows_ok[:, None], k_ok)
        w_ok = both(None if outs_ok is None else outs_ok[:, None], k_ok)
        xq = load(x_ref.at[pl.ds(m0, block_m), pl.ds(x0 + k0, BLOCK)], x_ok, 0.0)
        wq = load(w_ref.at[pl.ds(n0, block_n), pl.ds(k0, BLOCK)], w_ok, 0.0)
        x_scale = load(xs_ref.at[pl.ds(m0, block_m), s0 + kb], rows_ok, 0.0)
        part = lax.dot_general(xq, wq, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return acc + part * (x_scale * ws_ref[s_row, kb])[:, None]

    acc = lax.fori_loop(0, k_blocks, step, jnp.zeros((block_m, block_n), jnp.float32))
    plt.store(o_ref.at[pl.ds(m0, block_m), pl.ds(n0, block_n)], acc.astype(o_ref.dtype),
              mask=both(None if rows_ok is None else rows_ok[:, None], None if outs_ok is None else outs_ok[None, :]))


def _check_inputs(x_q, x_scales, w_q, w_scale, out_dtype, groups: int) -> None:
    """One-line errors for inputs outside the contract."""
    if x_q.ndim != 2 or w_q.ndim != 2 or x_q.shape[1] != groups * w_q.shape[1] or 0 in (*x_q.shape, *w_q.shape):
        raise ValueError(f"fp8_gemm: x_q {x_q.shape}, w_q {w_q.shape}, groups={groups}: expected x_q [M, groups*K] "
                         f"and w_q [N, K], none empty")
    dtypes = (x_q.dtype, x_scales.dtype, w_q.dtype, w_scale.dtype)
    if dtypes != (jnp.float8_e4m3fn, jnp.float32, jnp.float8_e4m3fn, jnp.float32):
        raise ValueError(f"fp8_gemm: x_q {x_q.dtype}, x_scales {x_scales.dtype}, w_q {w_q.dtype}, w_scale "
                         f"{w_scale.dtype}: expected float8_e4m3fn, float32, float8_e4m3fn and float32")
    M = x_q.shape[0]
    N, K = w_q.shape
    for name, got, want in (("x_scales", x_scales.shape, (M, groups * pl.cdiv(K, BLOCK))),
                            ("w_scale", w_scale.shape, (pl.cdiv(N, BLOCK), pl.cdiv(K, BLOCK)))):
        if got != want:
            raise ValueError(f"fp8_gemm: {name} {got} for x_q {x_q.shape}, w_q {w_q.shape}, groups={groups}: "
                             f"expected {want}")
    if jnp.dtype(out_dtype) not in OUT_DTYPES:
        raise ValueError(f"fp8_gemm: out_dtype {jnp.dtype(out_dtype)}: expected bfloat16 or float32")
    if groups < 1 or N % groups or (groups > 1 and (N // groups) % 16):
        raise ValueError(f"fp8_gemm: groups={groups} for N={N}: expected a divisor of N leaving a multiple of 16 "
                         f"outputs per group")


@functools.partial(jax.jit, static_argnames=("out_dtype", "groups", "tuning", "interpret", "poison_outputs"))
def fp8_gemm(x_q: jax.Array, x_scales: jax.Array, w_q: jax.Array, w_scale: jax.Array, *, out_dtype=jnp.bfloat16,
             groups: int = 1, tuning: TuningConfig | None = None, interpret: bool = False,
             poison_outputs: bool = False) -> jax.Array:
    """x_q [M, groups*K] e4m3, x_scales [M, groups*cdiv(K,128)] fp32, w_q [N, K] e4m3, w_scale
    [cdiv(N,128), cdiv(K,128)] fp32 -> [M, N] in out_dtype (bfloat16 or float32). tuning: None for
    ``TuningConfig()``. poison_outputs: testing aid (outputs start as NaN, so an unwritten element fails)."""
    _check_inputs(x_q, x_scales, w_q, w_scale, out_dtype, groups)
    M = x_q.shape[0]
    N = w_q.shape[0]
    tuning = tuning or TuningConfig()
    n_per_group = N // groups
    block_m = min(tuning.block_m, max(16, pl.next_power_of_2(M)))
    # a program's columns lie in one group: with groups, block_n divides the group's outputs
    block_n = min(tuning.block_n, max(16, pl.next_power_of_2(N)) if groups == 1 else n_per_group & -n_per_group)
    return triton_call(
        functools.partial(_kernel, block_m=block_m, block_n=block_n, n_per_group=n_per_group),
        [x_q, x_scales, w_q, w_scale],
        grid=(pl.cdiv(N, block_n), pl.cdiv(M, block_m)),
        in_specs=[pl.BlockSpec(a.shape, lambda n, r: (0, 0)) for a in (x_q, x_scales, w_q, w_scale)],
        out_shape=[jax.ShapeDtypeStruct((M, N), out_dtype)],
        out_specs=[pl.BlockSpec((M, N), lambda n, r: (0, 0))],
        num_warps=tuning.num_warps, num_stages=tuning.num_stages, interpret=interpret,
        name=f"dsv4_fp8_gemm_m{block_m}_n{block_n}", poison=poison_outputs)[0]


@functools.partial(jax.jit, static_argnames=("out_dtype", "groups", "tuning", "interpret", "poison_outputs"))
def quantized_linear(x: jax.Array, w_q: jax.Array, w_scale: jax.Array, *, out_dtype=jnp.bfloat16, groups: int = 1,
                     tuning: TuningConfig | None = None, interpret: bool = False,
                     poison_outputs: bool = False) -> jax.Array:
    """x [M, groups*K] (any float dtype), w_q [N, K] e4m3, w_scale [cdiv(N,128), cdiv(K,128)] fp32 -> [M, N]:
    x quantised per 1 x 128 block (``quantize_activations``), then ``fp8_gemm``."""
    x_q, x_scales = quantize_activations(x, groups)
    return fp8_gemm(x_q, x_scales, w_q, w_scale, out_dtype=out_dtype, groups=groups, tuning=tuning,
                    interpret=interpret, poison_outputs=poison_outputs)
