"""How the cache stores K=V rows (the sliding-window ring and the compressed entries): as they are, in the model's
dtype (``kv_cache_dtype="auto"``), or in DeepSeek-V4's FP8 layout (``"fp8"``).

The FP8 layout is the record SGLang, vLLM and FlashMLA keep for these rows. A row of D channels, R of them RoPE:
  * ``nope`` [D - R] e4m3: the no-RoPE channels divided by their block's scale, rounded to nearest (ties to even);
  * ``rope`` [R] bf16: the RoPE channels, which carry the position, at 16 bits;
  * ``scale`` [ceil((D - R) / 64)] uint8: one ue8m0 scale per block of 64 no-RoPE channels (byte = exponent + 127),
    the smallest power of two whose e4m3 range (448 x scale) holds the block's largest magnitude.
Flash / Pro (D 512, R 64): 448 + 128 + 7 = 583 bytes a row against 1,024 in bf16 (the peers pad the scales to 8
bytes: 584). Blocks of 64 with power-of-two scales are what DeepSeek's own inference code applies to these very
channels (its fake quantisation of kv[:D-R], spec §5 and §6.3), so the model was trained to see this rounding.
The indexer's keys are not rows of this kind and stay in the model dtype.

``encode_rows`` is the one quantiser: the window ring's write (``sliding_window.window_keys``, which also keys the
chunk with the encoded rows) and the compressed entries' (``write_rows``) store what it returns. ``read_rows`` is
the dequantiser of the XLA path; the Pallas sparse-attention kernel dequantises its key tiles itself
(kernels_pallas/sparse_attention.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..weights.quantization import E4M3_MAX, scale_exponents
from .spec import axes_field

KV_CACHE_DTYPES = ("auto", "fp8")  # the model's dtype, or the FP8 layout (the peers' spelling: vLLM, SGLang)
FP8_BLOCK = 64  # no-RoPE channels per ue8m0 scale
MIN_EXPONENT = -126  # the smallest scale a byte decodes to as a normal fp32 number (byte 0 would be 2^-127)


def check_kv_cache_dtype(value, name: str = "kv_cache_dtype") -> str:
    """``value`` if it is one of KV_CACHE_DTYPES; else ValueError naming it (``name``: how the caller spells it)."""
    if value not in KV_CACHE_DTYPES:
        raise ValueError(f"{name} {value!r} must be one of {', '.join(KV_CACHE_DTYPES)}")
    return value


@dataclasses.dataclass(frozen=True)
class Fp8Rows:
    """Rows [..., D] in the FP8 layout (module docstring): nope e4m3 [..., D - R], rope bf16 [..., R], scale uint8
    [..., ceil((D - R) / 64)]. The subclasses declare the logical axes of each as a cache field."""

    nope: jax.Array
    rope: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the rows these hold, [..., D]."""
        return (*self.nope.shape[:-1], self.nope.shape[-1] + self.rope.shape[-1])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Window(Fp8Rows):
    """The sliding-window ring [B, W, D] in the FP8 layout."""

    nope: jax.Array = axes_field("batch", "window", "kv")
    rope: jax.Array = axes_field("batch", "window", "kv")
    scale: jax.Array = axes_field("batch", "window", "kv")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Entries(Fp8Rows):
    """The compressed entries [B, N, D] in the FP8 layout."""

    nope: jax.Array = axes_field("batch", "cache_seq", "kv")
    rope: jax.Array = axes_field("batch", "cache_seq", "kv")
    scale: jax.Array = axes_field("batch", "cache_seq", "kv")


