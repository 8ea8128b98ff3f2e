"""Hugging Face format checkpoint import: ``config.json`` + one or many ``*.safetensors``.

Tensors are streamed one at a time (never the whole checkpoint in host memory), checked against the
shapes the config implies, cast to each parameter's dtype (the model dtype, or fp32 for norms, mHC,
sinks, position biases and the routing bias) and placed on the device.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from .config import ConfigError, DeepseekV4Config
from .model import DeepseekV4ForCausalLM

INDEX_FILE = "model.safetensors.index.json"
# Known tensors the model does not use: the multi-token-prediction block (not implemented yet) and
# RoPE frequency buffers some exporters write.
IGNORED_PREFIXES = ("mtp.", "model.mtp.")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A missing, unexpected, misshapen or unreadable checkpoint tensor or file."""


def _dtype(name: str):
    dtypes = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32}
    if name not in dtypes:
        raise ValueError(f"dtype {name!r} is not supported; expected 'bfloat16' or 'float32'")
    return dtypes[name]


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, from its index when there is one."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint index {index} is corrupt: {e}") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"checkpoint index {index} names {f.name}, which does not exist")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in checkpoint directory {path}")
    return files


def iter_tensors(files: list[Path]):
    """Yield (name, numpy array, file) one tensor at a time; unreadable files raise CheckpointError."""
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as handle:
                for name in handle.keys():
                    dtype = handle.get_slice(name).get_dtype()
                    if dtype.startswith(("F8", "F4", "E8", "F6")):
                        raise CheckpointError(f"tensor {name} in {f.name} has dtype {dtype}: FP8/FP4 quantised "
                                              "checkpoints are not supported yet; dequantise to bf16 or fp32 first")
                    yield name, handle.get_tensor(name), f
        except (SafetensorError, OSError, ValueError, AttributeError, TypeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"checkpoint file {f} is corrupt or unreadable: {e}") from None


