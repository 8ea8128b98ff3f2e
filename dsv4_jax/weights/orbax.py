"""Orbax checkpoints of a converted model: restored straight into the shardings asked for.

A checkpoint directory holds::

    config.json      config.to_hf_dict() plus "dtype", the model dtype it was saved in
    orbax/           an orbax-checkpoint (StandardCheckpointer) tree {canonical name: array} of every nnx
                     variable, parameters and buffers (``model.layers.0.mlp.gate.tid2eid``, ...)
    tokenizer.json   when the source checkpoint had one (scripts/convert_checkpoint.py copies it)

config.json is the Hugging Face spelling, so ``checkpoint_config`` and ``load_tokenizer`` read this
directory as they read a Hugging Face one; ``checkpoint.from_pretrained`` picks the format by the
``orbax/`` folder. Target placements come from the parameters' logical axes and a ``sharding.ShardingRules``
(placing.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import uuid
from pathlib import Path

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .errors import CheckpointError
from .params import abstract_model, checkpoint_config, is_released, model_dtype, param_table
from .placing import Placement, ShardedBuffer, target_layout
from .sharding import ShardingRules, paired_axis
from ..model.config import DeepseekV4Config
from ..model.transformer import DeepseekV4ForCausalLM
from ..runtime.mesh import ModelMesh

ORBAX_DIR = "orbax"
CONFIG_FILE = "config.json"
DTYPE_KEY = "dtype"
# Orbax writes this when it finalises a save; without it the orbax/ folder is an interrupted or damaged save.
ORBAX_MARKER = "_CHECKPOINT_METADATA"


def _checkpointer():
    """orbax's checkpointer, imported here: from_pretrained of a safetensors checkpoint (the CLI's demo model
    among them) then imports no orbax."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def is_orbax_checkpoint(path) -> bool:
    """Whether ``path`` has this module's layout (an ``orbax/`` folder); says nothing about its validity."""
    return (Path(path) / ORBAX_DIR).is_dir()


def _check_destination(path: Path, overwrite: bool) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"checkpoint destination {path} exists and is not a directory")
    if not any(path.iterdir()):
        return
    if not overwrite:
        raise CheckpointError(f"checkpoint directory {path} already exists; pass overwrite=True (--overwrite) "
                              "to replace it")
    if not (path / CONFIG_FILE).exists():  # never delete a directory that is not a checkpoint
        raise CheckpointError(f"refusing to overwrite {path}: it is not a checkpoint directory (no {CONFIG_FILE})")


def save(model: DeepseekV4ForCausalLM, path, *, overwrite: bool = False) -> Path:
    """Write every variable of ``model``, its config and dtype to the directory ``path``.

    An existing non-empty ``path`` is an error unless ``overwrite``. The checkpoint is written to a
    temporary sibling and moved into place at the end, so a failed save leaves an old one intact.
    """
    if is_released(model):
        raise ValueError("an orbax checkpoint holds plain arrays, not released FP8 / FP4 weights: save "
                         "weights.params.dequantized(model), or load with dequantize=True")
    path = Path(path).absolute()
    _check_destination(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "saving")
    try:
        arrays = {name: var.get_value() for name, var in param_table(model).items()}
        with _checkpointer() as ckptr:
            ckptr.save(tmp / ORBAX_DIR, arrays)
            ckptr.wait_until_finished()
        config = {**model.config.to_hf_dict(), DTYPE_KEY: model.dtype.name}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if path.exists():
            old = _sibling(path, "old")
            path.rename(old / path.name)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _sibling(path: Path, purpose: str) -> Path:
    """A new hidden directory beside ``path`` (same filesystem, so renames are atomic; umask permissions)."""
    sibling = path.parent / f".{path.name}.{purpose}-{uuid.uuid4().hex[:12]}"
    sibling.mkdir()
    return sibling


def saved_dtype(path) -> str:
    """The model dtype an orbax checkpoint was saved in ('bfloat16' or 'float32')."""
    config_file = Path(path) / CONFIG_FILE
    try:
        name = json.loads(config_file.read_text()).get(DTYPE_KEY)
        model_dtype(name)
    except (OSError, json.JSONDecodeError, AttributeError, ValueError, TypeError):
        raise CheckpointError(f"orbax checkpoint {path}: {config_file.name} has no valid {DTYPE_KEY!r} "
                              "(expected 'bfloat16' or 'float32')") from None
    return name


def _config_mismatch(saved: DeepseekV4Config, requested: DeepseekV4Config) -> str:
    """'hidden_size is 64 in the checkpoint but 32 requested, ...' for every differing field."""
    diffs = [f"{f.name} is {getattr(saved, f.name)!r} in the checkpoint but {getattr(requested, f.name)!r} requested"
             for f in dataclasses.fields(saved) if getattr(saved, f.name) != getattr(requested, f.name)]
    return ", ".join(diffs)


