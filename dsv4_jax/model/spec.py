"""What every parameter and cache field declares: its logical axes and (parameters) its storage precision.

A parameter is built once, by ``param``, with one logical-axis name per dimension (``("vocab",
"embed")``, ``("experts", "mlp", "embed")``) and a ``Storage``; both ride on the nnx variable as
metadata, so the abstract model (``nnx.eval_shape``) carries them at no cost. A cache field declares
its axes on the dataclass field (``axes_field``). The names are the fields of
``dsv4_jax.weights.sharding.ShardingRules``, which maps them to mesh axes; nothing here knows a mesh.

Own metadata keys rather than flax's ``out_sharding``: flax shards a variable carrying that key as it is
created (so a mesh must exist then) and resolves logical names through a global rules context, whereas
here placement is decided once, by the loader, from an explicit ShardingRules.
"""

from __future__ import annotations

import dataclasses
import enum

import jax.numpy as jnp
from flax import nnx

AXES = "axes"  # metadata key of a variable or a dataclass field: its logical axes, one name per dimension
STORAGE = "storage"  # metadata key of a variable: its Storage


class Storage(enum.Enum):
    """A parameter's storage precision: how DeepSeek's release stores it (spec §11.1) and what the model holds."""

    MODEL = "model"  # bf16 in the release; held in the model dtype (bf16 or fp32)
    FP32 = "fp32"  # held in fp32 whatever the model dtype (norms, mHC, sinks, position and routing biases)
    INT32 = "int32"  # integer tables (the hash router's token -> experts; int64 in the release)
    # The quantised two are held as released (a weights.quant_array.QuantArray of codes and scales), or
    # dequantised in the model dtype (``dequantize=True``); ``dtype`` is then what they dequantise to.
    FP8 = "fp8"  # e4m3 with one ue8m0 scale per 128 x 128 block in the release
    FP4 = "fp4"  # e2m1 packed two per byte, one ue8m0 scale per 1 x 32 block

    def dtype(self, model_dtype=None) -> jnp.dtype:
        """The dtype a parameter of this storage is held in by a model of ``model_dtype``."""
        if self is Storage.FP32:
            return jnp.dtype(jnp.float32)
        if self is Storage.INT32:
            return jnp.dtype(jnp.int32)
        if model_dtype is None:
            raise ValueError(f"a parameter stored as {self.name} is held in the model dtype; pass it (dtype=...)")
        return jnp.dtype(model_dtype)


def param(value, axes: tuple[str, ...], storage: Storage, dtype=None, *, kind=nnx.Param) -> nnx.Variable:
    """``value`` cast to ``storage``'s dtype (``dtype``: the model dtype) as a ``kind`` variable (nnx.Param, or
    a non-trained layers.Buffer) declaring ``axes`` (one logical axis per dimension) and ``storage``."""
    axes = tuple(axes)
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {axes} name {len(axes)} dimensions but the value has shape {value.shape}")
    return kind(value.astype(storage.dtype(dtype)), **{AXES: axes, STORAGE: storage})


def axes_of(var: nnx.Variable) -> tuple[str, ...]:
    """The logical axes a variable was declared with (``param``)."""
    return var.get_metadata(AXES)


def storage_of(var: nnx.Variable) -> Storage:
    """The storage precision a variable was declared with (``param``)."""
    return var.get_metadata(STORAGE)


def axes_field(*axes: str, default=dataclasses.MISSING):
    """A dataclass field (of a cache pytree) declaring the logical axes of the array it holds."""
    return dataclasses.field(default=default, metadata={AXES: axes})


def field_axes(cls) -> dict[str, tuple[str, ...]]:
    """Field name -> logical axes, for the fields of dataclass ``cls`` that hold an array (``axes_field``)."""
    return {f.name: f.metadata[AXES] for f in dataclasses.fields(cls) if AXES in f.metadata}
