"""The model a checkpoint fills: its config (a directory's config.json), dtype, abstract model (shapes only)
and parameter table (canonical name -> nnx variable, each declaring its logical axes and storage); and a
model's weights in released precision or dequantised."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from . import quantization
from .errors import CheckpointError
from .quant_array import QuantArray
from ..model.config import ConfigError, DeepseekV4Config
from ..model.mtp import DeepseekV4WithMTP
from ..model.spec import Storage, storage_of
from ..model.transformer import DeepseekV4ForCausalLM

# The block each quantised storage is released in (quantization.py)
RELEASED_BLOCKS = {Storage.FP8: quantization.FP8_BLOCK_SHAPE, Storage.FP4: quantization.FP4_BLOCK_SHAPE}


def model_dtype(name: str):
    """A model dtype by name ('bfloat16' / 'bf16', 'float32' / 'fp32')."""
    dtypes = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32}
    if name not in dtypes:
        raise ValueError(f"dtype {name!r} is not supported; expected 'bfloat16' or 'float32'")
    return dtypes[name]


def abstract_model(cfg: DeepseekV4Config, dtype, mtp: bool = False, released: bool = False) -> DeepseekV4ForCausalLM:
    """The model's structure with ShapeDtypeStruct leaves: no memory, no initialisation work.
    ``mtp``: with the multi-token-prediction block (mtp.DeepseekV4WithMTP); ``released``: FP8 / FP4 weights
    held as released, QuantArrays of codes and scales (else in ``dtype``)."""
    cls = DeepseekV4WithMTP if mtp else DeepseekV4ForCausalLM
    model = nnx.eval_shape(lambda: cls(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    if released:
        for var in param_table(model).values():
            if storage_of(var) in RELEASED_BLOCKS:
                var.set_value(QuantArray.abstract(var.get_value().shape, RELEASED_BLOCKS[storage_of(var)]))
    return model


def dequantized(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` whose QuantArray weights are dequantised to the model dtype (exact); the other
    arrays are shared, not copied. The reference the released-precision path is tested against."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda v: v.dequantize(model.dtype) if isinstance(v, QuantArray) else v, state,
                         is_leaf=lambda v: isinstance(v, QuantArray))
    return nnx.merge(graphdef, state)


def is_released(model: nnx.Module) -> bool:
    """Whether any weight of ``model`` is held in released precision (a QuantArray)."""
    return any(isinstance(var.get_value(), QuantArray) for var in param_table(model).values())


def param_table(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Canonical name -> variable, e.g. ``model.layers.0.self_attn.q_a_proj.weight`` (transformers' names)."""
    return {".".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model))}


def checkpoint_config(path) -> DeepseekV4Config:
    """The config of a checkpoint directory (cheap: reads config.json only)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"checkpoint directory {path} has no config.json")
    try:
        return DeepseekV4Config.from_json(config_file)
    except ConfigError as e:  # its message names the file
        raise CheckpointError(str(e)) from None


def checkpoint_dtype(path) -> str:
    """The model dtype of ``dtype="auto"``: the one config.json states (``dtype``, or transformers' older
    ``torch_dtype``), as transformers reads it: "float32" for float32, else "bfloat16" (the released FP8 / FP4
    checkpoints state bfloat16); "bfloat16" where it states none."""
    checkpoint_config(path)  # the directory and its config.json exist and parse
    d = json.loads((Path(path) / "config.json").read_text())
    stated = d.get("dtype") or d.get("torch_dtype")
    return "float32" if stated in ("float32", "fp32") else "bfloat16"
