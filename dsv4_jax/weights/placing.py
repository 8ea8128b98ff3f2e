"""Where a checkpoint's tensors go, and arrays built on their shards piece by piece.

``target_layout`` turns ``from_pretrained``'s placement arguments (a runtime.mesh.ModelMesh, a jax Mesh +
ShardingRules, or shardings) into {canonical name: (placed shape, sharding)}, checking a ModelMesh's layout
against the config before any tensor is read. ``ShardedBuffer`` is a placed array filled one region at a
time (one expert's matrix, one restored shard): each device keeps only its shard, zeros at first, and is
sent only the part of a region that falls in it, so no device ever holds more than its share of the array.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from .sharding import Placement, ShardingRules, target_placements, target_shardings
from ..model.config import DeepseekV4Config
from ..runtime.mesh import ModelMesh, check_layout


def target_layout(cfg: DeepseekV4Config, table: Mapping[str, nnx.Variable], sharding=None,
                  mesh: ModelMesh | Mesh | None = None, rules: ShardingRules | None = None) -> dict:
    """Canonical name -> the sharding.Placement (placed shape, sharding) of every variable of ``table``
    (params.param_table); for a quantised one (a QuantArray value) a QuantArray of its codes' and its scales'.

    ``mesh`` a ModelMesh: its mesh and rules, after ``check_layout`` (an InputError naming the setting that
    does not fit ``cfg``); a jax Mesh: with ``rules`` (sharding.target_placements); else ``sharding``
    (sharding.target_shardings), each variable in its own shape.
    """
    if isinstance(mesh, ModelMesh):
        if rules is not None:
            raise ValueError("rules come with a ModelMesh (its ep setting); give rules only with a jax Mesh")
        check_layout(cfg, mesh.tp, mesh.dp, mesh.pp, mesh.ep, devices=mesh.mesh.size)
        mesh, rules = mesh.mesh, mesh.rules
    if mesh is not None and sharding is None:
        return target_placements(table, mesh, rules)
    shardings = target_shardings(table, sharding, mesh, rules)  # errors for a mix of sharding and mesh
    return {name: jax.tree.map(lambda leaf, s=shardings[name]: Placement(tuple(leaf.shape), s), var.get_value())
            for name, var in table.items()}


@functools.partial(jax.jit, donate_argnums=0)
def _write_shard(shard, part, offset):
    return jax.lax.dynamic_update_slice(shard, part.astype(shard.dtype), offset)


class ShardedBuffer:
    """An array of canonical shape ``shape`` held as ``placed`` = (placed shape, sharding), written one
    region at a time in canonical coordinates; ``pair``: the canonical dimension held as [2, n / 2]
    (``sharding.paired_axis``). Rows a placement pads stay zero."""

    def __init__(self, shape: Sequence[int], placed: Placement, dtype, pair: int | None = None):
        self.shape, (self.placed_shape, self.sharding), self.pair = tuple(shape), placed, pair
        self.dtype = jnp.dtype(dtype)
        index = self.sharding.addressable_devices_indices_map(self.placed_shape)
        self.bounds = {d: [s.indices(n)[:2] for s, n in zip(idx, self.placed_shape)] for d, idx in index.items()}
        self.shards = {d: jnp.zeros([hi - lo for lo, hi in b], dtype, device=d) for d, b in self.bounds.items()}

    def write(self, start: Sequence[int], block) -> None:
        """Copy ``block`` (numpy, or a jax array on one device) into [start, start + block.shape) of the
        canonical array; each device is sent the part in its shard only."""
        if self.pair is None:
            return self._write_placed(tuple(start), block)
        i, half = self.pair, self.shape[self.pair] // 2
        for h in (0, 1):  # the region's rows in each half go to [.., h, row - h * half, ..]
            lo, hi = max(start[i], h * half), min(start[i] + block.shape[i], (h + 1) * half)
            if lo < hi:
                rows = block[(slice(None),) * i + (slice(lo - start[i], hi - start[i]),)]
                self._write_placed((*start[:i], h, lo - h * half, *start[i + 1:]),
                                   rows.reshape(rows.shape[:i] + (1,) + rows.shape[i:]))

    def _write_placed(self, start: tuple[int, ...], block) -> None:
        for device, bounds in self.bounds.items():
            lo = [max(a, b0) for a, (b0, _) in zip(start, bounds)]
            hi = [min(a + n, b1) for a, n, (_, b1) in zip(start, block.shape, bounds)]
            if any(l >= h for l, h in zip(lo, hi)):
                continue
            part = block[tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, start))]
            offset = tuple(l - b0 for l, (b0, _) in zip(lo, bounds))
            self.shards[device] = _write_shard(self.shards[device], jax.device_put(part, device), offset)

    def ready(self) -> None:
        """Wait for the writes: a host block may back a device copy until they finish (CPU aliases memory)."""
        jax.block_until_ready(list(self.shards.values()))

    def array(self) -> jax.Array:
        """The placed array, made of the shards as they are (no copy)."""
        return jax.make_array_from_single_device_arrays(self.placed_shape, self.sharding,
                                                        [self.shards[d] for d in self.bounds])
