"""Mixture of experts: sqrt-softplus router (learned top-k with a selection-only bias, or a frozen
token-id hash), clamped SwiGLU routed experts as grouped matmuls, and one always-on shared expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .. import ops
from ..ops.dense import FP32, linear
from ..ops.moe import clamped_swiglu
from .layers import Buffer, Linear
from .config import HASH_MOE, DeepseekV4Config
from .spec import Storage, param


def router_scores(x: jax.Array, gate_weight: jax.Array) -> jax.Array:
    """x [T, d] -> sqrt(softplus(W_g x)) [T, E] in fp32 (softplus is the overflow-safe logaddexp form)."""
    logits = linear(x.astype(jnp.float32), gate_weight.astype(jnp.float32), precision=FP32)
    return jnp.sqrt(jax.nn.softplus(logits))


def normalise_weights(scores: jax.Array, idx: jax.Array, route_scale: float) -> jax.Array:
    """Gather the picked experts' scores [T, k], renormalise to sum 1, scale by route_scale."""
    w = jnp.take_along_axis(scores, idx, axis=-1)
    return w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20) * route_scale


# Up to this many tokens the router's k largest are picked by rank (each expert counts the experts ranked
# before it): two reductions, the first fused with the bias add, where lax.top_k on a GPU is a bias-add kernel,
# a sort kernel and a slice kernel per MoE layer.
RANK_TOP_K_MAX_TOKENS = 16


def top_k_ids(x: jax.Array, k: int) -> jax.Array:
    """x [T, E] -> ids of each row's k largest [T, k] int32, in lax.top_k's order (descending, ties to the
    lower id)."""
    T, E = x.shape
    if T > RANK_TOP_K_MAX_TOKENS:
        return jax.lax.top_k(x, k)[1]
    ids = jnp.arange(E, dtype=jnp.int32)
    xi, xj = x[:, :, None], x[:, None, :]
    before = (xj > xi) | ((xj == xi) & (ids[None, None, :] < ids[None, :, None]))  # [T, i, j]: j ranks before i
    rank = jnp.sum(before, axis=-1, dtype=jnp.int32)  # [T, E], a permutation of 0..E-1 for finite x
    picked = rank[:, None, :] == jnp.arange(k, dtype=jnp.int32)[None, :, None]  # [T, k, E]
    # NaN scores share rank 0; the clamp keeps the sum of their ids a valid expert id
    return jnp.minimum(jnp.sum(jnp.where(picked, ids, 0), axis=-1), E - 1)


def route_learned(scores: jax.Array, bias: jax.Array, k: int, route_scale: float):
    """Top-k over scores + bias; the bias (aux-loss-free balancing) only affects selection."""
    idx = top_k_ids(scores + bias.astype(jnp.float32), k)
    return normalise_weights(scores, idx, route_scale), idx


def route_hash(scores: jax.Array, tid2eid: jax.Array, token_ids: jax.Array, route_scale: float):
    """Experts fixed per token id (tid2eid [V, k]); the learned scores still weight them."""
    idx = tid2eid[token_ids].astype(jnp.int32)
    return normalise_weights(scores, idx, route_scale), idx


class Router(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, is_hash: bool, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.is_hash = is_hash
        self.weight = param(0.02 * jax.random.normal(rngs.params(), (cfg.n_routed_experts, cfg.hidden_size)),
                            ("router", "embed"), Storage.MODEL, dtype)
        if is_hash:
            perm = jax.vmap(lambda k: jax.random.permutation(k, cfg.n_routed_experts)[: cfg.num_experts_per_tok])
            self.tid2eid = param(perm(jax.random.split(rngs.params(), cfg.vocab_size)), ("token_table", "topk"),
                                 Storage.INT32, kind=Buffer)
        else:
            self.e_score_correction_bias = param(jnp.zeros((cfg.n_routed_experts,), jnp.float32), ("router",),
                                                 Storage.FP32, kind=Buffer)

    def __call__(self, x: jax.Array, token_ids: jax.Array):
        """x [T, d], token_ids [T] -> (weights [T, k] fp32, expert ids [T, k])."""
        scores = router_scores(x, self.weight[...])
        if self.is_hash:
            return route_hash(scores, self.tid2eid[...], token_ids, self.cfg.routed_scaling_factor)
        return route_learned(scores, self.e_score_correction_bias[...], self.cfg.num_experts_per_tok,
                             self.cfg.routed_scaling_factor)


class Experts(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, *, dtype, rngs: nnx.Rngs):
        E, F, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.limit = cfg.swiglu_limit
        self.gate_up_proj = param(0.02 * jax.random.normal(rngs.params(), (E, 2 * F, d)),
                                  ("experts", "expert_gate_up", "embed"),
                                  Storage.FP4, dtype)
        self.down_proj = param(0.02 * jax.random.normal(rngs.params(), (E, d, F)),
                               ("experts", "embed", "expert_mlp"),
                               Storage.FP4, dtype)

    def __call__(self, x, idx, weights):
        # [E, 2F, d], or placed for a split of F as [E, 2, F, d] (sharding.py); an array or a QuantArray
        gate_up = jax.tree.map(lambda a: a.reshape(a.shape[0], -1, a.shape[-1]), self.gate_up_proj.get_value())
        return ops.routed_experts(x, idx, weights, gate_up, self.down_proj.get_value(), self.limit)


class SharedExpert(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, *, dtype, rngs: nnx.Rngs):
        d, F = cfg.hidden_size, cfg.moe_intermediate_size
        self.limit = cfg.swiglu_limit
        fp8 = dict(storage=Storage.FP8, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear(d, F, axes=("mlp", "embed"), **fp8)
        self.up_proj = Linear(d, F, axes=("mlp", "embed"), **fp8)
        self.down_proj = Linear(F, d, axes=("embed", "mlp"), row_parallel=True, **fp8)

    def __call__(self, x):
        h = clamped_swiglu(self.gate_proj(x, jnp.float32), self.up_proj(x, jnp.float32), self.limit)
        return self.down_proj(h.astype(x.dtype), jnp.float32)


class MoE(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, layer: int, *, dtype, rngs: nnx.Rngs):
        self.gate = Router(cfg, cfg.mlp_layer_types[layer] == HASH_MOE, dtype=dtype, rngs=rngs)
        self.experts = Experts(cfg, dtype=dtype, rngs=rngs)
        self.shared_experts = SharedExpert(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, token_ids: jax.Array) -> jax.Array:
        """x [B, C, d], token_ids [B, C] -> [B, C, d]."""
        B, C, d = x.shape
        flat = x.reshape(B * C, d)
        weights, idx = self.gate(flat, token_ids.reshape(-1))
        out = self.experts(flat, idx, weights) + self.shared_experts(flat)
        return out.astype(x.dtype).reshape(B, C, d)
