"""Training: next-token cross-entropy over the stateless forward, AdamW with warmup + cosine decay and
global-norm clipping (optax), bf16 compute over fp32 master weights, and DeepSeek's auxiliary-loss-free
load balancing (each learned router's selection bias follows its experts' load; no gradient touches it).

The train state holds the fp32 parameters, the buffers (hash tables, routing biases) and the optimizer
state. A step casts the parameters to the dtypes the model has at the compute dtype (matrices bf16;
norms, mHC, sinks and position biases stay fp32, as in a bf16 checkpoint), runs the unchanged forward,
takes the loss in fp32, and differentiates with respect to the fp32 parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..weights.params import abstract_model, is_released
from ..model.config import MOE, DeepseekV4Config
from ..model.transformer import DeepseekV4ForCausalLM, stateless_forward


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int  # length of the learning-rate schedule
    learning_rate: float = 3e-3  # peak
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1  # the cosine decays to this fraction of the peak
    weight_decay: float = 0.1  # on matrices only
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0  # global gradient norm
    router_bias_rate: float = 1e-3  # gamma of the bias update (DeepSeek-V3 uses 1e-3)
    compute_dtype: str = "bfloat16"


class TrainState(NamedTuple):
    params: nnx.State  # the nnx.Param variables, fp32 master weights
    buffers: nnx.State  # everything else: hash tables and routing biases (not trained by gradients)
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: optimizer steps taken


def learned_moe_layers(cfg: DeepseekV4Config) -> tuple[int, ...]:
    """Layers whose router learns its top-k (and so has a selection bias); hash-routed layers have none."""
    return tuple(i for i, t in enumerate(cfg.mlp_layer_types) if t == MOE)


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to ``final_lr_fraction`` of it at ``steps``."""
    warmup = min(tc.warmup_steps, tc.steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, warmup, tc.steps,
                                              end_value=tc.learning_rate * tc.final_lr_fraction)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on matrices, not on vectors)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                       optax.adamw(lr_schedule(tc), tc.b1, tc.b2, weight_decay=tc.weight_decay, mask=decay_mask))


def split_model(model: DeepseekV4ForCausalLM):
    """-> (graphdef, params, buffers): the nnx.Param variables apart from everything else."""
    return nnx.split(model, nnx.Param, ...)


def init_state(model: DeepseekV4ForCausalLM, optimizer: optax.GradientTransformation) -> TrainState:
    """The train state of a model built in fp32 (its parameters become the master weights)."""
    if is_released(model):
        raise ValueError("training needs plain weights, not released FP8 / FP4 ones: load with dequantize=True "
                         "(or train weights.params.dequantized(model))")
    _, params, buffers = split_model(model)
    return TrainState(params, buffers, optimizer.init(params), jnp.zeros((), jnp.int32))


def state_model(cfg: DeepseekV4Config, state: TrainState, dtype=jnp.float32) -> DeepseekV4ForCausalLM:
    """The model a train state holds (fp32 by default), ready for inference or export."""
    graphdef, dtypes = compute_view(cfg, dtype)
    return nnx.merge(graphdef, cast_params(state.params, dtypes), state.buffers)


def compute_view(cfg: DeepseekV4Config, dtype):
    """(graphdef of the model at ``dtype``, the dtype of each of its parameters as a tree like params)."""
    graphdef, params, _ = split_model(abstract_model(cfg, dtype))
    return graphdef, jax.tree.map(lambda p: p.dtype, params)


def cast_params(params: nnx.State, dtypes) -> nnx.State:
    return jax.tree.map(lambda p, dt: p.astype(dt), params, dtypes)


def forward_with_routing(model: DeepseekV4ForCausalLM, ids: jax.Array):
    """ids [B, S] -> (logits [B, S, V] fp32, {learned-MoE layer: picked expert ids [B, S, k]}).

    The stateless forward runs unchanged under ``nnx.capture``, which hands back what each router
    returned as a value (as ``introspect.trace_forward`` does); nothing is added to the forward.
    """
    B, S = ids.shape
    logits, captured = nnx.capture(stateless_forward, nnx.Intermediate, method_outputs=nnx.Intermediate)(model, ids)
    routing = {}
    for layer in learned_moe_layers(model.config):
        (_, idx), = captured["model"]["layers"][layer]["mlp"]["gate"]["__call__"].get_value()  # one call
        routing[layer] = idx.reshape(B, -1, idx.shape[-1])[:, :S]  # drop the forward's chunk padding
    return logits, routing


