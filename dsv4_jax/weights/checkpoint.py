"""Hugging Face format checkpoint import: ``config.json`` + one or many ``*.safetensors``.

Tensors are streamed one at a time (never the whole checkpoint in host memory), checked against the
shapes the config implies, cast to each parameter's dtype (the model dtype, or fp32 for norms, mHC,
sinks, position biases and the routing bias) and placed on the device. DeepSeek's released formats
load as they are published: FP8 linears and FP4 experts are dequantised with their ue8m0 scales
(quantization.py), which may sit in another shard; the MTP block loads when asked for (``mtp=True``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from . import quantization
from ..model.config import ConfigError, DeepseekV4Config
from ..model.transformer import DeepseekV4ForCausalLM
from ..model.mtp import DeepseekV4WithMTP

INDEX_FILE = "model.safetensors.index.json"
# The multi-token-prediction block's tensors: loaded into a model built with it, skipped otherwise.
MTP_PREFIXES = ("mtp.", "model.mtp.")
# Known tensors the model does not use: RoPE frequency buffers some exporters write.
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


# safetensors dtype tag -> numpy dtype. FP8 and ue8m0 come from ml_dtypes (safetensors' numpy reader has no
# such dtypes, so every tensor is read from its bytes here). "F4" (torch's float4_e2m1fn_x2) holds the
# same packed bytes as the released int8 FP4 experts, with the logical (unpacked) shape in the header.
_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
           "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
           "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype(bool),
           "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
           "F4": np.dtype("i1")}
FP8_DTYPE = "F8_E4M3"
FP4_DTYPES = ("I8", "F4")  # released FP4 experts are int8; F4 is the same bytes under torch's float4 dtype
SCALE_DTYPES = ("F8_E8M0", "F32", "BF16")  # ue8m0 (DeepSeek); fp32 (transformers' weight_scale_inv)
_MAX_HEADER = 100 << 20


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor's entry in a safetensors header: where its bytes are and what they hold."""

    name: str
    file: Path
    dtype: str  # safetensors tag, e.g. "BF16", "F8_E4M3"
    shape: tuple[int, ...]  # as stored; for "F4" the logical shape (two values per byte)
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def packed_shape(self) -> tuple[int, ...]:
        """The shape of the bytes read back: F4's last axis holds two values per byte."""
        return (*self.shape[:-1], self.shape[-1] // 2) if self.dtype == "F4" else self.shape


def _corrupt(f: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint file {f} is corrupt or unreadable: {why}")


def read_header(f: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, from its header only (no tensor data is read)."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as handle:
            head = handle.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise _corrupt(f, f"header length {n} does not fit the file of {size} bytes")
            header = json.loads(handle.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(f, str(e)) from None
    if not isinstance(header, dict):
        raise _corrupt(f, "the header is not a JSON object")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(f, f"tensor {name} has a malformed header entry {entry!r}") from None
        t = StoredTensor(name, f, dtype, shape, 8 + n + int(start), 8 + n + int(end))
        if dtype not in _DTYPES:
            raise CheckpointError(f"tensor {name} in {f.name} has dtype {dtype}, which a DeepSeek-V4 checkpoint "
                                  f"does not use; expected one of {', '.join(_DTYPES)}")
        want = int(np.prod(t.packed_shape)) * _DTYPES[dtype].itemsize
        if t.end - t.start != want or t.end > size or t.start < 8 + n:
            raise _corrupt(f, f"tensor {name} {dtype}{list(shape)} claims bytes [{start}, {end}) of the data, "
                              f"which does not match its size {want} or lies outside the file")
        tensors[name] = t
    return tensors


def read_tensor(t: StoredTensor) -> np.ndarray:
    """The stored array of one tensor (F4: the packed int8 bytes [..., in/2])."""
    try:
        with open(t.file, "rb") as handle:
            handle.seek(t.start)
            data = handle.read(t.end - t.start)
    except OSError as e:
        raise _corrupt(t.file, str(e)) from None
    if len(data) != t.end - t.start:
        raise _corrupt(t.file, f"tensor {t.name} is cut short")
    return np.frombuffer(data, _DTYPES[t.dtype]).reshape(t.packed_shape)


def catalog(files: list[Path]) -> dict[str, StoredTensor]:
    """Every stored tensor of the checkpoint by name (headers only); a name stored twice is an error."""
    stored: dict[str, StoredTensor] = {}
    for f in files:
        for name, t in read_header(f).items():
            if name in stored:
                raise CheckpointError(f"tensor {name} appears twice (again in {f.name}, first in "
                                      f"{stored[name].file.name})")
            stored[name] = t
    return stored


def weight_of_scale(name: str) -> str | None:
    """The weight a quantisation scale belongs to, or None when ``name`` is not one.

    DeepSeek stores ``X.scale`` beside ``X.weight``; transformers appends ``_scale_inv`` to the weight's
    name (``X.weight_scale_inv``, ``experts.gate_up_proj_scale_inv``). mHC scales (``attn_hc.scale``,
    ``hc_attn_scale``) are parameters, not quantisation scales.
    """
    if name.endswith("_scale_inv"):
        return name[: -len("_scale_inv")]
    if name.endswith(".scale") and not name.endswith("_hc.scale"):
        return name[: -len(".scale")] + ".weight"
    return None


def _expected_scale_shape(w: StoredTensor) -> tuple[int, ...]:
    if w.dtype == FP8_DTYPE:
        return quantization.fp8_scale_shape(w.shape)
    logical = w.shape if w.dtype == "F4" else (*w.shape[:-1], 2 * w.shape[-1])
    if logical[-1] % quantization.FP4_BLOCK:
        raise CheckpointError(f"FP4 weight {w.name} in {w.file.name} has {logical[-1]} input columns, not a "
                              f"multiple of the {quantization.FP4_BLOCK}-column scale block")
    return quantization.fp4_scale_shape(logical)


def pair_scales(stored: dict[str, StoredTensor]) -> dict[str, StoredTensor]:
    """Quantised weight name -> its scale, checked from the headers before any data is read.

    Errors: a scale without its weight, a scale of an unquantised weight, two scales for one weight,
    a quantised weight without a scale, a scale of the wrong shape or dtype, ue8m0 bytes used as a weight.
    """
    scale_of: dict[str, StoredTensor] = {}
    for name, s in stored.items():
        weight = weight_of_scale(name)
        if weight is None:
            continue
        where = f"{name} in {s.file.name}"
        w = stored.get(weight)
        if w is None:
            raise CheckpointError(f"quantisation scale {where} has no weight {weight} in the checkpoint")
        if w.dtype != FP8_DTYPE and w.dtype not in FP4_DTYPES:
            raise CheckpointError(f"quantisation scale {where} belongs to {weight}, which is stored as {w.dtype}, "
                                  f"not quantised ({FP8_DTYPE} or FP4 {'/'.join(FP4_DTYPES)})")
        if weight in scale_of:
            raise CheckpointError(f"weight {weight} has two quantisation scales: {scale_of[weight].name} and {name}")
        if s.dtype not in SCALE_DTYPES:
            raise CheckpointError(f"quantisation scale {where} has dtype {s.dtype}; expected one of "
                                  f"{', '.join(SCALE_DTYPES)}")
        want = _expected_scale_shape(w)
        if s.shape != want:
            raise CheckpointError(f"quantisation scale {where} has shape {s.shape} but its {w.dtype} weight "
                                  f"{weight} {w.shape} needs {want}")
        scale_of[weight] = s
    for name, w in stored.items():
        if name in scale_of or weight_of_scale(name) is not None:
            continue
        if w.dtype == FP8_DTYPE or w.dtype in FP4_DTYPES:
            raise CheckpointError(f"quantised weight {name} ({w.dtype}) in {w.file.name} has no scale "
                                  f"({name.removesuffix('.weight')}.scale or {name}_scale_inv)")
        if w.dtype == "F8_E8M0":
            raise CheckpointError(f"tensor {name} in {w.file.name} has the scale dtype F8_E8M0 but is not named "
                                  "as a quantisation scale (X.scale or X.weight_scale_inv)")
    return scale_of


def iter_tensors(files: list[Path], skip=lambda name: False):
    """Yield (name, array, file) one stored tensor at a time, in file order, except names ``skip`` accepts.

    A quantised weight comes back dequantised (fp32, same [out, in] as the parameter), read together
    with its scale wherever that is stored; scales themselves are not yielded.
    """
    stored = {name: t for name, t in catalog(files).items() if not skip(name)}
    scale_of = pair_scales(stored)
    for name, t in stored.items():
        if weight_of_scale(name) is not None:
            continue
        array = read_tensor(t)
        if name in scale_of:
            scale = read_tensor(scale_of[name])
            if t.dtype == FP8_DTYPE:
                array = quantization.dequantise_fp8(array, scale)
            else:
                array = quantization.dequantise_fp4(array, scale)
        yield name, array, t.file


def abstract_model(cfg: DeepseekV4Config, dtype, mtp: bool = False) -> DeepseekV4ForCausalLM:
    """The model's structure with ShapeDtypeStruct leaves: no memory, no initialisation work.
    ``mtp``: with the multi-token-prediction block (mtp.DeepseekV4WithMTP)."""
    cls = DeepseekV4WithMTP if mtp else DeepseekV4ForCausalLM
    return nnx.eval_shape(lambda: cls(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def param_table(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Canonical name -> variable, e.g. ``model.layers.0.self_attn.q_a_proj.weight`` (transformers' names)."""
    return {".".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model))}


# DeepSeek's official names (and the mixed spelling transformers' save_pretrained writes) -> canonical.
# Applied in order to the name without its leading "model."; mirrors transformers' conversion mapping.
_RENAMES = [(re.compile(p), r) for p, r in [
    (r"^embed\.weight$", "embed_tokens.weight"),
    (r"^head\.weight$", "lm_head.weight"),
    (r"(^|\.)hc_head_(fn|base|scale)$", r"\1hc_head.hc_\2"),
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.self_attn\.indexer\.compressor\.", ".self_attn.compressor.indexer."),
    (r"\.self_attn\.indexer\.weights_proj\.", ".self_attn.compressor.indexer.scorer.weights_proj."),
    (r"\.self_attn\.indexer\.wq_b\.", ".self_attn.compressor.indexer.q_b_proj."),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
    (r"\.attn_sink$", ".sinks"),
    (r"^((?:layers|mtp)\.\d+\..+)\.norm\.", r"\1.kv_norm."),
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


@functools.partial(jax.jit, donate_argnums=0, static_argnums=2)
def _set_expert_slice(stacked, value, rows: tuple[int, int], expert):
    # auto_axes: on a mesh with explicit axes (jax.make_mesh's default) the one-expert update cannot carry
    # the stacked array's sharding (its expert dim may be split), so XLA places it; the result keeps
    # the stacked sharding.
    update = jax.sharding.auto_axes(
        lambda s, v: jax.lax.dynamic_update_slice(s, v[None].astype(s.dtype), (expert, rows[0], 0)),
        out_sharding=jax.typeof(stacked).sharding)
    return update(stacked, value)


def target_shardings(names_shapes: Mapping[str, tuple[int, ...]], sharding=None, mesh: Mesh | None = None,
                     spec: Callable[[str, tuple[int, ...]], PartitionSpec] | None = None) -> dict[str, Sharding]:
    """Canonical name -> sharding for every variable.

    ``sharding``: one Sharding for all, or {canonical name: Sharding} naming every variable; or ``mesh`` with
    ``spec(name, shape) -> PartitionSpec``; default: the default device.
    """
    if mesh is not None or spec is not None:
        if mesh is None or spec is None or sharding is not None:
            raise ValueError("give either sharding, or mesh together with spec(name, shape) -> PartitionSpec")
        return {name: NamedSharding(mesh, spec(name, shape)) for name, shape in names_shapes.items()}
    if sharding is None:
        sharding = SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, Sharding):
        return {name: sharding for name in names_shapes}
    if not isinstance(sharding, Mapping):
        raise ValueError(f"sharding must be a jax Sharding or a mapping of parameter name to Sharding, "
                         f"got {type(sharding).__name__}")
    unknown = sorted(set(sharding) - set(names_shapes))
    if unknown:
        raise ValueError(f"sharding names {unknown[0]!r}, which is not a parameter of this model")
    missing = sorted(set(names_shapes) - set(sharding))
    if missing:
        raise ValueError(f"sharding has no entry for {missing[0]!r} ({len(missing)} parameter(s) missing)")
    return dict(sharding)


def load_weights(model: nnx.Module, files: list[Path], shardings: Mapping[str, Sharding]) -> None:
    """Fill every variable of ``model`` (abstract or real) from ``files``; strict about names and shapes.
    Each tensor goes from host memory straight to its ``shardings[canonical name]`` (``target_shardings``),
    one at a time."""
    cfg = model.config
    table = param_table(model)
    has_mtp = isinstance(model, DeepseekV4WithMTP)
    loaded: set[str] = set()
    expert_parts: dict[str, set[tuple[int, int]]] = {}
    stacked: dict[str, jax.Array] = {}
    F = cfg.moe_intermediate_size

    def skip(name: str) -> bool:
        return name.endswith(IGNORED_SUFFIXES) or (not has_mtp and name.startswith(MTP_PREFIXES))

    for name, array, f in iter_tensors(files, skip):
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
            var.set_value(jax.device_put(np.asarray(array).astype(want.dtype), shardings[key]))
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
            stacked[key] = jnp.zeros(want.shape, want.dtype, device=shardings[key])
        rows = (F, 2 * F) if part == 3 else (0, F if part == 1 else want.shape[1])
        # Wait for the update: on CPU the device array may alias ``array``, which must not outlive this step.
        stacked[key] = _set_expert_slice(stacked[key], jnp.asarray(array), rows, expert).block_until_ready()
    for key, parts in expert_parts.items():
        if key in loaded:
            raise CheckpointError(f"{key} is given both stacked and as per-expert matrices")
        need = {(e, p) for e in range(cfg.n_routed_experts) for p in ((2,) if key.endswith("down_proj") else (1, 3))}
        if parts != need:
            e, p = min(need - parts)
            raise CheckpointError(f"checkpoint is missing tensor {key.rsplit('.', 1)[0]}.{e}.w{p}.weight "
                                  f"({len(need - parts)} expert matrices missing for {key})")
        table[key].set_value(jax.device_put(stacked[key], shardings[key]))  # no-op unless XLA moved it
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


def from_pretrained(path, dtype: str = "bfloat16", mtp: bool = False, *, sharding=None, mesh: Mesh | None = None,
                    spec=None) -> DeepseekV4ForCausalLM:
    """Load a DeepSeek-V4 directory, Hugging Face format or orbax (checkpoint_orbax), and return the model
    (call it on input_ids). ``mtp=True`` also loads the multi-token-prediction block (``mtp.0.*``) and
    returns an mtp.DeepseekV4WithMTP; otherwise those tensors are skipped. ``sharding`` / ``mesh`` +
    ``spec``: where each parameter lives (see ``target_shardings``); tensors are placed there one by one.
    ``dtype="auto"``: the checkpoint's own (``checkpoint_dtype``)."""
    from . import orbax as checkpoint_orbax  # imported here: it imports this module

    if dtype == "auto":
        dtype = checkpoint_dtype(path)

    if checkpoint_orbax.is_orbax_checkpoint(path):
        if mtp:
            raise CheckpointError(f"{path} is an orbax checkpoint, which holds no MTP block; load the "
                                  "safetensors checkpoint with mtp=True")
        return checkpoint_orbax.restore(path, dtype, sharding=sharding, mesh=mesh, spec=spec)
    cfg = checkpoint_config(path)
    if mtp and cfg.num_nextn_predict_layers != 1:
        raise CheckpointError(f"{Path(path) / 'config.json'} has num_nextn_predict_layers "
                              f"{cfg.num_nextn_predict_layers}; mtp=True needs 1 (one MTP block, as released)")
    model = abstract_model(cfg, _dtype(dtype), mtp)
    names_shapes = {name: tuple(var.get_value().shape) for name, var in param_table(model).items()}
    load_weights(model, checkpoint_files(Path(path)), target_shardings(names_shapes, sharding, mesh, spec))
    return model
