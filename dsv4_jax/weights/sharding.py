"""Where arrays live on a device mesh: ``ShardingRules`` maps the logical axes that parameters and cache fields
declare (model/spec.py) to mesh axes, and every placement (the safetensors import, the orbax restore, a
cache) is derived from it. The rules are the one table to change for another layout; the default splits
nothing, and ``layout_rules`` is the sharded engine's (runtime/mesh.py).

Placement may differ from a parameter's shape in two ways (``placement``): a vocabulary split into parts it
does not divide is padded with rows no token reads, and the routed experts' stacked gate | up rows are held
as [E, 2, F, d], so that a split of F gives each device its gate rows and their up rows. The model reads
either form (model/moe.py ``Experts``, ops/parallel.py ``gather_vocab``). A weight kept in its released
precision (a quant_array.QuantArray) places its codes and its block scales alike, by the same logical axes;
a split must then cut whole quantisation blocks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from ..model.spec import axes_of, field_axes
from .quant_array import QuantArray

# One mesh axis, several (the dimension is split over their product, in order), or None (not split).
MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> the mesh axes that split it. The fields are the logical-axis vocabulary."""

    # parameters
    vocab: MeshAxes = None  # token vocabulary: embedding and head rows (padded to a multiple of its parts)
    token_table: MeshAxes = None  # the hash router's token -> experts rows (every device routes any token)
    embed: MeshAxes = None  # model width d
    embed_in: MeshAxes = None  # model width on the input side of the MTP block's square d -> d projections
    q_lora: MeshAxes = None  # query low-rank width r_q
    heads: MeshAxes = None  # attention heads; a flattened heads x head_dim axis splits by whole heads
    kv: MeshAxes = None  # one key/value row: head_dim, index_head_dim, twice that for the overlapping compressor
    o_lora: MeshAxes = None  # grouped output projection: o_groups x o_lora_rank, flattened
    o_in: MeshAxes = None  # one output group's input: (heads / o_groups) x head_dim
    ratio: MeshAxes = None  # the m token positions of one compression window (compressor position bias)
    index_heads: MeshAxes = None  # lightning-indexer heads (flattened with index_head_dim likewise)
    router: MeshAxes = None  # routed experts as the router scores them (every token scores all of them)
    experts: MeshAxes = None  # routed experts' weight stacks
    expert_mlp: MeshAxes = None  # a routed expert's hidden width F
    expert_gate_up: MeshAxes = None  # its gate and up rows stacked, 2F (placed as [2, F]: split like F)
    mlp: MeshAxes = None  # the shared expert's hidden width
    topk: MeshAxes = None  # experts picked per token (the hash router's table)
    hc: MeshAxes = None  # mHC mixing coefficients
    hc_embed: MeshAxes = None  # mHC streams x model width, flattened (the mixing input)
    # cache fields
    batch: MeshAxes = None  # sequences of a batch
    window: MeshAxes = None  # sliding-window ring of the last W tokens
    span: MeshAxes = None  # compressor ring of the last span tokens' raw projections
    cache_seq: MeshAxes = None  # compressed entries along the context


LOGICAL_AXES = tuple(f.name for f in dataclasses.fields(ShardingRules))
PADDED_AXES = ("vocab",)  # placement pads these to a multiple of their parts
PAIRED_AXES = ("expert_gate_up",)  # placement holds these as [2, n / 2], split on the second

# The sharded engine's mesh axes (runtime/mesh.py): pipeline stages, data-parallel rows, tensor-parallel shards.
PP, DP, TP = "pp", "dp", "tp"