def _stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every array in the checkpoint's orbax/ folder (metadata only)."""
    orbax_dir = path / ORBAX_DIR
    if not (orbax_dir / ORBAX_MARKER).exists():
        raise CheckpointError(f"orbax checkpoint {path} is incomplete or corrupt: {ORBAX_DIR}/{ORBAX_MARKER} "
                              "is missing")
    with _reading(path), _checkpointer() as ckptr:
        tree = ckptr.metadata(orbax_dir).item_metadata
        if tree is None:  # orbax returns None (and logs a warning) when the tree's metadata is unreadable
            raise CheckpointError(f"orbax checkpoint {path} is corrupt or unreadable: no readable array "
                                  f"metadata in {ORBAX_DIR}/")
        return {name: tuple(meta.shape) for name, meta in tree.items()}


@contextlib.contextmanager
def _reading(path: Path):
    """Orbax reads of ``path``: any failure becomes one CheckpointError line naming its root cause.

    On damaged files orbax logs warnings and asyncio dumps every failed read's traceback before the
    error is raised; those logs are muted here because the raised error already says what broke.
    """
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # orbax and tensorstore raise many types for damaged files
        while e.__cause__ is not None:  # the innermost error names the file and what is wrong with it
            e = e.__cause__
        text = str(e).strip()
        reason = text.splitlines()[0] if text else type(e).__name__
        raise CheckpointError(f"orbax checkpoint {path} is corrupt or unreadable: {reason}") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _check_shapes(path: Path, stored: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]]) -> None:
    """The stored arrays must be exactly the model's variables, with the shapes its config implies."""
    missing, unexpected = sorted(set(want) - set(stored)), sorted(set(stored) - set(want))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"orbax checkpoint {path} is missing {missing[0]} {want[missing[0]]}{more}")
    if unexpected:
        raise CheckpointError(f"orbax checkpoint {path} holds {unexpected[0]} {stored[unexpected[0]]}, which its "
                              f"config has no parameter for")
    for name, shape in want.items():
        if stored[name] != shape:
            raise CheckpointError(f"orbax checkpoint {path} holds {name} with shape {stored[name]} but its config "
                                  f"expects {shape}")


def restore(path, dtype: str | None = None, *, config: DeepseekV4Config | None = None, sharding=None,
            mesh: ModelMesh | Mesh | None = None, rules: ShardingRules | None = None) -> DeepseekV4ForCausalLM:
    """Restore an orbax checkpoint into a new model, each array read straight into its target shards.

    ``dtype``: the model dtype, default the saved one (another one casts, like ``from_pretrained``; fp32
    parameters stay fp32). ``config``: when given, the checkpoint's config must equal it.
    ``mesh`` (a runtime.mesh.ModelMesh, or a jax Mesh + ``rules``) / ``sharding``: see
    ``placing.target_layout``; the arrays are restored in their placed shapes (padded vocabulary rows are
    zeros; paired gate | up rows are restored split like their pairs, then moved device to device).
    """
    path = Path(path)
    if not is_orbax_checkpoint(path):
        raise CheckpointError(f"{path} is not an orbax checkpoint (no {ORBAX_DIR}/ folder); convert it with "
                              "scripts/convert_checkpoint.py or load it with from_pretrained")
    cfg = checkpoint_config(path)
    if config is not None and config != cfg:
        raise CheckpointError(f"orbax checkpoint {path} does not match the requested config: "
                              f"{_config_mismatch(cfg, config)}")
    model = abstract_model(cfg, model_dtype(dtype or saved_dtype(path)))
    table = param_table(model)
    want = {name: tuple(var.get_value().shape) for name, var in table.items()}
    placements = target_layout(cfg, table, sharding, mesh, rules)
    _check_shapes(path, _stored_shapes(path), want)
    pairs = {name: paired_axis(var, placements[name].shape) for name, var in table.items()}
    target = {name: _read_as(want[name], placements[name], pairs[name], var.get_value().dtype)
              for name, var in table.items()}
    with _reading(path), _checkpointer() as ckptr:
        # strict=False: a padded placement reads its stored rows and zeros beyond them (shapes checked above).
        arrays = ckptr.restore(path / ORBAX_DIR, target, strict=False)
    for name, var in table.items():
        value = arrays.pop(name)  # a paired one's restored rows are freed once moved
        var.set_value(value if pairs[name] is None else _paired(value, placements[name], pairs[name]))
    return model


def _read_as(shape: tuple[int, ...], placed: Placement, pair: int | None, dtype) -> jax.ShapeDtypeStruct:
    """What orbax restores a variable as: its placement, or for a paired one its canonical shape split like
    the pairs (the pair dimension dropped), so each device reads as many rows as it will hold."""
    placed_shape, sharding = placed
    if pair is None:
        return jax.ShapeDtypeStruct(placed_shape, dtype, sharding=sharding)
    spec = list(sharding.spec)  # one entry per placed dimension (sharding.placement)
    del spec[pair]
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(sharding.mesh, PartitionSpec(*spec)))


def _paired(array: jax.Array, placed: Placement, pair: int) -> jax.Array:
    """A canonical array restored by ``_read_as`` -> its paired placement, one shard at a time."""
    buffer = ShardedBuffer(array.shape, placed, array.dtype, pair)
    done = set()
    for shard in array.addressable_shards:
        start = tuple(s.indices(n)[0] for s, n in zip(shard.index, array.shape))
        if start not in done:  # replicas hold the same rows
            done.add(start)
            buffer.write(start, shard.data)
    return buffer.array()
