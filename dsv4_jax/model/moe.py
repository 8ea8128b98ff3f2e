"""Mixture of experts: sqrt-softplus router (learned top-k with a selection-only bias, or a frozen
token-id hash), clamped SwiGLU routed experts as grouped matmuls, and one always-on shared expert.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import FP32, Buffer, Linear, linear
from .config import HASH_MOE, DeepseekV4Config
from .spec import Storage, param

_RAGGED_DN = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


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


def clamped_swiglu(gate: jax.Array, up: jax.Array, limit: float) -> jax.Array:
    """silu(min(gate, L)) * clip(up, -L, L): the gate is clamped from above only."""
    return jax.nn.silu(jnp.minimum(gate, limit)) * jnp.clip(up, -limit, limit)


def routed_experts(x: jax.Array, idx: jax.Array, weights: jax.Array, gate_up: jax.Array, down: jax.Array,
                   limit: float, kernels: str = "xla") -> jax.Array:
    """x [T, d]; idx, weights [T, k]; gate_up [E, 2F, d]; down [E, d, F] -> [T, d] fp32.

    Only the picked experts' weights are read. Assignments are sorted by expert and run as two grouped
    matmuls: ``ragged_dot_general`` ("xla"; with fewer assignments than experts, as in decode, the
    picked matrices are gathered per assignment instead, since XLA's GPU ragged dot is dense) or a Pallas
    kernel ("pallas", bf16/fp16 weights; fp32 keeps the XLA path): up to 3 assignments per expert (decode;
    measured faster there on an H200 up to 768 rows over 256 experts, docs/performance.md) the Triton
    few-rows kernel (``grouped_gemv``: each used matrix streamed once per 16 rows), above that (prefill) the
    Mosaic GPU grouped matmul (64-128-row ``wgmma`` tiles). A single token's k rows skip the sort and the
    scatter back: its experts are distinct, so ``expert_rows`` runs each row against its own matrix.
    """
    T, k = idx.shape
    E = gate_up.shape[0]
    use_kernel = kernels == "pallas" and gate_up.dtype != jnp.float32
    if T * k < E and not use_kernel:
        return _gathered_experts(x, idx, weights, gate_up, down, limit)
    if use_kernel and T == 1:  # one token's experts are distinct: no sorting, no scatter back
        from kernels_pallas.common import interpret_default
        from kernels_pallas.expert_rows import expert_rows

        rows = functools.partial(expert_rows, ids=idx.reshape(-1), interpret=interpret_default())
        # gate_up reads the token's one row for all k experts: [1, d] -> [k, 2F]
        y = _expert_mlp(x.astype(gate_up.dtype), functools.partial(rows, w=gate_up), functools.partial(rows, w=down),
                        limit)
        return jnp.einsum("kd,k->d", y, weights.reshape(-1))[None]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    xs = x[token].astype(gate_up.dtype)
    if use_kernel:
        from kernels_pallas.common import interpret_default
        from kernels_pallas.grouped_gemv import grouped_gemv
        from kernels_pallas.grouped_matmul import grouped_matmul

        matmul = functools.partial(grouped_gemv if T * k <= 3 * E else grouped_matmul, interpret=interpret_default())
    else:
        matmul = functools.partial(jax.lax.ragged_dot_general, ragged_dot_dimension_numbers=_RAGGED_DN,
                                   preferred_element_type=jnp.float32)
    y = _expert_mlp(xs, lambda a: matmul(a, gate_up, group_sizes), lambda a: matmul(a, down, group_sizes), limit)
    y = y * weights.reshape(-1)[order][:, None]
    return jnp.zeros((T, x.shape[-1]), jnp.float32).at[token].add(y)


def _expert_mlp(xs, up, down, limit):
    """The routed expert MLP in the weights' dtype xs: ``up`` -> [..., 2F] (gate | up halves), the clamped
    SwiGLU in fp32, cast back to xs' dtype, ``down`` -> [..., d]; returns fp32."""
    h = up(xs).astype(jnp.float32)
    F = h.shape[-1] // 2
    return down(clamped_swiglu(h[..., :F], h[..., F:], limit).astype(xs.dtype)).astype(jnp.float32)


def _gathered_experts(x, idx, weights, gate_up, down, limit):
    y = _expert_mlp(x.astype(gate_up.dtype),
                    lambda a: jnp.einsum("td,tkfd->tkf", a, gate_up[idx], preferred_element_type=jnp.float32),
                    lambda h: jnp.einsum("tkf,tkdf->tkd", h, down[idx], preferred_element_type=jnp.float32), limit)
    return jnp.einsum("tkd,tk->td", y, weights)


class Router(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, is_hash: bool, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.is_hash = is_hash
        self.weight = param(0.02 * jax.random.normal(rngs.params(), (cfg.n_routed_experts, cfg.hidden_size)),
                            ("experts", "embed"), Storage.MODEL, dtype)
        if is_hash:
            perm = jax.vmap(lambda k: jax.random.permutation(k, cfg.n_routed_experts)[: cfg.num_experts_per_tok])
            self.tid2eid = param(perm(jax.random.split(rngs.params(), cfg.vocab_size)), ("vocab", "topk"),
                                 Storage.INT32, kind=Buffer)
        else:
            self.e_score_correction_bias = param(jnp.zeros((cfg.n_routed_experts,), jnp.float32), ("experts",),
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
        self.gate_up_proj = param(0.02 * jax.random.normal(rngs.params(), (E, 2 * F, d)), ("experts", "mlp", "embed"),
                                  Storage.FP4, dtype)
        self.down_proj = param(0.02 * jax.random.normal(rngs.params(), (E, d, F)), ("experts", "embed", "mlp"),
                               Storage.FP4, dtype)

    def __call__(self, x, idx, weights, kernels: str = "xla"):
        return routed_experts(x, idx, weights, self.gate_up_proj[...], self.down_proj[...], self.limit, kernels)


class SharedExpert(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, *, dtype, rngs: nnx.Rngs):
        d, F = cfg.hidden_size, cfg.moe_intermediate_size
        self.limit = cfg.swiglu_limit
        fp8 = dict(storage=Storage.FP8, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear(d, F, axes=("mlp", "embed"), **fp8)
        self.up_proj = Linear(d, F, axes=("mlp", "embed"), **fp8)
        self.down_proj = Linear(F, d, axes=("embed", "mlp"), **fp8)

    def __call__(self, x):
        h = clamped_swiglu(self.gate_proj(x, jnp.float32), self.up_proj(x, jnp.float32), self.limit)
        return self.down_proj(h.astype(x.dtype), jnp.float32)


class MoE(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, layer: int, *, dtype, rngs: nnx.Rngs):
        self.gate = Router(cfg, cfg.mlp_layer_types[layer] == HASH_MOE, dtype=dtype, rngs=rngs)
        self.experts = Experts(cfg, dtype=dtype, rngs=rngs)
        self.shared_experts = SharedExpert(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, token_ids: jax.Array, kernels: str = "xla") -> jax.Array:
        """x [B, C, d], token_ids [B, C] -> [B, C, d]."""
        B, C, d = x.shape
        flat = x.reshape(B * C, d)
        weights, idx = self.gate(flat, token_ids.reshape(-1))
        out = self.experts(flat, idx, weights, kernels) + self.shared_experts(flat)
        return out.astype(x.dtype).reshape(B, C, d)
