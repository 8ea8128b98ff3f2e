"""Partial interleaved RoPE on the trailing channels, with the plain and the YaRN-bent frequencies.

Pairs ``(2i, 2i+1)`` of the last R channels form one complex number rotated by ``t * w_i``.
Sliding-window-only layers use ``rope_theta`` without YaRN ("main"); CSA/HCA layers use
``compress_rope_theta`` with YaRN ("compress") for queries, keys, compressed entries and the indexer.
YaRN here bends frequencies only: cos/sin are not scaled (DeepSeek-V4 sets attention_factor = 1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .config import SLIDING, DeepseekV4Config, YarnScaling


def default_inv_freq(rope_dim: int, theta: float) -> np.ndarray:
    """``w_i = theta^(-2i/R)``, i = 0..R/2-1, [R/2] float32."""
    exponents = np.arange(0, rope_dim, 2, dtype=np.float32) / np.float32(rope_dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def yarn_inv_freq(rope_dim: int, theta: float, yarn: YarnScaling) -> np.ndarray:
    """YaRN: pairs below ``lo`` keep ``w_i``, pairs above ``hi`` use ``w_i / factor``, linear blend between."""

    def correction_dim(num_rotations: float) -> float:
        return rope_dim * math.log(yarn.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (
            2 * math.log(theta)
        )

    lo = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    hi = min(math.ceil(correction_dim(yarn.beta_slow)), rope_dim - 1)
    if lo == hi:
        hi += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    freq = default_inv_freq(rope_dim, theta)
    return (freq / np.float32(yarn.factor) * ramp + freq * (1.0 - ramp)).astype(np.float32)


def inv_freq_for(cfg: DeepseekV4Config, rope_kind: str) -> np.ndarray:
    """Frequencies of a rope kind: ``"main"`` (sliding-only layers) or ``"compress"`` (CSA/HCA layers)."""
    if rope_kind == "main":
        return default_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta)
    if cfg.compress_yarn is None:
        return default_inv_freq(cfg.qk_rope_head_dim, cfg.compress_rope_theta)
    return yarn_inv_freq(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.compress_yarn)


def rope_kind_of(layer_type: str) -> str:
    return "main" if layer_type == SLIDING else "compress"


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions [...] int -> (cos, sin) [..., R/2] float32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, inverse: bool = False) -> jax.Array:
    """Rotate the trailing ``2 * cos.shape[-1]`` channels of ``x [..., D]`` pairwise.

    ``cos``/``sin`` broadcast against ``x[..., :1]`` minus the last axis (e.g. [B,S,R/2] vs x [B,S,H,D]
    takes cos[:, :, None]). ``inverse`` rotates by the negative angle (used on the attention output,
    since values carry RoPE because K = V).
    """
    rope_dim = 2 * cos.shape[-1]
    nope, rope = x[..., :-rope_dim], x[..., -rope_dim:]
    pairs = rope.astype(jnp.float32).reshape(*rope.shape[:-1], rope_dim // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    if inverse:
        sin = -sin
    rotated = jnp.stack([re * cos - im * sin, im * cos + re * sin], axis=-1).reshape(rope.shape)
    return jnp.concatenate([nope, rotated.astype(x.dtype)], axis=-1)
