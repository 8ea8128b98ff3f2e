"""Lightning indexer (CSA layers): scores every visible compressed entry and keeps the top-k.

I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . K[s]) over the indexer's own compressed keys, with
w = weights_proj(x) * D_I^-1/2 * H_I^-1/2. Entries s >= (t + 1) // m are not yet complete and are
never picked; picks beyond the visible count come back as -1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .compressor import CompressionMeta, Compressor, CompressorState
from .config import DeepseekV4Config
from .layers import Linear
from .rope import apply_rope


def index_scores(q: jax.Array, keys: jax.Array, head_weights: jax.Array) -> jax.Array:
    """q [B, C, H_I, D_I], keys [B, N, D_I], head_weights [B, C, H_I] (scales folded in) -> [B, C, N] fp32."""
    dots = jnp.einsum("bchd,bnd->bchn", q, keys, preferred_element_type=jnp.float32)
    return jnp.einsum("bchn,bch->bcn", jax.nn.relu(dots), head_weights.astype(jnp.float32))


def select_topk(scores: jax.Array, n_visible: jax.Array, k: int) -> jax.Array:
    """scores [B, C, N], n_visible [B, C] -> entry ids [B, C, k] int32, -1 where fewer than k are visible.

    Invisible and non-finite scores are masked before the selection, so a NaN can never be picked.
    """
    entry = jnp.arange(scores.shape[-1], dtype=jnp.int32)
    visible = entry < n_visible[..., None]
    masked = jnp.where(visible & jnp.isfinite(scores), scores, -jnp.inf)
    _, idx = jax.lax.top_k(masked, k)
    picked = jnp.take_along_axis(masked, idx, axis=-1)
    ok = (idx < n_visible[..., None]) & (picked > -jnp.inf)
    return jnp.where(ok, idx, -1).astype(jnp.int32)


class Scorer(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, *, dtype, rngs: nnx.Rngs):
        self.weights_proj = Linear(cfg.hidden_size, cfg.index_n_heads, dtype=dtype, rngs=rngs)


class Indexer(Compressor):
    """The indexer's own overlapping compressor (width D_I) plus its query projection and scorer."""

    def __init__(self, cfg: DeepseekV4Config, *, dtype, rngs: nnx.Rngs):
        super().__init__(cfg, cfg.csa_compress_rate, cfg.index_head_dim, dtype=dtype, rngs=rngs)
        self.cfg = cfg
        self.q_b_proj = Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, dtype=dtype, rngs=rngs)
        self.scorer = Scorer(cfg, dtype=dtype, rngs=rngs)

    def queries(self, x, q_latent, cos, sin) -> tuple[jax.Array, jax.Array]:
        """x [B, C, d], q_latent [B, C, r_q], cos/sin [B, C, R/2] -> (q [B, C, H_I, D_I] with RoPE,
        head weights [B, C, H_I] fp32 with D_I^-1/2 * H_I^-1/2 folded in): ``index_scores``' inputs."""
        c = self.cfg
        B, C, _ = x.shape
        q = self.q_b_proj(q_latent).reshape(B, C, c.index_n_heads, c.index_head_dim)
        q = apply_rope(q, cos[:, :, None], sin[:, :, None])
        w = self.scorer.weights_proj(x, out_dtype=jnp.float32) * (c.index_head_dim**-0.5 * c.index_n_heads**-0.5)
        return q, w

    def __call__(self, x, q_latent, cos, sin, state: CompressorState, keys: jax.Array, meta: CompressionMeta,
                 kernels: str = "xla"):
        """Returns (top-k entry ids [B, C, k], updated keys [B, N, D_I], new compressor state).

        With ``kernels="pallas"`` the scores come from the Pallas indexer kernels (a decode step, C = 1, and a
        chunk) and the selection from the Pallas top-k, which returns the same set in ascending id order
        (every consumer is order-free); both are tested against this module's functions. The compressor
        follows ``kernels`` too.
        """
        keys, state = self.compress(x, state, keys, meta, kernels)
        q, w = self.queries(x, q_latent, cos, sin)
        k = min(self.cfg.index_topk, keys.shape[1])
        if kernels != "pallas":
            return select_topk(index_scores(q, keys, w), meta.n_visible, k), keys, state
        from kernels_pallas import indexer as pallas_indexer
        from kernels_pallas.common import interpret_default
        from kernels_pallas.topk import topk_indices

        interpret = interpret_default()
        if x.shape[1] == 1:
            n_valid = meta.n_visible[:, 0]
            scores = pallas_indexer.index_scores_decode(q[:, 0], keys, w[:, 0], n_valid, interpret=interpret)
            return topk_indices(scores, n_valid, k, interpret=interpret)[:, None], keys, state
        scores = pallas_indexer.index_scores_prefill(q, keys, w, meta.n_visible, interpret=interpret)
        return topk_indices(scores, meta.n_visible, k, interpret=interpret), keys, state
