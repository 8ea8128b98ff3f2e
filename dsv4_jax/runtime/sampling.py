"""Token sampling inside the jitted step: greedy, temperature, top-k, top-p (nucleus)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (0.0 <= self.temperature < math.inf):  # nan and inf included: inf would sample uniformly
            raise ValueError(f"temperature {self.temperature} must be a finite number >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k {self.top_k} must be >= 0 (0 = off)")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p {self.top_p} must be in (0, 1]")

    @property
    def filters(self) -> bool:
        """Whether top-k or top-p is on: the static switch of ``sample``'s full-vocabulary sort."""
        return self.top_k > 0 or self.top_p < 1.0


def sampling_args(params: SamplingParams) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The traced (temperature, top_k, top_p) of ``sample``: a new setting does not recompile the step."""
    return jnp.float32(params.temperature), jnp.int32(params.top_k), jnp.float32(params.top_p)


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [B, V] fp32 -> logits with everything outside top-k / the top-p nucleus at -inf.

    top_k, top_p: traced scalars (no recompile per setting). The most likely token always survives.
    """
    sorted_desc = -jnp.sort(-logits, axis=-1)
    V = logits.shape[-1]
    kth = jnp.take_along_axis(sorted_desc, jnp.clip(top_k - 1, 0, V - 1)[None, None], axis=-1)
    keep = jnp.where(top_k > 0, logits >= kth, True)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_nucleus = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(sorted_desc, n_nucleus - 1, axis=-1)
    keep = keep & (logits >= cutoff)
    return jnp.where(keep, logits, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array, *, filters: bool = True) -> jax.Array:
    """logits [B, V] -> token ids [B] int32. ``filters`` (static, ``SamplingParams.filters``): False skips
    top-k / top-p, whose sort of the whole vocabulary costs a batch-1 decode step time even when both are
    off (docs/performance.md)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    if filters:
        scaled = filter_logits(scaled, top_k, top_p)
    drawn = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)
