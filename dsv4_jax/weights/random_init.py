"""Random weights at any size (benchmarks, GPU checks): one jitted draw per tensor, straight in the
parameter dtype, so a Flash-width model never needs an fp32 copy of its largest tensors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .params import abstract_model, param_table
from ..model.config import DeepseekV4Config
from ..model.transformer import DeepseekV4ForCausalLM


def random_model(cfg: DeepseekV4Config, dtype=jnp.bfloat16, seed: int = 0) -> DeepseekV4ForCausalLM:
    """Matrices ~ N(0, 1/fan_in), norms and mHC scales 1, other vectors ~ N(0, 0.1), random hash table."""
    model = abstract_model(cfg, dtype)
    key = jax.random.PRNGKey(seed)
    for i, (name, var) in enumerate(sorted(param_table(model).items())):
        want = var.get_value()
        shape, dt = tuple(want.shape), want.dtype
        k = jax.random.fold_in(key, i)
        if name.endswith("tid2eid"):
            value = jax.jit(lambda k: jax.random.randint(k, shape, 0, cfg.n_routed_experts, jnp.int32))(k)
        elif "norm" in name or name.endswith(("hc.scale", "hc_scale")):
            value = jnp.ones(shape, dt)
        else:
            std = 1.0 / np.sqrt(shape[-1]) if len(shape) > 1 else 0.1
            value = jax.jit(lambda k: (std * jax.random.normal(k, shape, dt)).astype(dt))(k)
        var.set_value(value)
    return model