def next_token_loss(logits: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting ids[:, t+1] from position t, over pairs whose two tokens are real.

    logits [B, S, V]; ids [B, S] int; mask [B, S] (1 = real token, 0 = padding) -> fp32 scalar.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:])
    weight = (mask[:, :-1] * mask[:, 1:]).astype(jnp.float32)
    return jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def expert_load(idx: jax.Array, mask: jax.Array, n_experts: int) -> jax.Array:
    """idx [B, S, k] picked experts, mask [B, S] -> [E] fp32: how many real-token slots each expert got."""
    picks = jax.nn.one_hot(idx, n_experts, dtype=jnp.float32) * mask[..., None, None].astype(jnp.float32)
    return jnp.sum(picks, axis=(0, 1, 2))


def balance_router_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """Auxiliary-loss-free balancing: bias_e += rate * sign(mean load - load_e); bias, load [E]."""
    return bias + rate * jnp.sign(jnp.mean(load) - load)


def router_loads(routing: dict, mask: jax.Array, n_experts: int) -> dict:
    """{layer: expert ids [B, S, k]} (``forward_with_routing``) -> {layer: real-token load [E]}."""
    return {layer: expert_load(idx, mask, n_experts) for layer, idx in routing.items()}


def update_router_biases(model: DeepseekV4ForCausalLM, loads: dict, rate: float) -> None:
    """Move each learned router's bias by its load ({layer: [E]}); sets the bias variables of ``model``."""
    for layer, load in loads.items():
        bias = model.model.layers[layer].mlp.gate.e_score_correction_bias
        bias.set_value(balance_router_bias(bias.get_value(), load, rate))


def loss_and_routing(params: nnx.State, buffers: nnx.State, ids: jax.Array, mask: jax.Array, *, graphdef, dtypes):
    """Forward at the compute dtypes (``compute_view``) -> (next-token loss, routing)."""
    logits, routing = forward_with_routing(nnx.merge(graphdef, cast_params(params, dtypes), buffers), ids)
    return next_token_loss(logits, ids, mask), routing


def make_train_step(cfg: DeepseekV4Config, tc: TrainConfig) -> Callable:
    """-> step(state, ids [B, S], mask [B, S]) -> (new state, metrics); jitted, ``state`` donated.

    metrics: loss (before the update), grad_norm (before clipping), lr, and expert_load [L_moe, E]
    (the batch's real-token load of each learned-MoE layer, in ``learned_moe_layers`` order).
    """
    graphdef, dtypes = compute_view(cfg, jnp.dtype(tc.compute_dtype))
    master_graphdef, _ = compute_view(cfg, jnp.float32)
    optimizer, schedule = make_optimizer(tc), lr_schedule(tc)
    grad_fn = jax.value_and_grad(loss_and_routing, has_aux=True)

    def step(state: TrainState, ids, mask):
        (loss, routing), grads = grad_fn(state.params, state.buffers, ids, mask, graphdef=graphdef, dtypes=dtypes)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loads = router_loads(routing, mask, cfg.n_routed_experts)
        model = nnx.merge(master_graphdef, state.params, state.buffers)
        update_router_biases(model, loads, tc.router_bias_rate)
        _, _, buffers = split_model(model)
        load_table = jnp.stack([loads[i] for i in sorted(loads)]) if loads else jnp.zeros((0, cfg.n_routed_experts))
        metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state.step), expert_load=load_table)
        return TrainState(params, buffers, opt_state, state.step + 1), metrics

    return jax.jit(step, donate_argnums=0)


def make_eval_loss(cfg: DeepseekV4Config, tc: TrainConfig) -> Callable:
    """-> eval_loss(state, ids [B, S], mask [B, S]) -> next-token loss at the compute dtype (jitted)."""
    graphdef, dtypes = compute_view(cfg, jnp.dtype(tc.compute_dtype))

    def eval_loss(state: TrainState, ids, mask):
        model = nnx.merge(graphdef, cast_params(state.params, dtypes), state.buffers)
        return next_token_loss(stateless_forward(model, ids), ids, mask)

    return jax.jit(eval_loss)
