"""Hugging Face format checkpoint import: ``config.json`` + one or many ``*.safetensors``; and
``from_pretrained``, which also reads the orbax format (orbax.py).

Tensors are streamed one at a time (never the whole checkpoint in host memory), checked against the
shapes the config implies, cast to each parameter's dtype (its declared storage, model/spec.py) and
placed straight onto the shards of its target placement (placing.py), each device sent only its own.
DeepSeek's released formats load as they are published: FP8 linears and FP4 experts are kept so, codes and
ue8m0 scales (a QuantArray each; the scales may sit in another shard), or dequantised with
``dequantize=True`` (dequantise.py); the MTP block loads when asked for (``mtp=True``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from . import orbax as checkpoint_orbax
from .dequantise import iter_tensors, released_names
from .errors import CheckpointError
from .names import IGNORED_SUFFIXES, MTP_PREFIXES, canonical_name
from .params import abstract_model, checkpoint_config, checkpoint_dtype, model_dtype, param_table
from .quant_array import QuantArray
from .progress import ByteProgress
from .safetensors_io import StoredTensor, catalog, checkpoint_files
from .placing import ShardedBuffer, target_layout
from .sharding import Placement, ShardingRules, paired_axis, to_placed
from ..model.mtp import DeepseekV4WithMTP
from ..model.transformer import DeepseekV4ForCausalLM
from ..runtime.mesh import ModelMesh


def _place_whole(host: np.ndarray, placed: Placement) -> jax.Array:
    """A host tensor in its placed form, each device sent its own shard."""
    shape, sharding = placed
    host = to_placed(host, shape)
    return jax.make_array_from_callback(shape, sharding, lambda index: host[index])


# Each float dtype a checkpoint holds: (its unsigned view, the bits that are all ones in an infinity or NaN and in
# no finite value). e4m3fn has no infinity and one NaN per sign (S.1111.111); ue8m0's NaN is 0xFF.
_NONFINITE_BITS = {np.dtype(np.float64): (np.uint64, 0x7FF0000000000000), np.dtype(np.float32): (np.uint32, 0x7F800000),
                   np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80),
                   np.dtype(ml_dtypes.float8_e4m3fn): (np.uint8, 0x7F),
                   np.dtype(ml_dtypes.float8_e8m0fnu): (np.uint8, 0xFF)}


_CHECK_CHUNK = 1 << 20  # bytes


def _nonfinite(a: np.ndarray) -> bool:
    """Whether a host tensor holds an infinity or NaN, read off its bits (no conversion to fp32)."""
    if a.dtype not in _NONFINITE_BITS:  # integers
        return False
    view, bits = _NONFINITE_BITS[a.dtype]
    flat = np.ascontiguousarray(a).reshape(-1).view(view)
    step = _CHECK_CHUNK // flat.itemsize  # in cache-sized pieces: the temporaries stay small
    return any(np.any((flat[i:i + step] & bits) == bits) for i in range(0, flat.size, step))


def _skipper(with_mtp: bool):
    """The stored names a model (with or without the MTP block) does not load."""
    return lambda name: name.endswith(IGNORED_SUFFIXES) or (not with_mtp and name.startswith(MTP_PREFIXES))


def stored_tensors(files: list[Path], model: nnx.Module) -> dict[str, StoredTensor]:
    """The tensors of ``files`` that ``model`` (with or without the MTP block) loads, from the headers, which
    are read once per load."""
    skip = _skipper(isinstance(model, DeepseekV4WithMTP))
    return {name: t for name, t in catalog(files).items() if not skip(name)}


def keep_released(model: nnx.Module, stored: dict[str, StoredTensor]) -> None:
    """Make every variable of abstract ``model`` that ``stored`` (stored_tensors) holds quantised an abstract
    QuantArray, so the load keeps it as released."""
    table = param_table(model)
    for name, block in released_names(stored).items():
        if name in table:  # an unknown name is load_weights' error
            table[name].set_value(QuantArray.abstract(table[name].get_value().shape, block))


_STAGE_BYTES = 64 << 20  # host bytes per staged block of experts: few device writes, bounded host memory
_OPEN_BLOCKS = 4  # blocks a stack keeps open at once (a file's experts may come in any order)


class ExpertStack:
    """A stacked per-expert parameter (canonical [E, rows, cols]; an array or a QuantArray of codes and scales)
    filled one stored expert matrix at a time. Matrices are cast into host blocks of ``group`` consecutive
    experts (per row offset: gate and up fill rows [0, F) and [F, 2F) of one stack), and a full block goes to
    the devices in one ShardedBuffer write: a device write per matrix costs a transfer and a wait each. When
    experts come out of order, the oldest open block is written as it is (its runs of filled experts), so the
    host holds at most ``_OPEN_BLOCKS`` blocks of at most a quarter of the stack each."""

    def __init__(self, var: nnx.Variable, placements, matrix_bytes: int):
        want = var.get_value()
        self.buffers = jax.tree.leaves(jax.tree.map(
            lambda w, p: ShardedBuffer(w.shape, p, w.dtype, paired_axis(var, p.shape)), want, placements))
        self.structure = jax.tree.structure(want)
        self.experts = jax.tree.leaves(want)[0].shape[0]
        self.group = int(np.clip(_STAGE_BYTES // max(matrix_bytes, 1), 1, max(1, self.experts // 4)))
        self.blocks: dict[tuple[int, int], tuple[list[np.ndarray], list[int]]] = {}  # (row, group) -> block
        self.to_come: dict[tuple[int, int], int] = {}  # (row, group) -> its experts not yet added

    def add(self, expert: int, row: int, value) -> None:
        """Expert ``expert``'s matrix (rows [row, row + its rows) of its slice; each (expert, row) once) into
        its group's block; a full block is written to the devices and dropped."""
        leaves = [np.asarray(a) for a in jax.tree.leaves(value)]
        key = (row, expert // self.group)
        start = key[1] * self.group
        size = min(self.group, self.experts - start)
        if key not in self.blocks:
            if len(self.blocks) == _OPEN_BLOCKS:
                self._write(next(iter(self.blocks)))
            self.blocks[key] = ([np.empty((size, *a.shape), b.dtype) for a, b in zip(leaves, self.buffers,
                                                                                       strict=True)], [])
        stage, filled = self.blocks[key]
        for block, a in zip(stage, leaves):
            block[expert - start] = a  # cast to the stored dtype on the way
        filled.append(expert - start)
        self.to_come[key] = self.to_come.get(key, size) - 1
        if self.to_come[key] == 0:
            self._write(key)

    def _write(self, key: tuple[int, int]) -> None:
        """Write an open block's filled experts (each run of consecutive ones at once) and drop it."""
        (row, g), (stage, filled) = key, self.blocks.pop(key)
        filled.sort()
        runs = np.split(np.array(filled), np.flatnonzero(np.diff(filled) != 1) + 1)
        for run in runs:
            lo, hi = int(run[0]), int(run[-1]) + 1
            for buffer, block in zip(self.buffers, stage):
                buffer.write((g * self.group + lo, row, 0), block[lo:hi])
        for buffer in self.buffers:
            buffer.ready()  # the host block must not outlive this step (streaming)

    def array(self):
        """The placed stack, once load_weights has checked that no matrix is missing."""
        for key in list(self.blocks):
            self._write(key)
        return jax.tree.unflatten(self.structure, [buffer.array() for buffer in self.buffers])


def load_weights(model: nnx.Module, stored: dict[str, StoredTensor], placements: Mapping,
                 progress: bool = False) -> None:
    """Fill every variable of ``model`` (abstract or real) from ``stored`` (stored_tensors); strict about names
    and shapes.
    Tensors are read one at a time; each goes from host memory straight to the shards of its
    ``placements[canonical name]`` (placing.target_layout), in that placed shape. A per-expert matrix is
    written into its slice of the stack on the devices that hold that slice, so no device receives a
    whole stack. A variable holding a QuantArray is filled with the stored codes and scales (quantised
    tensors are then read as released, see ``keep_released``); any other with dequantised values.
    ``progress``: report the bytes read on stderr (progress.ByteProgress; not for small checkpoints)."""
    cfg = model.config
    table = param_table(model)
    loaded: set[str] = set()
    expert_parts: dict[str, set[tuple[int, int]]] = {}
    stacked: dict[str, ExpertStack] = {}
    F = cfg.moe_intermediate_size
    released = any(isinstance(var.get_value(), QuantArray) for var in table.values())
    total = sum(t.end - t.start for t in stored.values())
    report = ByteProgress(total, "loading weights", enabled=progress)

    for name, array, f in iter_tensors(stored, dequantize=not released):
        report.update(sum(a.nbytes for a in jax.tree.leaves(array)))
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
        if isinstance(array, QuantArray) != isinstance(want, QuantArray):
            raise CheckpointError(f"tensor {name} in {f.name} is {'' if isinstance(array, QuantArray) else 'not '}"
                                  "quantised, unlike the parameter it fills")
        if any(map(_nonfinite, jax.tree.leaves(array))):
            raise CheckpointError(f"tensor {name} in {f.name} holds NaN or infinite values")
        if key.endswith("tid2eid") and (array.min() < 0 or array.max() >= cfg.n_routed_experts):
            raise CheckpointError(f"tensor {name} in {f.name} routes to expert {int(array.max())} or "
                                  f"{int(array.min())}, outside [0, {cfg.n_routed_experts})")
        if slot is None:
            if key in loaded:
                raise CheckpointError(f"tensor {name} appears twice (again in {f.name})")
            var.set_value(jax.tree.map(lambda a, w, p: _place_whole(np.asarray(a).astype(w.dtype, copy=False), p),
                                       array, want, placements[key]))
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
            stacked[key] = ExpertStack(var, placements[key], sum(a.nbytes for a in jax.tree.leaves(array)))
        stacked[key].add(expert, F if part == 3 else 0, array)
    for key, parts in expert_parts.items():
        if key in loaded:
            raise CheckpointError(f"{key} is given both stacked and as per-expert matrices")
        need = {(e, p) for e in range(cfg.n_routed_experts) for p in ((2,) if key.endswith("down_proj") else (1, 3))}
        if parts != need:
            e, p = min(need - parts)
            raise CheckpointError(f"checkpoint is missing tensor {key.rsplit('.', 1)[0]}.{e}.w{p}.weight "
                                  f"({len(need - parts)} expert matrices missing for {key})")
        table[key].set_value(stacked[key].array())
        loaded.add(key)
    report.close()
    missing = sorted(set(table) - loaded)
    if missing:
        shown = ", ".join(f"{n} {tuple(table[n].get_value().shape)}" for n in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {shown}{more}")


def from_pretrained(path, dtype: str = "bfloat16", mtp: bool = False, *, dequantize: bool = False,
                    progress: bool = True, sharding=None,
                    mesh: ModelMesh | Mesh | None = None, rules: ShardingRules | None = None) -> DeepseekV4ForCausalLM:
    """Load a DeepSeek-V4 directory, Hugging Face format or orbax (orbax.py), and return the model (call it on
    input_ids). ``mtp=True`` also loads the multi-token-prediction block (``mtp.0.*``) and returns an
    mtp.DeepseekV4WithMTP; otherwise those tensors are skipped. Weights stored quantised (the released FP8
    linears and FP4 experts) stay so on the device, as QuantArrays that the ops dequantise inside the step;
    ``dequantize=True`` dequantises them at load to ``dtype``, which is otherwise the activation dtype and
    that of the unquantised weights. ``progress``: a one-line report of the bytes read on stderr (checkpoints
    of 256 MiB or more). Where each parameter lives
    (placing.target_layout): ``mesh`` a runtime.mesh.ModelMesh (``make_mesh``; the model's arrays are then
    those ``Engine(model, mesh=)`` runs on, in their placed shapes: padded vocabulary, paired gate | up
    rows), a jax Mesh + ``rules`` (a sharding.ShardingRules, default replicated), or ``sharding``; tensors
    are placed there one by one, each device given its shards only.
    ``dtype="auto"``: the checkpoint's own (params.checkpoint_dtype)."""
    if dtype == "auto":
        dtype = checkpoint_dtype(path)
    if checkpoint_orbax.is_orbax_checkpoint(path):
        if mtp:
            raise CheckpointError(f"{path} is an orbax checkpoint, which holds no MTP block; load the "
                                  "safetensors checkpoint with mtp=True")
        return checkpoint_orbax.restore(path, dtype, sharding=sharding, mesh=mesh, rules=rules)
    cfg = checkpoint_config(path)
    if mtp and cfg.num_nextn_predict_layers != 1:
        raise CheckpointError(f"{Path(path) / 'config.json'} has num_nextn_predict_layers "
                              f"{cfg.num_nextn_predict_layers}; mtp=True needs 1 (one MTP block, as released)")
    model = abstract_model(cfg, model_dtype(dtype), mtp)
    stored = stored_tensors(checkpoint_files(Path(path)), model)
    if not dequantize:
        keep_released(model, stored)
    placements = target_layout(cfg, param_table(model), sharding, mesh, rules)
    load_weights(model, stored, placements, progress)
    return model
