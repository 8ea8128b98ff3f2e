"""Basic building blocks: linear layers, RMS norms, and the non-trained ``Buffer`` variable.

Weights keep the Hugging Face layout ``[out, in]`` so checkpoint import is a name lookup,
and ``x @ W^T`` is one ``dot_general`` (XLA contracts the stored layout without a copy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..ops.dense import linear, rms_norm, row_parallel_linear
from .spec import Storage, param


class Buffer(nnx.Variable):
    """Checkpointed state that gradients do not train (hash table, routing bias)."""


def _normal(rngs: nnx.Rngs, shape, std=0.02):
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class Linear(nnx.Module):
    """``axes``: the weight's logical axes, [out, in] (model/spec.py); ``storage``: its storage precision.
    ``row_parallel``: the input dimension may be split over tensor-parallel devices, whose partial products
    are summed (ops.dense.row_parallel_linear)."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], storage: Storage, dtype,
                 rngs: nnx.Rngs, row_parallel: bool = False):
        self.weight = param(_normal(rngs, (out_features, in_features)), axes, storage, dtype)
        self.row_parallel = row_parallel

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        return (row_parallel_linear if self.row_parallel else linear)(x, self.weight.get_value(), out_dtype)


class RMSNorm(nnx.Module):
    """Weighted RMSNorm; the weight is held in fp32 whatever the model dtype (checkpoints store bf16).
    ``axis``: the logical axis of the normed dimension (model/spec.py)."""

    def __init__(self, size: int, eps: float, axis: str):
        self.weight = param(jnp.ones((size,)), (axis,), Storage.FP32)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)
