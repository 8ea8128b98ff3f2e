"""Random weights at any size (benchmarks, GPU checks), one jitted draw per tensor.

``random_model``: the model in its own dtype, each tensor drawn straight in the parameter dtype, so a
Flash-width model never needs an fp32 copy of its largest tensors.

``released_params``: every parameter as DeepSeek's release stores it (spec §11.1), drawn and quantised on the
device, for models larger than a disk could hold as a checkpoint; ``released_model``: the model holding them
(FP8 / FP4 weights as QuantArrays); ``scripts/make_checkpoint.py`` writes the same
pieces (``released_piece``) as a released-format checkpoint, quantised by quantization.py's jax quantisers at
device speed.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from . import quantization
from .params import abstract_model, param_table
from .quant_array import QuantArray
from ..model.config import DeepseekV4Config
from ..model.spec import Storage, storage_of
from ..model.transformer import DeepseekV4ForCausalLM

HASH, ONES, NORMAL = "hash", "ones", "normal"
# How the release stores a parameter: FP8 / FP4 block-scaled, bf16, fp32, integer (int64 in the file).
FP8, FP4, BF16, FP32, INT = "fp8", "fp4", "bf16", "fp32", "int"


def init_rule(name: str) -> str:
    """A parameter's distribution: HASH (the hash router's table), ONES (norms, mHC scales) or NORMAL."""
    if name.endswith("tid2eid"):
        return HASH
    return ONES if "norm" in name or name.endswith(("hc.scale", "hc_scale")) else NORMAL


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _draw(key: jax.Array, rule: str, shape: tuple[int, ...], dtype, n_experts: int) -> jax.Array:
    """Matrices ~ N(0, 1/fan_in), vectors ~ N(0, 0.1), ones for ONES, a table of expert ids in [0, n_experts)
    (int32) for HASH; ``shape`` [..., fan_in]."""
    if rule == HASH:
        return jax.random.randint(key, shape, 0, n_experts, jnp.int32)
    if rule == ONES:
        return jnp.ones(shape, dtype)
    std = 1.0 / np.sqrt(shape[-1]) if len(shape) > 1 else 0.1
    return (std * jax.random.normal(key, shape, dtype)).astype(dtype)


def random_model(cfg: DeepseekV4Config, dtype=jnp.bfloat16, seed: int = 0, mtp: bool = False) -> DeepseekV4ForCausalLM:
    """Every parameter drawn by its ``init_rule`` in its own dtype; ``mtp``: with the MTP block."""
    model = abstract_model(cfg, dtype, mtp)
    key = jax.random.PRNGKey(seed)
    for i, (name, var) in enumerate(sorted(param_table(model).items())):
        want = var.get_value()
        var.set_value(_draw(jax.random.fold_in(key, i), init_rule(name), tuple(want.shape), want.dtype,
                            cfg.n_routed_experts))
    return model


# ----- released precision --------------------------------------------------------------------------------------

def released_kind(name: str, storage: Storage) -> str:
    """How the release stores a parameter: its FP8 / FP4 storage as such, norm weights in bf16 (the model holds
    them in fp32), the rest of the fp32 ones in fp32, integer tables as INT, the model-dtype ones in bf16."""
    if storage is Storage.FP32:
        return BF16 if name.endswith("norm.weight") else FP32
    return {Storage.FP8: FP8, Storage.FP4: FP4, Storage.INT32: INT, Storage.MODEL: BF16}[storage]


def param_key(seed: int, name: str) -> jax.Array:
    """The key of one parameter's draw, from its canonical name: a model truncated to its first layers draws
    them as the whole model does."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()))


def released_draw(key: jax.Array, name: str, shape: tuple[int, ...], n_experts: int) -> jax.Array:
    """The values of one released tensor before it is stored: fp32 (int32 for the hash table) [out, in] or
    [n]. A stacked expert parameter [E, out, in] is drawn one expert at a time: expert e's matrix is
    ``released_draw(fold_in(param_key(seed, name), e), name, (out, in), ...)``."""
    return _draw(key, init_rule(name), tuple(shape), jnp.float32, n_experts)


@functools.partial(jax.jit, static_argnums=0)
def _stored_on_device(kind: str, values: jax.Array):
    """Drawn values -> the released form: (codes, scales) for FP8 / FP4, else the array in its dtype."""
    if kind == FP8:
        return quantization.quantise_fp8_blocks(values)
    if kind == FP4:
        return quantization.quantise_fp4(values)
    return values.astype({BF16: jnp.bfloat16, FP32: jnp.float32, INT: jnp.int32}[kind])


@functools.partial(jax.jit, donate_argnums=0)
def _put(stack, index: int, value):
    """Each leaf: stack [E, ...] (donated, so updated in place) with stack[index] = value."""
    return jax.tree.map(lambda s, v: jax.lax.dynamic_update_index_in_dim(s, v, index, 0), stack, value)


def released_piece(key: jax.Array, name: str, shape: tuple[int, ...], kind: str, n_experts: int):
    """One parameter, or one expert's matrix [out, in] of a stacked one, drawn (``released_draw``) and stored as
    ``kind`` (``released_kind``) on the default device: (codes, scales) for FP8 / FP4, else one array."""
    return _stored_on_device(kind, released_draw(key, name, shape, n_experts))


def _released_param(key: jax.Array, name: str, shape: tuple[int, ...], kind: str, n_experts: int):
    """``released_piece`` of a whole parameter; a stacked [E, out, in] one expert at a time, each written into
    the stack in place, so one expert's fp32 draw is live at a time."""
    if len(shape) < 3:
        return released_piece(key, name, shape, kind, n_experts)
    stack = None
    for e in range(shape[0]):
        value = released_piece(jax.random.fold_in(key, e), name, shape[1:], kind, n_experts)
        if stack is None:  # a placeholder (NaN in ue8m0) that the loop overwrites
            stack = jax.tree.map(lambda v: jnp.zeros((shape[0], *v.shape), v.dtype), value)
        stack = _put(stack, e, value)
    return stack


def released_model(cfg: DeepseekV4Config, dtype=jnp.bfloat16, seed: int = 0, mtp: bool = False):
    """The model in released precision (``params.abstract_model(released=True)``) holding ``released_params``:
    what ``from_pretrained`` gives for the checkpoint ``scripts/make_checkpoint.py`` writes for ``seed``."""
    model = abstract_model(cfg, dtype, mtp, released=True)
    params = released_params(cfg, seed, mtp)
    for name, var in param_table(model).items():
        value = params.pop(name)
        var.set_value(value if isinstance(value, QuantArray) else value.astype(var.get_value().dtype))
    return model


def released_params(cfg: DeepseekV4Config, seed: int = 0, mtp: bool = False) -> dict[str, QuantArray | jax.Array]:
    """Canonical name -> the parameter as the release stores it, on the default device, with no file: FP8
    linears and FP4 experts (stacked [E, ...]) as QuantArrays, the rest as ``released_kind`` says (the hash
    table int32, int64 in a file). The same values as ``scripts/make_checkpoint.py`` writes for ``seed`` on the
    same kind of device; ``mtp``: with the multi-token-prediction block (model.mtp.0.*)."""
    out = {}
    for name, var in param_table(abstract_model(cfg, jnp.bfloat16, mtp)).items():
        kind = released_kind(name, storage_of(var))
        value = _released_param(param_key(seed, name), name, tuple(var.get_value().shape), kind, cfg.n_routed_experts)
        out[name] = {FP8: QuantArray.fp8, FP4: QuantArray.fp4}[kind](*value) if kind in (FP8, FP4) else value
    return out
