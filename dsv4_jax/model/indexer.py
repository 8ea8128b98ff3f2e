"""Lightning indexer (CSA layers): scores every visible compressed entry and keeps the top-k.

I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . K[s]) over the indexer's own compressed keys, with
w = weights_proj(x) * D_I^-1/2 * H_I^-1/2. Entries s >= (t + 1) // m are not yet complete and are
never picked; picks beyond the visible count come back as -1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .. import ops
from .compression import CompressionMeta, CompressorState
from .compressor import Compressor
from .config import DeepseekV4Config
from .layers import Linear
from .rope import apply_rope
from .spec import Storage


class Scorer(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, *, dtype, rngs: nnx.Rngs):
        self.weights_proj = Linear(cfg.hidden_size, cfg.index_n_heads, axes=("index_heads", "embed"),
                                   storage=Storage.MODEL, dtype=dtype, rngs=rngs)


class Indexer(Compressor):
    """The indexer's own overlapping compressor (width D_I) plus its query projection and scorer."""

    def __init__(self, cfg: DeepseekV4Config, *, dtype, rngs: nnx.Rngs):
        super().__init__(cfg, cfg.csa_compress_rate, cfg.index_head_dim, dtype=dtype, rngs=rngs)
        self.cfg = cfg
        self.q_b_proj = Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, axes=("index_heads", "q_lora"),
                               storage=Storage.FP8, dtype=dtype, rngs=rngs)
        self.scorer = Scorer(cfg, dtype=dtype, rngs=rngs)

    def queries(self, x, q_latent, cos, sin) -> tuple[jax.Array, jax.Array]:
        """x [B, C, d], q_latent [B, C, r_q], cos/sin [B, C, R/2] -> (q [B, C, H_I, D_I] with RoPE,
        head weights [B, C, H_I] fp32 with D_I^-1/2 * H_I^-1/2 folded in): ``index_scores``' inputs."""
        c = self.cfg
        B, C, _ = x.shape
        q = self.q_b_proj(q_latent).reshape(B, C, -1, c.index_head_dim)  # this device's heads
        q = apply_rope(q, cos[:, :, None], sin[:, :, None])
        w = self.scorer.weights_proj(x, out_dtype=jnp.float32) * (c.index_head_dim**-0.5 * c.index_n_heads**-0.5)
        return q, w

    def __call__(self, x, q_latent, cos, sin, state: CompressorState, keys: jax.Array, meta: CompressionMeta):
        """Returns (top-k entry ids [B, C, k], updated keys [B, N, D_I], new compressor state). The ids are a
        set: Pallas' top-k returns them in ascending id order, the XLA path by descending score (every consumer
        is order-free)."""
        keys, state = self.compress(x, state, keys, meta)
        q, w = self.queries(x, q_latent, cos, sin)
        k = min(self.cfg.index_topk, keys.shape[1])
        return ops.topk(ops.indexer_scores(q, keys, w, meta.n_visible), meta.n_visible, k), keys, state
