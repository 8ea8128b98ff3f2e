"""Look inside one forward pass: what every layer computed, for plots and layer-by-layer parity.

``trace_forward`` runs the real stateless forward (``model.stateless_forward``) unchanged and eagerly
under ``nnx.capture(..., method_outputs=nnx.Intermediate)``: flax records what each module method
returned, so nothing here re-implements a layer. The only value computed here is the indexer's score
matrix, from the captured indexer queries and keys through ``ops.indexer.index_scores``. Running op by op,
it is meant for small models and short prompts (the notebooks, the demo model).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from ..ops.indexer import index_scores
from .transformer import DeepseekV4ForCausalLM, check_token_ids, stateless_forward


@dataclasses.dataclass(frozen=True)
class LayerTrace:
    """One decoder layer of a traced forward (numpy; S prompt tokens, N = S // m compressed entries)."""

    streams: np.ndarray  # [B, S, n, d] the mHC residual streams after this layer
    attn_mix: tuple  # (pre [B, S, n], post [B, S, n], comb [B, S, n, n]) of the attention sub-block
    ffn_mix: tuple  # the same for the MoE sub-block
    compressed: np.ndarray | None  # [B, N, D] compressed KV entries (CSA / HCA layers)
    index_scores: np.ndarray | None  # [B, S, N] lightning indexer scores (CSA layers; all entries, visible or not)
    topk: np.ndarray | None  # [B, S, k] the entry ids the indexer picked per query, -1 = none (CSA layers)


@dataclasses.dataclass(frozen=True)
class ForwardTrace:
    """A traced stateless forward of S tokens (numpy)."""

    logits: np.ndarray  # [B, S, V] fp32
    embeddings: np.ndarray  # [B, S, d] token embeddings (every stream of the first layer's input)
    layers: tuple[LayerTrace, ...]
    final_hidden: np.ndarray  # [B, S, d] final norm of the hyper head's stream collapse (the LM head's input)


def _output(captured, path: tuple, method: str):
    """The single recorded return value of ``method`` on the module at ``path``; None if it never ran."""
    node = captured
    for key in path:
        if key not in node:
            return None
        node = node[key]
    if method not in node:
        return None
    (value,) = node[method].get_value()  # sow keeps one entry per call; each method runs once per forward
    return value


def trace_forward(model: DeepseekV4ForCausalLM, input_ids) -> ForwardTrace:
    """input_ids int [B, S] -> the forward's logits and every layer's intermediate values (eager, not jitted)."""
    ids = check_token_ids(input_ids, model.config.vocab_size)
    S = ids.shape[1]
    logits, captured = nnx.capture(stateless_forward, nnx.Intermediate, method_outputs=nnx.Intermediate)(model, ids)

    def host(x):  # drop the chunk padding of per-token values
        return jax.tree.map(lambda a: np.asarray(a)[:, :S], x)

    layers = []
    for i in range(model.config.num_hidden_layers):
        at = ("model", "layers", i)
        streams, _ = _output(captured, at, "__call__")
        compressed = _output(captured, (*at, "self_attn", "compressor"), "compress")
        indexer = (*at, "self_attn", "compressor", "indexer")
        picks = _output(captured, indexer, "__call__")
        scores = None
        if picks is not None:
            q, head_weights = _output(captured, indexer, "queries")
            scores = index_scores(q, picks[1], head_weights)
        layers.append(LayerTrace(
            streams=host(streams),
            attn_mix=host(_output(captured, (*at, "attn_hc"), "weights")),
            ffn_mix=host(_output(captured, (*at, "ffn_hc"), "weights")),
            compressed=None if compressed is None else np.asarray(compressed[0]),
            index_scores=None if scores is None else host(scores),
            topk=None if picks is None else host(picks[0]),
        ))
    return ForwardTrace(logits=np.asarray(logits), layers=tuple(layers),
                        embeddings=host(_output(captured, ("model", "embed_tokens"), "__call__")),
                        final_hidden=host(_output(captured, ("model", "norm"), "__call__")))