def abstract_model(cfg: DeepseekV4Config, dtype) -> DeepseekV4ForCausalLM:
    """The model's structure with ShapeDtypeStruct leaves: no memory, no initialisation work."""
    return nnx.eval_shape(lambda: DeepseekV4ForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def param_table(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Canonical name -> variable, e.g. ``model.layers.0.self_attn.q_a_proj.weight`` (transformers' names)."""
    return {".".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model))}


# DeepSeek's official names (and the mixed spelling transformers' save_pretrained writes) -> canonical.
# Applied in order to the name without its leading "model."; mirrors transformers' conversion mapping.
_RENAMES = [(re.compile(p), r) for p, r in [
    (r"^embed\.weight$", "embed_tokens.weight"),
    (r"^head\.weight$", "lm_head.weight"),
    (r"^hc_head_(fn|base|scale)$", r"hc_head.hc_\1"),
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.self_attn\.indexer\.compressor\.", ".self_attn.compressor.indexer."),
    (r"\.self_attn\.indexer\.weights_proj\.", ".self_attn.compressor.indexer.scorer.weights_proj."),
    (r"\.self_attn\.indexer\.wq_b\.", ".self_attn.compressor.indexer.q_b_proj."),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
    (r"\.attn_sink$", ".sinks"),
    (r"^(layers\..*)\.norm\.", r"\1.kv_norm."),
    (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.wq_b\.", ".q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
]]
# One expert's matrix in a per-expert checkpoint -> (stacked parameter, expert, which part).
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.w([123])\.weight$")


def canonical_name(name: str) -> tuple[str, tuple[int, int] | None]:
    """Checkpoint tensor name -> (canonical parameter name, (expert, part) for per-expert tensors).

    part 1/3 are the gate/up halves of ``gate_up_proj[e]``, part 2 is ``down_proj[e]``.
    """
    s = name[len("model."):] if name.startswith("model.") else name
    for pattern, repl in _RENAMES:
        s = pattern.sub(repl, s)
    full = s if s.startswith("lm_head.") else "model." + s
    m = _EXPERT.match(full)
    if m:
        part = int(m.group(3))
        return f"{m.group(1)}.{'down_proj' if part == 2 else 'gate_up_proj'}", (int(m.group(2)), part)
    return full, None


def _is_quant_scale(name: str) -> bool:
    return name.endswith(("weight_scale_inv", ".weight.scale")) or (
        name.endswith(".scale") and not re.search(r"hc_(attn|ffn|head)_scale$|_hc\.scale$|hc_scale$", name))


@functools.partial(jax.jit, donate_argnums=0, static_argnums=2)
def _set_expert_slice(stacked, value, rows: tuple[int, int], expert):
    return jax.lax.dynamic_update_slice(stacked, value[None].astype(stacked.dtype), (expert, rows[0], 0))


def load_weights(model: nnx.Module, files: list[Path]) -> None:
    """Fill every variable of ``model`` (abstract or real) from ``files``; strict about names and shapes."""
    cfg = model.config
    table = param_table(model)
    loaded: set[str] = set()
    expert_parts: dict[str, set[tuple[int, int]]] = {}
    stacked: dict[str, jax.Array] = {}
    F = cfg.moe_intermediate_size
    for name, array, f in iter_tensors(files):
        if name.startswith(IGNORED_PREFIXES) or name.endswith(IGNORED_SUFFIXES):
            continue
        if _is_quant_scale(name):
            raise CheckpointError(f"tensor {name} in {f.name} is a quantisation scale: FP8/FP4 checkpoints "
                                  "are not supported yet; dequantise to bf16 or fp32 first")
        key, slot = canonical_name(name)
        var = table.get(key)
        if var is None:
            raise CheckpointError(f"unexpected tensor {name} {tuple(array.shape)} in {f.name}: "
                                  "the config has no such parameter")
        want = var.get_value()
        want_shape = tuple(want.shape) if slot is None else (
            tuple(want.shape[1:]) if slot[1] == 2 else (F, want.shape[2]))
        if tuple(array.shape) != want_shape:
            raise CheckpointError(
                f"tensor {name} has shape {tuple(array.shape)} in {f.name} but the config expects {want_shape}")
        if jnp.issubdtype(array.dtype, jnp.floating) and not np.isfinite(array.astype(np.float32)).all():
            raise CheckpointError(f"tensor {name} in {f.name} holds NaN or infinite values")
        if key.endswith("tid2eid") and (array.min() < 0 or array.max() >= cfg.n_routed_experts):
            raise CheckpointError(f"tensor {name} in {f.name} routes to expert {int(array.max())} or "
                                  f"{int(array.min())}, outside [0, {cfg.n_routed_experts})")
        if slot is None:
            if key in loaded:
                raise CheckpointError(f"tensor {name} appears twice (again in {f.name})")
            var.set_value(jax.device_put(jnp.asarray(array, dtype=want.dtype)))
            loaded.add(key)
            continue
        expert, part = slot
        if expert >= cfg.n_routed_experts:
            raise CheckpointError(f"unexpected tensor {name} in {f.name}: expert {expert} is outside "
                                  f"[0, {cfg.n_routed_experts})")
        parts = expert_parts.setdefault(key, set())
        if slot in parts:
            raise CheckpointError(f"tensor {name} appears twice (again in {f.name})")
        parts.add(slot)
        if key not in stacked:
            stacked[key] = jnp.zeros(want.shape, want.dtype)
        rows = (F, 2 * F) if part == 3 else (0, F if part == 1 else want.shape[1])
        stacked[key] = _set_expert_slice(stacked[key], jnp.asarray(array), rows, expert)
    for key, parts in expert_parts.items():
        if key in loaded:
            raise CheckpointError(f"{key} is given both stacked and as per-expert matrices")
        need = {(e, p) for e in range(cfg.n_routed_experts) for p in ((2,) if key.endswith("down_proj") else (1, 3))}
        if parts != need:
            e, p = min(need - parts)
            raise CheckpointError(f"checkpoint is missing tensor {key.rsplit('.', 1)[0]}.{e}.w{p}.weight "
                                  f"({len(need - parts)} expert matrices missing for {key})")
        table[key].set_value(stacked[key])
        loaded.add(key)
    missing = sorted(set(table) - loaded)
    if missing:
        shown = ", ".join(f"{n} {tuple(table[n].get_value().shape)}" for n in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {shown}{more}")


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
    except ConfigError as e:
        raise CheckpointError(f"{config_file}: {e}") from None


def from_pretrained(path, dtype: str = "bfloat16") -> DeepseekV4ForCausalLM:
    """Load a Hugging Face format DeepSeek-V4 directory and return the model (call it on input_ids)."""
    model = abstract_model(checkpoint_config(path), _dtype(dtype))
    load_weights(model, checkpoint_files(Path(path)))
    return model
