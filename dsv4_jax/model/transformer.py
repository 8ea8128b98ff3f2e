"""The DeepSeek-V4 causal LM as Flax NNX modules.

Parameter paths mirror the Hugging Face checkpoint names (``model.layers.3.self_attn.q_a_proj.weight``),
so weight import is a lookup. ``forward`` is the one forward: a chunk of tokens, its metadata (built
once by ``build_metadata`` before the layer loop) and the caches in; logits and new caches out. The
stateless ``model(input_ids)`` is that forward over a fresh cache sized to the prompt.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import ops
from ..ops.parallel import embed_lookup, gather_vocab
from .attention import Attention
from .layers import Linear, RMSNorm
from .cache import LayerCache, init_cache
from .config import DeepseekV4Config
from .hyper_connection import HyperConnection, HyperHead, expand
from .metadata import ForwardMetadata, build_metadata, padded_chunk_len
from .moe import MoE
from .spec import Storage, param


class InputError(ValueError):
    """Bad user input (token ids, lengths); the message names the value and what was expected."""


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, layer: int, *, dtype, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, layer, dtype=dtype, rngs=rngs)
        self.mlp = MoE(cfg, layer, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed")
        self.attn_hc = HyperConnection(cfg, rngs=rngs)
        self.ffn_hc = HyperConnection(cfg, rngs=rngs)

    def __call__(self, streams, token_ids, meta: ForwardMetadata, cache: LayerCache):
        """streams [B, C, n, d] -> (streams, layer cache)."""
        # Named scopes let a profile attribute device time to attention, MoE and mHC per layer.
        with jax.named_scope("mhc"):
            attn_in, post, comb = self.attn_hc(streams, self.input_layernorm)
        with jax.named_scope("attention"):
            attn_out, cache = self.self_attn(attn_in, meta, cache)
        with jax.named_scope("mhc"):
            streams = expand(streams, attn_out, post, comb)
            ffn_in, post, comb = self.ffn_hc(streams, self.post_attention_layernorm)
        with jax.named_scope("moe"):
            ffn_out = self.mlp(ffn_in, token_ids)
        with jax.named_scope("mhc"):
            return expand(streams, ffn_out, post, comb), cache


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.weight = param(0.02 * jax.random.normal(rngs.params(), (vocab, dim)), ("vocab", "embed"), Storage.MODEL,
                            dtype)

    def __call__(self, ids):
        """ids [...] -> [..., d]; the rows may be split over tensor-parallel devices (ops.parallel)."""
        return embed_lookup(self.weight[...], ids)


class DeepseekV4Model(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, *, dtype, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed")
        self.hc_head = HyperHead(cfg, rngs=rngs)


class DeepseekV4ForCausalLM(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.model = DeepseekV4Model(cfg, dtype=self.dtype, rngs=rngs)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, axes=("vocab", "embed"), storage=Storage.MODEL,
                              dtype=self.dtype, rngs=rngs)

    def forward(self, token_ids: jax.Array, meta: ForwardMetadata, cache: tuple[LayerCache, ...],
                logits_at: jax.Array | None = None):
        """token_ids [B, C] (C padded as the metadata says) -> (logits, new caches).

        Logits are fp32 [B, C, V], or [B, V] at chunk offsets ``logits_at`` [B] (the engine only needs
        each row's last real token, and the vocabulary projection is the largest matmul of a step).
        """
        streams, new_cache = self.run_layers(self.embed_streams(token_ids), token_ids, meta, cache, logits_at)
        return self.logits(streams), new_cache

    def embed_streams(self, token_ids: jax.Array) -> jax.Array:
        """token_ids [B, C] -> the n residual streams entering the first layer [B, C, n, d] (copies of the
        embedding)."""
        x = self.model.embed_tokens(token_ids)
        return jnp.broadcast_to(x[:, :, None, :], (*x.shape[:2], self.config.hc_mult, x.shape[-1]))

    def run_layers(self, streams: jax.Array, token_ids: jax.Array, meta: ForwardMetadata,
                   cache: tuple[LayerCache, ...], logits_at: jax.Array | None = None):
        """The layer stack: streams [B, C, n, d] -> (streams after the last layer, [B, C, n, d] or [B, n, d] at
        ``logits_at`` [B]; new caches). ``runtime.pipeline`` runs the same layers as stages."""
        new_cache = []
        for i, (layer, layer_cache) in enumerate(zip(self.model.layers, cache)):
            with jax.named_scope(f"layer_{i}"):
                streams, layer_cache = layer(streams, token_ids, meta, layer_cache)
            new_cache.append(layer_cache)
        return at_positions(streams, logits_at), tuple(new_cache)

    def residual_streams(self, token_ids: jax.Array, meta: ForwardMetadata, cache: tuple[LayerCache, ...]):
        """token_ids [B, C] -> (the n residual streams after the last layer, before hc_head [B, C, n, d],
        new caches of the model's layers); the MTP block reads these streams too."""
        return self.run_layers(self.embed_streams(token_ids), token_ids, meta, cache)

    def logits(self, streams: jax.Array) -> jax.Array:
        """The LM head: streams [..., n, d] after the last layer -> fp32 logits [..., V]."""
        return lm_logits(self.model.hc_head, self.model.norm, self.lm_head, streams, self.config.vocab_size)

    def __call__(self, input_ids) -> jax.Array:
        """Stateless forward: input_ids int [B, S] -> logits [B, S, V] (fp32)."""
        ids = check_token_ids(input_ids, self.config.vocab_size)
        graphdef, state = nnx.split(self)
        return _stateless_logits(graphdef, state, ids, ops.current())


METADATA_SCOPE = "forward_metadata"


def at_positions(streams: jax.Array, positions: jax.Array | None) -> jax.Array:
    """streams [B, C, n, d] -> [B, n, d] at chunk offsets ``positions`` [B] (all of them when None)."""
    if positions is None:
        return streams
    return jnp.take_along_axis(streams, positions[:, None, None, None], axis=1)[:, 0]


def lm_logits(hc_head: HyperHead, norm: RMSNorm, lm_head: Linear, streams: jax.Array, vocab_size: int) -> jax.Array:
    """The head: streams [..., n, d] -> hc_head -> final norm -> fp32 logits [..., V] (the main model's, and
    the MTP block's with its own hc_head and norm). The head's rows may be split over tensor-parallel devices
    (and padded to a multiple of them): the shards' logits are gathered and the padding dropped."""
    return gather_vocab(lm_head(norm(hc_head(streams)), jnp.float32), vocab_size)


def prepare_chunk(cfg: DeepseekV4Config, token_ids: jax.Array, start: jax.Array, n_new: jax.Array, capacity: int,
                  last_only: bool = False):
    """A step's inputs for the layers: token_ids [B, S] padded to the query block [B, C]; the metadata, built
    once here (under ``METADATA_SCOPE``) for every layer; each row's last real offset [B] when
    ``last_only`` (else None). start [B] tokens already cached, n_new [B] real tokens of each row."""
    S = token_ids.shape[1]
    C = padded_chunk_len(cfg, S)
    token_ids = jnp.pad(token_ids, ((0, 0), (0, C - S)))
    with jax.named_scope(METADATA_SCOPE):
        meta = build_metadata(cfg, start, n_new, C, capacity)
    logits_at = jnp.maximum(n_new - 1, 0).astype(jnp.int32) if last_only else None
    return token_ids, meta, logits_at


def run_chunk(model: DeepseekV4ForCausalLM, cache, token_ids: jax.Array, start: jax.Array, n_new: jax.Array,
              capacity: int, last_only: bool = False):
    """One forward over a chunk on one device: the metadata step once, then every layer.

    token_ids [B, C] (row b's first n_new[b] tokens are real, the rest padding); start [B] tokens
    already cached. The ops run the implementations of the current ``ops.use`` setting (plain XLA unless
    set). Returns (logits [B, C, V] or [B, V] at each row's last real token, new caches).
    """
    S = token_ids.shape[1]
    token_ids, meta, logits_at = prepare_chunk(model.config, token_ids, start, n_new, capacity, last_only)
    logits, cache = forward_prepared(model, token_ids, meta, cache, logits_at)
    return (logits if last_only else logits[:, :S]), cache


def forward_prepared(model: DeepseekV4ForCausalLM, token_ids: jax.Array, meta: ForwardMetadata, cache,
                     logits_at: jax.Array | None, layers=None):
    """A prepared chunk (``prepare_chunk``'s outputs) through the embedding, the layers and the head ->
    (logits [B, C, V] or [B, V] at ``logits_at``, new caches). The sharded step (runtime/mesh.py) runs this
    per device, on its shards, with the metadata prepared before it. ``layers``: how the layer stack runs,
    with ``model.run_layers``'s signature (default: that loop; a pipeline's stages pass
    ``runtime.pipeline.PipelinePlan.run``)."""
    streams, cache = (layers or model.run_layers)(model.embed_streams(token_ids), token_ids, meta, cache, logits_at)
    return model.logits(streams), cache


def stateless_forward(model: DeepseekV4ForCausalLM, ids: jax.Array) -> jax.Array:
    """One-shot prefill of ids [B, S] from empty caches sized to S; returns logits [B, S, V]."""
    B, S = ids.shape
    cache = init_cache(model.config, B, S, model.dtype)
    logits, _ = run_chunk(model, cache, ids, jnp.zeros((B,), jnp.int32), jnp.full((B,), S, jnp.int32), S)
    return logits


@functools.partial(jax.jit, static_argnums=(0, 3))
def _stateless_logits(graphdef, state, ids, kernels: ops.Kernels):
    """The stateless forward, traced under ``kernels`` (static: another choice is another trace)."""
    with ops.use(kernels):
        return stateless_forward(nnx.merge(graphdef, state), ids)


def check_token_ids(input_ids, vocab_size: int) -> jax.Array:
    """Validate a concrete [B, S] batch of token ids; raises InputError naming the bad value."""
    arr = np.asarray(input_ids)
    if arr.ndim != 2:
        raise InputError(f"input_ids must have shape [batch, seq], got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise InputError(f"input_ids is empty (shape {tuple(arr.shape)}); expected at least one token")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"input_ids must be integers, got dtype {arr.dtype}")
    check_vocab(arr, vocab_size)
    return jnp.asarray(arr, jnp.int32)


def check_vocab(ids, vocab_size: int) -> None:
    """Raise InputError naming the first token id outside [0, vocab_size)."""
    arr = np.asarray(ids)
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        raise InputError(f"token id {int(arr[bad].flat[0])} is outside the vocabulary [0, {vocab_size})")


def check_capacity(prompt_len: int, max_new_tokens: int, capacity: int, name: str = "max_new_tokens") -> None:
    """Raise InputError unless the longest prompt plus ``max_new_tokens`` fits the cache; ``name`` is how
    the caller spells the setting (``--max-new-tokens`` on the command line)."""
    if max_new_tokens < 0:
        raise InputError(f"{name} {max_new_tokens} must be >= 0")
    if prompt_len + max_new_tokens > capacity:
        raise InputError(f"prompt of {prompt_len} tokens + {name} {max_new_tokens} exceeds the cache capacity "
                         f"of {capacity} tokens")
