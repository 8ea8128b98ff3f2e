"""Training: next-token cross-entropy over the stateless forward, AdamW with warmup + cosine decay and
global-norm clipping (optax), bf16 compute over fp32 master weights, and DeepSeek's auxiliary-loss-free
load balancing (each learned router's selection bias follows its experts' load; no gradient touches it).

The train state holds the fp32 parameters, the buffers (hash tables, routing biases) and the optimizer
state. A step casts the parameters to the dtypes the model has at the compute dtype (matrices bf16;
norms, mHC, sinks and position biases stay fp32, as in a bf16 checkpoint), runs the unchanged forward,
takes the loss in fp32, and differentiates with respect to the fp32 parameters.

The MTP block (model/mtp.py) trains alone on a trained trunk (``make_mtp_train_step``): the trunk's parameters,
the embedding and head it shares included, are an input of the step and never change.
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
from ..model.mtp import DeepseekV4WithMTP, stateless_mtp_forward
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


# ----- the MTP block, trained alone on a frozen trunk ----------------------------------------------------------
MTP_PARAMS = nnx.All(nnx.Param, nnx.PathContains("mtp"))  # the block's own parameters (model.mtp.0.*)


def split_mtp_model(model: DeepseekV4WithMTP):
    """-> (graphdef, the MTP block's parameters, every other parameter (the trunk, with the embedding and head
    the block shares), buffers)."""
    return nnx.split(model, MTP_PARAMS, nnx.Param, ...)


def mtp_view(cfg: DeepseekV4Config, dtype):
    """(graphdef of the model with its MTP block at ``dtype``, the dtypes of its block's and its trunk's parameters
    as trees like them)."""
    graphdef, block, trunk, _ = split_mtp_model(abstract_model(cfg, dtype, mtp=True))
    return graphdef, jax.tree.map(lambda p: p.dtype, block), jax.tree.map(lambda p: p.dtype, trunk)


def init_mtp_state(model: DeepseekV4WithMTP, optimizer: optax.GradientTransformation) -> tuple[TrainState, nnx.State]:
    """(the train state of ``model``'s MTP block, the frozen trunk's fp32 parameters) for a model built in fp32."""
    _, block, trunk, buffers = split_mtp_model(model)
    return TrainState(block, buffers, optimizer.init(block), jnp.zeros((), jnp.int32)), trunk


def mtp_state_model(cfg: DeepseekV4Config, state: TrainState, trunk: nnx.State) -> DeepseekV4WithMTP:
    """The fp32 model (trunk and trained block) an MTP train state and its trunk hold, for inference or export."""
    graphdef, _, _ = mtp_view(cfg, jnp.float32)
    return nnx.merge(graphdef, state.params, trunk, state.buffers)


def mtp_forward_with_routing(model: DeepseekV4WithMTP, ids: jax.Array):
    """ids [B, S] -> (the MTP block's logits [B, S, V] fp32, the picked experts of its router [B, S, k]): at
    position t the block reads the main model's streams and token t + 1 (teacher forcing) and predicts token t + 2.
    Captured as ``forward_with_routing`` does."""
    B, S = ids.shape
    next_ids = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))  # the last position's is never scored
    (_, logits), captured = nnx.capture(stateless_mtp_forward, nnx.Intermediate, method_outputs=nnx.Intermediate)(
        model, ids, next_ids)
    (_, idx), = captured["model"]["mtp"][0]["mlp"]["gate"]["__call__"].get_value()
    return logits, idx.reshape(B, -1, idx.shape[-1])[:, :S]


def mtp_loss(logits: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting ids[:, t+2] from position t (logits [B, S, V], ids and mask [B, S]), over
    positions whose three tokens are real -> fp32 scalar."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-2].astype(jnp.float32), ids[:, 2:])
    weight = (mask[:, :-2] * mask[:, 1:-1] * mask[:, 2:]).astype(jnp.float32)
    return jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def make_mtp_train_step(cfg: DeepseekV4Config, tc: TrainConfig) -> Callable:
    """-> step(state, trunk, ids [B, S], mask [B, S]) -> (new state, metrics), as ``make_train_step`` but training
    the MTP block alone (``init_mtp_state``): ``trunk`` (the main model's parameters, with the embedding and head)
    is an input, never updated, so the main model's tokens stay as they are. Its router's selection bias follows
    its experts' load; metrics' expert_load is [1, E]."""
    graphdef, block_dtypes, trunk_dtypes = mtp_view(cfg, jnp.dtype(tc.compute_dtype))
    optimizer, schedule = make_optimizer(tc), lr_schedule(tc)

    def loss(block, trunk, buffers, ids, mask):
        model = nnx.merge(graphdef, cast_params(block, block_dtypes), cast_params(trunk, trunk_dtypes), buffers)
        logits, idx = mtp_forward_with_routing(model, ids)
        return mtp_loss(logits, ids, mask), idx

    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def step(state: TrainState, trunk, ids, mask):
        (value, idx), grads = grad_fn(state.params, trunk, state.buffers, ids, mask)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        load = expert_load(idx, mask, cfg.n_routed_experts)
        model = mtp_state_model(cfg, state, trunk)
        bias = model.model.mtp[0].mlp.gate.e_score_correction_bias
        bias.set_value(balance_router_bias(bias.get_value(), load, tc.router_bias_rate))
        metrics = dict(loss=value, grad_norm=optax.tree.norm(grads), lr=schedule(state.step), expert_load=load[None])
        return TrainState(optax.apply_updates(state.params, updates), split_mtp_model(model)[3], opt_state,
                          state.step + 1), metrics

    return jax.jit(step, donate_argnums=0)


def make_mtp_eval(cfg: DeepseekV4Config, tc: TrainConfig) -> Callable:
    """-> eval(state, trunk, ids [B, S], mask [B, S]) -> (the block's loss, the fraction of positions where its
    argmax equals the main model's argmax one position on: a greedy draft's teacher-forced acceptance), jitted."""
    graphdef, block_dtypes, trunk_dtypes = mtp_view(cfg, jnp.dtype(tc.compute_dtype))

    def evaluate(state: TrainState, trunk, ids, mask):
        model = nnx.merge(graphdef, cast_params(state.params, block_dtypes), cast_params(trunk, trunk_dtypes),
                          state.buffers)
        logits, mtp = stateless_mtp_forward(model, ids, jnp.pad(ids[:, 1:], ((0, 0), (0, 1))))
        weight = (mask[:, :-2] * mask[:, 1:-1] * mask[:, 2:]).astype(jnp.float32)
        agree = (jnp.argmax(mtp[:, :-2], -1) == jnp.argmax(logits[:, 1:-1], -1)).astype(jnp.float32)
        return mtp_loss(mtp, ids, mask), jnp.sum(agree * weight) / jnp.maximum(jnp.sum(weight), 1.0)

    return jax.jit(evaluate)
