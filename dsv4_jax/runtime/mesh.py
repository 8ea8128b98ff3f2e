"""The device mesh of a sharded engine: tensor, data and expert parallelism, as vLLM and SGLang mean them.

``make_mesh(tp=, dp=, pp=, ep=)`` lays the first pp x dp x tp devices out as a mesh with axes ("pp", "dp",
"tp"). Each pipeline stage has dp x tp devices: attention and the dense layers split the batch over dp and
the heads over tp; the routed experts are split along their width over tp (replicated over dp), or with
``ep`` spread whole over the stage's dp x tp devices. ``weights.sharding.layout_rules`` is the table that
places every parameter and cache field; ``ops.parallel`` holds the collectives the shards need.

One step: ``ShardedStep`` prepares a chunk (padding, the metadata) once, on the whole batch, before a single
``shard_map`` over the mesh in which every device runs the embedding, the layers and the head on its shards
(``model.transformer.forward_prepared``). The metadata enters it as a value, split by rows like the batch;
no device derives any.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .. import ops
from ..model.cache import init_cache, init_layer_cache
from ..model.config import DeepseekV4Config
from ..model.mtp import mtp_config
from ..model.rollback import layer_sites
from ..model.transformer import InputError, forward_prepared, prepare_chunk
from ..ops.parallel import MeshAxes, use_axes
from ..weights.sharding import (DP, PP, TP, Placement, cache_shardings, layout_rules, to_placed,
                                value_placement)
from ..model.spec import axes_of

FLAGS = {"tp": "tp", "dp": "dp", "pp": "pp", "ep": "ep"}  # how messages name the settings (the CLI: --tp ...)


@dataclasses.dataclass(frozen=True)
class ModelMesh:
    """A jax Mesh with axes ("pp", "dp", "tp") and whether the routed experts are spread over dp x tp."""

    mesh: Mesh
    ep: bool = False

    @property
    def tp(self) -> int:
        return self.mesh.shape[TP]

    @property
    def dp(self) -> int:
        return self.mesh.shape[DP]

    @property
    def pp(self) -> int:
        return self.mesh.shape[PP]

    @property
    def rules(self):
        return layout_rules(self.ep)

    @property
    def axes(self) -> MeshAxes:
        """The collectives of a step on this mesh: only axes of more than one device reduce."""
        split = [a for a in (DP, TP) if self.mesh.shape[a] > 1]
        return MeshAxes(tp=TP if TP in split else None, dp=DP if DP in split else None,
                        ep=tuple(split) if self.ep else ())

    def rows(self, batch: int) -> int:
        """The batch a step of ``batch`` rows runs at: a multiple of dp (the extra rows are empty)."""
        return -(-batch // self.dp) * self.dp


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} {value!r} must be a positive integer")
    return int(value)


def check_layout(cfg: DeepseekV4Config, tp: int = 1, dp: int = 1, pp: int = 1, ep: bool = False,
                 devices: int | None = None, names: dict[str, str] = FLAGS) -> None:
    """Raise InputError (one line naming the value) for a layout that does not fit ``cfg`` or the devices;
    ``names``: how the caller spells the settings (the CLI's ``--tp``). Runs before any weights load."""
    tp, dp, pp = (_count(v, names[k]) for k, v in (("tp", tp), ("dp", dp), ("pp", pp)))
    for what, size in (("query heads", cfg.num_attention_heads), ("output groups", cfg.o_groups),
                       ("indexer heads", cfg.index_n_heads), ("shared expert width", cfg.moe_intermediate_size)):
        if size % tp:
            raise InputError(f"{names['tp']} {tp} does not divide the model's {size} {what}")
    if ep and cfg.n_routed_experts % (dp * tp):
        raise InputError(f"the expert-parallel size {names['dp']} x {names['tp']} = {dp * tp} does not divide the "
                         f"model's {cfg.n_routed_experts} routed experts")
    if not ep and cfg.moe_intermediate_size % tp:
        raise InputError(f"{names['tp']} {tp} does not divide the routed experts' width {cfg.moe_intermediate_size}")
    if pp > cfg.num_hidden_layers:
        raise InputError(f"{names['pp']} {pp} is larger than the number of layers ({cfg.num_hidden_layers}); every "
                         "stage needs a layer")
    _check_devices(tp, dp, pp, jax.device_count() if devices is None else devices, names)


def _check_devices(tp: int, dp: int, pp: int, devices: int, names: dict[str, str]) -> None:
    """Raise InputError unless ``devices`` holds pp x dp x tp (positive counts)."""
    tp, dp, pp = (_count(v, names[k]) for k, v in (("tp", tp), ("dp", dp), ("pp", pp)))
    if pp * dp * tp > devices:
        layout = " x ".join(f"{names[k]} {v}" for k, v in (("pp", pp), ("dp", dp), ("tp", tp)) if v > 1)
        raise InputError(f"{layout} needs {pp * dp * tp} devices but {devices} {'is' if devices == 1 else 'are'} "
                         f"available (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count={pp * dp * tp})")


def make_mesh(tp: int = 1, dp: int = 1, pp: int = 1, ep: bool = False, devices=None,
              cfg: DeepseekV4Config | None = None) -> ModelMesh:
    """The first pp x dp x tp of ``devices`` (default: every process's, ``jax.devices()``) as a ModelMesh;
    with ``cfg``, ``check_layout`` first."""
    devices = list(jax.devices() if devices is None else devices)
    if cfg is not None:
        check_layout(cfg, tp, dp, pp, ep, len(devices))
    _check_devices(tp, dp, pp, len(devices), FLAGS)
    grid = np.asarray(devices[:pp * dp * tp], dtype=object).reshape(pp, dp, tp)
    return ModelMesh(Mesh(grid, (PP, DP, TP)), bool(ep))


def place_variable(name: str, var: nnx.Variable, mesh: ModelMesh, abstract: bool = False):
    """A variable's value placed on ``mesh`` as its rules say (a QuantArray's codes and scales each on its
    shards). A value already laid out so (``from_pretrained(..., mesh=)``, or any array on one device placed
    on a 1-device mesh) keeps its buffers: no copy; any other is read to the host and each device given its
    shard (every process places its own). ``abstract``: ShapeDtypeStructs of the placed arrays instead (no
    memory; for compiling ahead of time)."""
    placed = value_placement(f"parameter {name}", axes_of(var), var.get_value(), mesh.mesh, mesh.rules)
    return jax.tree.map(functools.partial(_place_leaf, abstract=abstract), var.get_value(), placed)


def _place_leaf(value, placed: Placement, abstract: bool):
    shape, sharding = placed
    if abstract:
        return jax.ShapeDtypeStruct(shape, value.dtype, sharding=sharding)
    held = getattr(value, "sharding", None)  # an abstract model's ShapeDtypeStructs may hold one too
    if tuple(value.shape) == shape and held is not None and held.is_equivalent_to(sharding, value.ndim):
        # The same shards on the same devices (e.g. one device's array and a 1-device mesh's NamedSharding):
        # the placed array shares the buffers, so a model that fits once fits placed.
        return value if held == sharding else jax.device_put(value, sharding, may_alias=True)
    host = to_placed(np.asarray(value), shape)
    return jax.make_array_from_callback(shape, sharding, lambda index: host[index])


def place_weights(model: nnx.Module, mesh: ModelMesh) -> tuple:
    """model -> (graph definition, the state's tree structure, its leaves placed on ``mesh``): what
    ``engine.split_weights`` gives for one device."""
    graphdef, state = nnx.split(model)
    variables = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    weights = [leaf for path, var in variables
               for leaf in jax.tree.leaves(place_variable(jax.tree_util.keystr(path), var, mesh))]
    return graphdef, jax.tree.structure(state), weights


def weight_specs(weights: list) -> list:
    """The PartitionSpec of each placed weight (the sharded step's in_specs)."""
    return [w.sharding.spec for w in weights]


class ShardedStep:
    """``forward`` of ``engine.DeviceSteps`` on a mesh: (weights, cache, token_ids [B, S], start [B], n_new [B])
    -> (logits [B, S, V] or [B, V], caches), B = ``rows(B)``. The chunk is prepared once, then one shard_map
    runs the embedding, the layers and the head on every device's shards (``run``, which the speculative steps
    share: runtime/speculative.py).

    ``plan``: with pp > 1, a ``runtime.pipeline.PipelinePlan`` runs the layers as stages; the weights list is
    then the model's leaves outside the layers (``state_def``) followed by the plan's stacks, and the caches
    are the plan's. ``kv_cache_dtype``: the caches' K=V rows ("auto" or "fp8", ``model.cache.init_cache``)."""

    def __init__(self, cfg: DeepseekV4Config, graphdef, state_def, specs: list, mesh: ModelMesh, capacity: int,
                 dtype, plan=None, kv_cache_dtype: str = "auto"):
        self.cfg, self.graphdef, self.state_def, self.specs = cfg, graphdef, state_def, specs
        self.mesh, self.capacity, self.dtype, self.plan = mesh, capacity, dtype, plan
        self.kv_cache_dtype = kv_cache_dtype

    def rows(self, batch: int) -> int:
        """The batch a step of ``batch`` rows runs at (the extra rows are empty)."""
        return self.mesh.rows(batch) if self.plan is None else self.plan.rows(batch)

    def cache_shardings(self, batch: int, mtp: bool = False):
        """The caches' shardings; ``mtp``: the pair (the layers', the MTP block's), as speculative decoding keeps
        them on a mesh."""
        if self.plan is not None:
            layers = jax.tree.map(lambda s: s.sharding, self.plan.cache_shapes(batch))
        else:
            shapes = jax.eval_shape(lambda: init_cache(self.cfg, batch, self.capacity, self.dtype, self.kv_cache_dtype))
            layers = cache_shardings(shapes, self.mesh.mesh, self.mesh.rules)
        if not mtp:
            return layers
        block = jax.eval_shape(lambda: self._mtp_cache(batch))
        return layers, cache_shardings(block, self.mesh.mesh, self.mesh.rules)

    def _mtp_cache(self, batch: int):
        """The MTP block's zero cache (its one layer: layer ``num_hidden_layers`` of ``mtp_config``)."""
        return init_layer_cache(mtp_config(self.cfg), self.cfg.num_hidden_layers, batch, self.capacity, self.dtype,
                                self.kv_cache_dtype)

    def new_cache(self, batch: int, mtp: bool = False):
        """Zero caches for ``rows(batch)`` rows, made in place on their shards (``mtp``: ``cache_shardings``')."""
        return self._cache_initializer(self.rows(batch), mtp)()

    @functools.cache
    def _cache_initializer(self, batch: int, mtp: bool):
        """The jitted allocation of ``batch`` rows' caches (compiled once per batch size, not per generation)."""
        def init():
            if self.plan is not None:
                layers = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.plan.cache_shapes(batch))
            else:
                layers = init_cache(self.cfg, batch, self.capacity, self.dtype, self.kv_cache_dtype)
            return (layers, self._mtp_cache(batch)) if mtp else layers
        return jax.jit(init, out_shardings=self.cache_shardings(batch, mtp))

    def cache_sites(self):
        """The layers' caches' leaves as ``model.rollback`` reads them (a tree of ``rollback.Site``), for a tree
        of the form ``cache_shardings`` gives; per layer, or the pipeline's stacks."""
        if self.plan is not None:
            return self.plan.cache_sites()
        return layer_sites(self.cfg, jax.eval_shape(lambda: init_cache(self.cfg, 1, self.capacity, self.dtype,
                                                                       self.kv_cache_dtype)))

    def _bind(self, weights):
        """This device's weights -> (the model, how its layer stack runs)."""
        if self.plan is None:
            model = nnx.merge(self.graphdef, jax.tree.unflatten(self.state_def, weights))
            return model, None
        n = self.state_def.num_leaves
        model = nnx.merge(self.graphdef, self.plan.abstract_state, jax.tree.unflatten(self.state_def, weights[:n]))
        return model, functools.partial(self.plan.run, weights[n:])

    def run(self, body, weights, cache, rows: tuple, whole: tuple, out_specs, kernels: ops.Kernels,
            mtp: bool = False):
        """``body(model, layers, cache, *rows, *whole)`` -> (outputs, caches) in one shard_map, on every device's
        shards of the weights and caches (``mtp``: ``cache_shardings``'), under ``kernels`` and the mesh's
        collectives. ``layers``: how the layer stack runs (None: ``model.run_layers``; a pipeline's stages).
        ``rows``: pytrees split by rows over dp like the batch (the metadata among them, prepared before);
        ``whole``: replicated. ``out_specs``: the outputs' PartitionSpecs (a prefix of their tree)."""
        B = jax.tree.leaves(rows)[0].shape[0]
        if B != self.rows(B):
            raise ValueError(f"batch {B} is not a multiple of dp (x microbatches): {self.rows(B)}")
        cache_specs = jax.tree.map(lambda s: s.spec, self.cache_shardings(B, mtp))

        def local(weights, cache, *args):
            with ops.use(kernels), use_axes(self.mesh.axes):
                model, layers = self._bind(weights)
                return body(model, layers, cache, *args)

        in_specs = (self.specs, cache_specs, *(jax.tree.map(lambda _: P(DP), x) for x in rows),
                    *(jax.tree.map(lambda _: P(), x) for x in whole))
        return jax.shard_map(local, mesh=self.mesh.mesh, in_specs=in_specs, out_specs=(out_specs, cache_specs),
                             check_vma=False)(weights, cache, *rows, *whole)

    def whole(self, tree):
        """Arrays held whole by every device (and process): the sampler's input and the host's read."""
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh.mesh, P())), tree)

    def __call__(self, weights, cache, token_ids, start, n_new, last_only: bool, kernels: ops.Kernels):
        S = token_ids.shape[1]
        token_ids, meta, logits_at = prepare_chunk(self.cfg, token_ids, start, n_new, self.capacity, last_only)
        extra = () if logits_at is None else (logits_at,)

        def body(model, layers, cache, token_ids, meta, *logits_at):
            return forward_prepared(model, token_ids, meta, cache, *(logits_at or (None,)), layers=layers)

        logits, cache = self.run(body, weights, cache, (token_ids, meta, *extra), (), P(DP), kernels)
        logits = self.whole(logits)
        return (logits if last_only else logits[:, :S]), cache


def replicated(mesh: ModelMesh, x) -> jax.Array:
    """A host input as a global array replicated over the mesh (valid across processes)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh.mesh, P()), lambda i: x[i])