def layout_rules(ep: bool) -> ShardingRules:
    """The sharded engine's table: heads, output groups, indexer heads, the shared expert's width and the
    vocabulary over TP; batch rows (caches included) over DP; the routed experts whole over DP x TP with
    ``ep`` (expert parallel), else their width over TP. The rest is replicated: the one MQA key/value head,
    the compressors (single-head, like it), mHC, norms, the router and the hash table."""
    experts = dict(experts=(DP, TP)) if ep else dict(expert_mlp=TP, expert_gate_up=TP)
    return ShardingRules(vocab=TP, heads=TP, o_lora=TP, index_heads=TP, mlp=TP, batch=DP, **experts)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one array lives: its placed ``shape`` and its ``sharding``. Not a pytree node, so a QuantArray of
    Placements (a quantised weight's codes and scales) maps leaf for leaf onto the weight."""

    shape: tuple[int, ...]
    sharding: Sharding

    def __iter__(self):  # (shape, sharding) = placement
        return iter((self.shape, self.sharding))


def _mesh_axes(entry: MeshAxes) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def logical_to_spec(axes: Sequence[str], rules: ShardingRules) -> PartitionSpec:
    """Logical axes, one per dimension -> the PartitionSpec ``rules`` give them.

    Errors: an axis that is not a ShardingRules field, a mesh axis that would split two dimensions.
    """
    unknown = [a for a in axes if a not in LOGICAL_AXES]
    if unknown:
        raise ValueError(f"logical axis {unknown[0]!r} is not one of ShardingRules' axes: {', '.join(LOGICAL_AXES)}")
    spec = [getattr(rules, a) for a in axes]
    used = [m for entry in spec for m in _mesh_axes(entry)]
    twice = sorted({m for m in used if used.count(m) > 1})
    if twice:
        raise ValueError(f"ShardingRules put mesh axis {twice[0]!r} on two dimensions of logical axes {tuple(axes)} "
                         f"({PartitionSpec(*spec)}); a mesh axis can split one dimension only")
    return PartitionSpec(*spec)


def placement(what: str, axes: Sequence[str], shape: Sequence[int], mesh: Mesh,
              rules: ShardingRules) -> Placement:
    """The Placement (placed shape, NamedSharding) of an array of ``shape`` with logical ``axes`` (module docstring: padded
    vocabulary, paired gate | up rows); ``what`` names it in errors (a mesh axis the mesh lacks, a dimension
    its mesh axes do not divide)."""
    spec = logical_to_spec(axes, rules)
    placed_shape, placed_spec = [], []
    for size, axis, entry in zip(shape, axes, spec):
        names = _mesh_axes(entry)
        for name in names:
            if name not in mesh.shape:
                raise ValueError(f"ShardingRules map {axis!r} to mesh axis {name!r}, which the mesh (axes "
                                 f"{', '.join(mesh.axis_names)}) does not have")
        parts = math.prod(mesh.shape[name] for name in names)
        if axis in PADDED_AXES:
            size = -(-size // parts) * parts
        if axis in PAIRED_AXES and parts > 1:
            placed_shape.append(2)
            placed_spec.append(None)
            size //= 2
        if size % parts:
            raise ValueError(f"{what} {tuple(shape)}: its {axis!r} dimension of {size} does not split evenly over "
                             f"mesh axes {names} ({parts} parts)")
        placed_shape.append(size)
        placed_spec.append(entry)
    return Placement(tuple(placed_shape), NamedSharding(mesh, PartitionSpec(*placed_spec)))


def _parts(axis: str, mesh: Mesh, rules: ShardingRules) -> int:
    return math.prod(mesh.shape[name] for name in _mesh_axes(getattr(rules, axis)))


def value_placement(what: str, axes: Sequence[str], value, mesh: Mesh, rules: ShardingRules):
    """The Placement of a parameter's value (an array, or ShapeDtypeStruct; held placed or not), or for a
    QuantArray a QuantArray of its codes' and its scales' Placements. Errors as ``placement``, and a split
    that would cut a quantisation block (a device must hold the scale of every code it holds)."""
    if not isinstance(value, QuantArray):
        return placement(what, axes, canonical_leaf_shape(axes, value.shape), mesh, rules)
    shape = canonical_leaf_shape(axes, value.shape)
    block = (1,) * (len(shape) - 2) + tuple(value.block)
    for axis, size, b in zip(axes, shape, block):
        parts = _parts(axis, mesh, rules)
        if parts > 1 and (size % parts or (size // parts) % b):
            raise ValueError(f"{what} {shape}: its {axis!r} dimension of {size} split into {parts} parts cuts its "
                             f"{b}-wide quantisation blocks; load it dequantised (dequantize=True, --dequantize) for this layout")
    return QuantArray(*(placement(f"{what} {part}", axes, canonical_leaf_shape(axes, leaf.shape), mesh, rules)
                        for part, leaf in (("codes", value.values), ("scales", value.scales))), value.block)


def logical_sharding(what: str, axes: Sequence[str], shape: Sequence[int], mesh: Mesh,
                     rules: ShardingRules) -> NamedSharding:
    """The NamedSharding of an array of ``shape`` with logical ``axes`` whose placement keeps its shape (cache
    fields); errors as ``placement``."""
    placed_shape, sharding = placement(what, axes, shape, mesh, rules)
    if placed_shape != tuple(shape):
        raise ValueError(f"{what} {tuple(shape)} would be placed as {placed_shape}; expected a layout that keeps "
                         "its shape")
    return sharding


def to_placed(value, placed_shape: Sequence[int]):
    """A parameter's value (numpy or jax) -> its placed form: padded rows (zeros) and paired halves split
    (``placement``); the identity when the shapes agree."""
    if tuple(value.shape) == tuple(placed_shape):
        return value
    if len(placed_shape) > value.ndim:  # paired halves: a reshape
        return value.reshape(placed_shape)
    xp = np if isinstance(value, np.ndarray) else jnp
    return xp.pad(value, [(0, p - s) for p, s in zip(placed_shape, value.shape)])


def target_shardings(table: Mapping[str, nnx.Variable], sharding=None, mesh: Mesh | None = None,
                     rules: ShardingRules | None = None) -> dict[str, Sharding]:
    """Canonical name -> sharding for every variable of a parameter table (params.param_table); for a
    quantised one placed by ``mesh``, a QuantArray of its codes' and its scales' shardings.

    ``mesh`` (+ ``rules``, default ShardingRules(): replicated): each variable split as the rules map its
    logical axes, in its placed shape (``target_placements``); or ``sharding``: one Sharding for all, or
    {canonical name: Sharding} naming every variable; default: the default device.
    """
    if mesh is not None or rules is not None:
        if mesh is None or sharding is not None:
            raise ValueError("give either sharding, or mesh with optional rules (a ShardingRules)")
        return {name: jax.tree.map(lambda p: p.sharding, placed)
                for name, placed in target_placements(table, mesh, rules).items()}
    if sharding is None:
        sharding = SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, Sharding):
        return {name: sharding for name in table}
    if not isinstance(sharding, Mapping):
        raise ValueError(f"sharding must be a jax Sharding or a mapping of parameter name to Sharding, "
                         f"got {type(sharding).__name__}")
    unknown = sorted(set(sharding) - set(table))
    if unknown:
        raise ValueError(f"sharding names {unknown[0]!r}, which is not a parameter of this model")
    missing = sorted(set(table) - set(sharding))
    if missing:
        raise ValueError(f"sharding has no entry for {missing[0]!r} ({len(missing)} parameter(s) missing)")
    return dict(sharding)


def target_placements(table: Mapping[str, nnx.Variable], mesh: Mesh, rules: ShardingRules | None = None) -> dict:
    """Canonical name -> the Placement of every variable of a parameter table on ``mesh`` under ``rules``
    (default ShardingRules(): replicated), a QuantArray of Placements for a quantised one; see
    ``value_placement``."""
    rules = ShardingRules() if rules is None else rules
    if not isinstance(rules, ShardingRules):
        raise ValueError(f"rules must be a ShardingRules, got {type(rules).__name__}")
    return {name: value_placement(f"parameter {name}", axes_of(var), var.get_value(), mesh, rules)
            for name, var in table.items()}


def canonical_leaf_shape(axes: Sequence[str], shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of an array of a parameter with logical ``axes`` as the model declares it, whether it is held
    placed or not: placement only pads a vocabulary axis (its declared size is unknown here, so a padded value
    keeps its padded size, which placing again leaves as it is) or splits a paired axis in two (merged back
    here)."""
    shape = tuple(shape)
    i = _paired_index(axes, shape)
    if i is not None:
        shape = shape[:i] + (shape[i] * shape[i + 1],) + shape[i + 2:]
    return shape


def canonical_shape(var: nnx.Variable) -> tuple[int, ...]:
    """A variable's logical shape as the model declares it (``canonical_leaf_shape``; a QuantArray's logical
    [..., out, in])."""
    value = var.get_value()
    if isinstance(value, QuantArray):
        *lead, cols = canonical_leaf_shape(axes_of(var), value.values.shape)
        return (*lead, 2 * cols) if value.packed else (*lead, cols)
    return canonical_leaf_shape(axes_of(var), value.shape)


def paired_axis(var: nnx.Variable, placed_shape: Sequence[int]) -> int | None:
    """The dimension of ``var`` that a placement of ``placed_shape`` holds as [2, n / 2] (PAIRED_AXES), or None."""
    return _paired_index(axes_of(var), placed_shape)


def _paired_index(axes: Sequence[str], placed_shape: Sequence[int]) -> int | None:
    if len(placed_shape) == len(axes):
        return None
    return next(i for i, a in enumerate(axes) if a in PAIRED_AXES)


def cache_shardings(cache, mesh: Mesh, rules: ShardingRules | None = None):
    """A cache pytree (model/cache.py: a tuple of LayerCache, or one) -> the same tree with the NamedSharding
    of each array in its place, from the axes its field declares (for ``jax.device_put`` or ``out_shardings``)."""
    rules = ShardingRules() if rules is None else rules
    if isinstance(cache, (tuple, list)):
        return type(cache)(cache_shardings(c, mesh, rules) for c in cache)
    axes = field_axes(type(cache))
    placed = {}
    for f in dataclasses.fields(cache):
        value = getattr(cache, f.name)
        if value is None:
            continue
        placed[f.name] = (logical_sharding(f"cache field {type(cache).__name__}.{f.name}", axes[f.name], value.shape,
                                           mesh, rules)
                          if f.name in axes else cache_shardings(value, mesh, rules))
    return dataclasses.replace(cache, **placed)