def empty_rows(kind: type[Fp8Rows], shape: tuple[int, ...], rope_dim: int, dtype, kv_cache_dtype: str):
    """Zero rows of ``shape`` [B, L, D]: an array of ``dtype`` ("auto"), or ``kind`` (Fp8Window / Fp8Entries)."""
    if check_kv_cache_dtype(kv_cache_dtype) == "auto":
        return jnp.zeros(shape, dtype)
    *lead, d = shape
    nope = d - rope_dim
    return kind(nope=jnp.zeros((*lead, nope), jnp.float8_e4m3fn), rope=jnp.zeros((*lead, rope_dim), jnp.bfloat16),
                scale=jnp.zeros((*lead, -(-nope // FP8_BLOCK)), jnp.uint8))


def quantise(rows: jax.Array, rope_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """rows [..., D] -> (nope e4m3 [..., D - R], rope bf16 [..., R], scale uint8 [..., ceil((D - R) / 64)]).

    x / 2^k is exact (k the block's exponent), so e4m3's round to nearest (ties to even) is the one rounding of a
    no-RoPE value: relative error at most 2^-4, or 2^-10 x the scale for values in e4m3's subnormal range."""
    x = rows.astype(jnp.float32)
    nope, rope = x[..., : x.shape[-1] - rope_dim], x[..., x.shape[-1] - rope_dim:]
    dn = nope.shape[-1]
    nb = -(-dn // FP8_BLOCK)
    blocks = jnp.pad(nope, [(0, 0)] * (nope.ndim - 1) + [(0, nb * FP8_BLOCK - dn)]).reshape(
        *nope.shape[:-1], nb, FP8_BLOCK)
    k = jnp.maximum(scale_exponents(jnp.abs(blocks).max(axis=-1), E4M3_MAX), MIN_EXPONENT)
    q = (blocks * jnp.ldexp(jnp.float32(1), -k)[..., None]).reshape(*nope.shape[:-1], nb * FP8_BLOCK)[..., :dn]
    return q.astype(jnp.float8_e4m3fn), rope.astype(jnp.bfloat16), (k + 127).astype(jnp.uint8)


def scales(scale: jax.Array) -> jax.Array:
    """ue8m0 bytes -> the fp32 powers of two 2^(byte - 127) they stand for (the bits of that float: byte << 23)."""
    return jax.lax.bitcast_convert_type(scale.astype(jnp.int32) << 23, jnp.float32)


def dequantise(nope: jax.Array, rope: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """``quantise``'s parts -> rows [..., D] in ``dtype``. Exact in fp32 and bf16: a 3-bit mantissa times a power
    of two."""
    per_channel = jnp.repeat(scales(scale), FP8_BLOCK, axis=-1)[..., : nope.shape[-1]]
    return jnp.concatenate([nope.astype(jnp.float32) * per_channel, rope.astype(jnp.float32)], axis=-1).astype(dtype)


def encode_rows(store, rows: jax.Array):
    """rows [..., D] in the layout of ``store`` (an array or Fp8Rows): cast to its dtype, or quantised (the one
    place rows are quantised)."""
    if isinstance(store, Fp8Rows):
        return type(store)(*quantise(rows, store.rope.shape[-1]))
    return rows.astype(store.dtype)


def scatter_rows(store, index: tuple, encoded):
    """``store`` with ``encoded`` (``encode_rows``' output) set at ``index`` (a tuple of integer arrays over the
    leading axes); out-of-bounds rows are dropped."""
    return jax.tree.map(lambda s, e: s.at[index].set(e, mode="drop"), store, encoded)


def write_rows(store, index: tuple, rows: jax.Array):
    """``store`` with rows [..., D] written at ``index``: the cache's one write of K=V rows."""
    return scatter_rows(store, index, encode_rows(store, rows))


def read_rows(stored, dtype) -> jax.Array:
    """Stored rows -> [..., D]: an array as it is, Fp8Rows dequantised to ``dtype``."""
    if isinstance(stored, Fp8Rows):
        return dequantise(stored.nope, stored.rope, stored.scale, dtype)
    return stored


def compute_dtype(store):
    """The dtype rows are produced in before ``encode_rows`` stores them: the array's, or fp32 for the FP8
    layout (one rounding, e4m3's)."""
    return jnp.float32 if isinstance(store, Fp8Rows) else store.dtype
