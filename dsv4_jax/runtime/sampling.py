"""Token sampling inside the jitted step: greedy, temperature, top-k, top-p (nucleus)."""

from __future__ import annotations

import dataclasses
import functools
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


def probabilities(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *,
                  filters: bool = True) -> jax.Array:
    """logits [..., V] -> the distribution ``sample`` draws from at temperature > 0 [..., V] fp32 (after the
    temperature and, with ``filters``, top-k / top-p)."""
    scaled = logits / jnp.maximum(temperature, 1e-6)
    if filters:
        scaled = filter_logits(scaled.reshape(-1, scaled.shape[-1]), top_k, top_p).reshape(scaled.shape)
    return jax.nn.softmax(scaled, axis=-1)


def leading_true(mask: jax.Array) -> jax.Array:
    """mask [B, N] bool -> [B] int32: how many of each row's first entries are all True."""
    return jnp.sum(jnp.cumprod(mask.astype(jnp.int32), axis=-1), axis=-1)


def verify_drafts(target_logits: jax.Array, draft_logits: jax.Array, drafts: jax.Array, key: jax.Array,
                  temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *,
                  filters: bool = True) -> tuple[jax.Array, jax.Array]:
    """Speculative verification: which drafted tokens to keep and the target model's next token.

    target_logits [B, N + 1, V]: the target model's at the verified tokens (the last committed token, then the N
    drafts); draft_logits [B, N, V]: those each draft was drawn from (with the same settings, by ``sample``);
    drafts [B, N]. Returns (n [B] drafts accepted, tokens [B, N + 1]: the n accepted drafts, then the next token;
    past it unspecified).

    Greedy (temperature 0): a draft is kept while it equals the target's argmax, and the next token is the
    argmax after the last kept one, so the tokens are those of greedy decoding without drafts. Sampling: draft i
    is kept with probability min(1, p_i(d_i) / q_i(d_i)) (p the target's distribution, q the draft's, as
    ``probabilities``); at the first rejection the next token is drawn from max(p_i - q_i, 0) normalised, and
    after N acceptances from p_N. Each emitted token is then distributed exactly as the target alone would
    sample it (Leviathan et al. 2023, Chen et al. 2023).
    """
    B, N = drafts.shape
    greedy = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, N + 1]
    n_greedy = leading_true(drafts == greedy[:, :N])

    p = probabilities(target_logits, temperature, top_k, top_p, filters=filters)
    q = probabilities(draft_logits, temperature, top_k, top_p, filters=filters)
    p_d = jnp.take_along_axis(p[:, :N], drafts[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    key_u, key_r = jax.random.split(key)
    n_sampled = leading_true(jax.random.uniform(key_u, (B, N)) * q_d < p_d)
    p_n = jnp.take_along_axis(p, n_sampled[:, None, None], axis=1)[:, 0]
    q_n = jnp.where((n_sampled < N)[:, None],
                    jnp.take_along_axis(q, jnp.minimum(n_sampled, N - 1)[:, None, None], axis=1)[:, 0], 0.0)
    residual = jnp.maximum(p_n - q_n, 0.0)
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_n)  # p == q: never rejected
    drawn = jax.random.categorical(key_r, jnp.log(residual), axis=-1).astype(jnp.int32)

    sampling = temperature > 0
    n = jnp.where(sampling, n_sampled, n_greedy)
    following = jnp.where(sampling, drawn, jnp.take_along_axis(greedy, n_greedy[:, None], axis=1)[:, 0])
    padded = jnp.concatenate([drafts, drafts[:, :1]], axis=1)
    tokens = jnp.where(jnp.arange(N + 1)[None, :] < n[:, None], padded, following[:, None])
    return n, tokens


@functools.partial(jax.jit, static_argnames="filters")
def first_token(logits, lens, seed, temperature, top_k, top_p, *, filters: bool):
    """The prefill's last logits [B, V] -> (first tokens [B], positions [B] = lens, the decode loop's key),
    as one jitted step: the decode loop's inputs then sit where its outputs will (committed to the logits'
    devices), so its step compiles once rather than again from the second call."""
    key, sub = jax.random.split(jax.random.PRNGKey(seed))
    return sample(logits, sub, temperature, top_k, top_p, filters=filters), lens, key
