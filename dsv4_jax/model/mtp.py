"""The multi-token-prediction (MTP) block of the released checkpoints (``mtp.0.*``, spec §10).

At position t it combines the main model's residual streams (after the last layer, before hc_head)
with the embedding of token t+1 and predicts token t+2:

    X_in = e_proj(enorm(Embed(next_ids)))  (broadcast over the n streams)  +  h_proj(hnorm(X_final))
    X    = one decoder layer (sliding window only, learned router with bias, its own mHC)
    logits = lm_head(norm(hc_head(X)))      (embedding and lm_head shared with the main model)

The block is layer ``num_hidden_layers`` of ``mtp_config(cfg)``; it runs at the main tokens' positions
on the main forward's metadata. The main forward is untouched: ``DeepseekV4WithMTP`` only adds the
block's parameters (``model.mtp.0.*``) and ``forward_mtp``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from .. import ops
from .layers import Linear, RMSNorm
from .cache import LayerCache, init_cache
from .config import MOE, SLIDING, DeepseekV4Config
from .hyper_connection import HyperHead
from .metadata import ForwardMetadata
from .spec import Storage
from .transformer import DecoderLayer, DeepseekV4ForCausalLM, InputError, check_token_ids, lm_logits, prepare_chunk


def mtp_config(cfg: DeepseekV4Config) -> DeepseekV4Config:
    """``cfg`` with the MTP block appended as one more layer: sliding window only (the released
    compress_ratios end in 0 for it) with a learned router (its layer id is past the hash layers)."""
    return dataclasses.replace(cfg, num_hidden_layers=cfg.num_hidden_layers + 1,
                               layer_types=cfg.layer_types + (SLIDING,), mlp_layer_types=cfg.mlp_layer_types + (MOE,))


def mtp_layer_config(cfg: DeepseekV4Config) -> DeepseekV4Config:
    """The MTP block's layer alone as a one-layer config: the metadata of a step of the block by itself (window
    and RoPE; no compression bookkeeping, which it has none of)."""
    return dataclasses.replace(cfg, num_hidden_layers=1, layer_types=(SLIDING,), mlp_layer_types=(MOE,))


class MTPBlock(DecoderLayer):
    def __init__(self, cfg: DeepseekV4Config, *, dtype, rngs: nnx.Rngs):
        super().__init__(mtp_config(cfg), cfg.num_hidden_layers, dtype=dtype, rngs=rngs)
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        fp8 = dict(axes=("embed", "embed_in"), storage=Storage.FP8, dtype=dtype, rngs=rngs)
        self.e_proj = Linear(d, d, **fp8)
        self.h_proj = Linear(d, d, **fp8)
        self.enorm = RMSNorm(d, eps, "embed")
        self.hnorm = RMSNorm(d, eps, "embed")
        self.norm = RMSNorm(d, eps, "embed")
        self.hc_head = HyperHead(cfg, rngs=rngs)
        self.vocab_size = cfg.vocab_size

    def streams(self, streams: jax.Array, next_embeds: jax.Array, next_ids: jax.Array, meta: ForwardMetadata,
                cache: LayerCache):
        """streams [B, C, n, d] (main model, before hc_head, or the block's own output when drafting
        recursively); next_embeds [B, C, d] = Embed(next_ids); next_ids [B, C] -> (the block's output streams
        [B, C, n, d], layer cache)."""
        x = self.h_proj(self.hnorm(streams)) + self.e_proj(self.enorm(next_embeds))[:, :, None, :]
        return super().__call__(x, next_ids, meta, cache)

    def logits(self, x: jax.Array, lm_head: Linear) -> jax.Array:
        """The block's head on its output streams [..., n, d] (lm_head the main model's) -> fp32 logits [..., V]."""
        return lm_logits(self.hc_head, self.norm, lm_head, x, self.vocab_size)


class DeepseekV4WithMTP(DeepseekV4ForCausalLM):
    """The causal LM plus its MTP block. ``forward``/``__call__`` are the main model's, unchanged."""

    def __init__(self, cfg: DeepseekV4Config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        self.model.mtp = nnx.List([MTPBlock(cfg, dtype=self.dtype, rngs=rngs)])

    def forward_mtp(self, token_ids: jax.Array, next_ids: jax.Array, meta: ForwardMetadata,
                    cache: tuple[LayerCache, ...]):
        """token_ids, next_ids [B, C] (next_ids[:, t] is token t+1) -> (logits [B, C, V] for token t+1,
        MTP logits [B, C, V] for token t+2, both fp32; new caches). ``cache`` holds the model's layers and
        then the MTP block's (``init_cache(mtp_config(cfg), ...)``)."""
        n = self.config.num_hidden_layers
        streams, main_cache = self.residual_streams(token_ids, meta, cache[:n])
        x, mtp_cache = self.mtp_streams(streams, next_ids, meta, cache[n])
        return self.logits(streams), self.mtp_head(x), main_cache + (mtp_cache,)

    def mtp_streams(self, streams: jax.Array, next_ids: jax.Array, meta: ForwardMetadata, cache: LayerCache):
        """The MTP block at a chunk's positions: streams [B, C, n, d] (the main model's after its last layer, or
        the block's own output one position back when drafting), next_ids [B, C] -> (the block's output streams
        [B, C, n, d], its layer cache)."""
        with jax.named_scope("mtp"):
            return self.model.mtp[0].streams(streams, self.model.embed_tokens(next_ids), next_ids, meta, cache)

    def mtp_head(self, x: jax.Array) -> jax.Array:
        """The MTP block's output streams [..., n, d] -> fp32 logits [..., V] of the token after next."""
        with jax.named_scope("mtp"):
            return self.model.mtp[0].logits(x, self.lm_head)


def mtp_logits(model: DeepseekV4WithMTP, input_ids, next_ids) -> tuple[jax.Array, jax.Array]:
    """Stateless: input_ids, next_ids int [B, S] (next_ids[:, t] = token t+1, e.g. input_ids shifted left
    plus the sampled token) -> (logits [B, S, V] for token t+1, MTP logits [B, S, V] for token t+2)."""
    vocab = model.config.vocab_size
    ids, nxt = check_token_ids(input_ids, vocab), check_token_ids(next_ids, vocab)
    if ids.shape != nxt.shape:
        raise InputError(f"next_ids has shape {tuple(nxt.shape)} but input_ids has {tuple(ids.shape)}; "
                         "expected one next token per position")
    graphdef, state = nnx.split(model)
    return _stateless_mtp(graphdef, state, ids, nxt, ops.current())


@functools.partial(jax.jit, static_argnums=(0, 4))
def _stateless_mtp(graphdef, state, ids, next_ids, kernels: ops.Kernels):
    with ops.use(kernels):
        return stateless_mtp_forward(nnx.merge(graphdef, state), ids, next_ids)


def stateless_mtp_forward(model: DeepseekV4WithMTP, ids: jax.Array, next_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``mtp_logits`` on checked ids [B, S] from empty caches sized to S (traceable: training takes its gradient)."""
    cfg = model.config
    B, S = ids.shape
    start, n_new = jnp.zeros((B,), jnp.int32), jnp.full((B,), S, jnp.int32)
    ids, meta, _ = prepare_chunk(cfg, ids, start, n_new, S)
    next_ids = jnp.pad(next_ids, ((0, 0), (0, ids.shape[1] - S)))
    cache = init_cache(mtp_config(cfg), B, S, model.dtype)
    logits, mtp, _ = model.forward_mtp(ids, next_ids, meta, cache)
    return logits[:, :S], mtp[:, :S]
