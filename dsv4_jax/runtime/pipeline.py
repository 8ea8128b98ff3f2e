"""Pipeline parallelism: the decoder layers split over the ``pp`` axis of the engine's mesh
(runtime/mesh.py), activations handed from stage to stage with ``lax.ppermute``.

One step. An engine whose mesh has pp > 1 (``Engine(mesh=make_mesh(pp=, dp=, tp=, ep=))``, or
``engine.PipelineEngine``) runs its own jitted steps and generation loop (with its one step of lookahead):
chunk preparation (padding, the metadata), the embedding, the head and the sampler are the engine's code,
all inside the sharded step's one ``shard_map``; ``PipelinePlan.run`` only takes the place of the model's
layer loop (``DeepseekV4ForCausalLM.run_layers``) and says how the layers' weights and caches are placed.
Within a stage the layers' weights and caches are split over dp and tp as the mesh's rules say, and the
ops' collectives (ops/parallel.py) run among the stage's devices. The weights outside the layers
(embedding, hc_head, final norm, LM head) are on every stage (split over tp), and the embedding and the
head run on every stage.

Stages. ``stage_starts(L, pp, boundaries)`` gives each stage's first layer (``boundaries`` = the
first layer of stages 1..pp-1; default: contiguous, as even as possible, earlier stages take the
remainder). Across processes (``jax.distributed.initialize``) the mesh spans every process's devices, so
the same program runs multi-host.

One program for heterogeneous layers. Layers differ by attention type (sliding / CSA / HCA: CSA
and HCA add a compressor, CSA an indexer) and MoE type (hash: a token->expert table; learned: a
routing bias), but most of a layer is the same in all of them. Each layer is ``nnx.split`` and its
state leaves are sorted into
  * the *trunk*: leaves every layer has with the same shape (mHC, norms, q/kv/o projections, the
    router weight, the routed and shared experts: nearly all the bytes). Stacked by *position in
    the stage*: ``[pp, P, ...]`` with P = the most layers any stage has; a stage with fewer layers
    pads with zeros it never reads;
  * *extras* per attention type (``attn:<type>``: compressor, indexer) and per MoE type
    (``mlp:<type>``: ``tid2eid`` or the routing bias), stacked ``[pp, N_g, ...]`` with N_g = the most
    layers of that type any stage has.
Caches are sorted the same way: the sliding-window ring is trunk (``[pp, P, B, W, D]``), the
compressed entries and compressor/indexer states are ``attn:<type>`` extras. Everything is sharded
``P('pp')``, so a device holds exactly its stage's weights and caches. Padding costs memory only
where stages have unequal layer counts (trunk) or unequal counts of a type (small extras); the
big tensors are never padded per type. A stage's layer order is a small static table (combination
of types and index within each extras group, per position); position p of the stage program is
``lax.switch`` over the layer variants that occur at p on any stage, plus an identity branch for
padding positions and for bubble ticks (no compute, no cache write). A variant's layer is rebuilt
with ``nnx.merge`` from its trunk slice and extras, so the layer code in model/ is reused as is.

What crosses a stage boundary: the full 4-stream mHC residual [Bm, C, hc_mult, d] (stage 0 takes the
embedded streams, the last stage's output goes to the head) and the microbatch's token ids (the
hash-routed MoE layers route by token id, and hash layers may sit on any stage).

Metadata. ``build_metadata`` runs once per step in the jitted function, under
``jax.named_scope(METADATA_SCOPE)``, before the ``shard_map``; every stage receives it as a
(replicated) value and only slices the rows of the microbatch it is working on. No stage derives
metadata, so what a stage computes cannot depend on which layer type it starts with (the SGLang PP
bug: issue #25662 / PR #25729). (Being replicated, that one computation is executed by every device,
like any replicated op in an SPMD program; it is a few small integer tensors.)

Schedule: GPipe. Each dp shard of rows (padded with empty rows to a multiple of ``microbatches``) is
split into M microbatches; the program is a ``lax.scan`` over T = M + pp - 1 ticks; at tick t stage s
works on microbatch t - s (if in range), then ppermutes its streams and token ids to stage s + 1.
Prefill chunks and decode steps both use it. Each stage idles pp - 1 of the T ticks: the bubble is
(pp - 1) / (M + pp - 1) (e.g. pp = 4, M = 4: 3/7). Cutting it: more microbatches; interleaved
("circular") stages holding R non-contiguous layer groups each, which gives (pp - 1) / (R*M + pp - 1);
for prefill, pipelining successive chunks of the same sequences (chunk k + 1 can enter stage 0 while
chunk k is in stage 1, since its caches at each stage are written first); for decode, a circular
schedule that keeps pp microbatches in flight across steps (the last stage samples and sends the
token back to stage 0) so a step's bubble is filled by the other microbatches' steps. None of those
is implemented here.

Numerics: with one microbatch every op sees the unpipelined shapes and the logits are bitwise
equal to ``Engine``'s; with several, per-microbatch matmul shapes differ and fp32 logits agree to
~5e-7 relative (CPU). The last stage's streams reach every stage by a sum over pp in which the others
add zeros (exact), so every stage runs the head and every process reads the logits.

Not done / costs: microbatch cache rows are sliced out and written back per layer
(dynamic_slice / dynamic_update_slice; no copy with one microbatch); bubble ticks still
ppermute; the embedding and the head run on every stage; extras weights are read with
a dynamic index; weights are stacked from a fully built host model (a real multi-host loader would
build only the local stages' slices: the callbacks below already ask only for those).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ..model.cache import init_cache
from ..model.rollback import FIELD_SITES, Site, field_site
from ..model.spec import axes_of
from ..model.transformer import DeepseekV4ForCausalLM, InputError, at_positions
from ..weights.sharding import PP, cache_shardings, placement, to_placed, value_placement
from .mesh import ModelMesh, place_variable

PP_AXIS = PP
STAGE_SCOPE = "pipeline_stage"
TRUNK = "trunk"


# ----- stage assignment --------------------------------------------------------------------------
def stage_starts(num_layers: int, pp: int, boundaries: Sequence[int] | None = None,
                 names: tuple[str, str] = ("pp", "boundaries")) -> tuple[int, ...]:
    """First layer of each of the ``pp`` stages; raises InputError for an impossible split.

    ``boundaries``: the first layer of stages 1..pp-1 (strictly increasing, in [1, num_layers)). ``names``: how
    the caller spells the two settings in its messages (the CLI's ``--pp`` and ``--pp-boundaries``).
    """
    pp_name, b_name = names
    if isinstance(pp, bool) or not isinstance(pp, (int, np.integer)) or pp < 1:
        raise InputError(f"{pp_name} {pp!r} must be a positive integer")
    if pp > num_layers:
        raise InputError(f"{pp_name} {pp} is larger than the number of layers ({num_layers}); every stage needs a "
                         "layer")
    if boundaries is None:
        sizes = [num_layers // pp + (1 if s < num_layers % pp else 0) for s in range(pp)]
        return tuple(int(x) for x in np.cumsum([0] + sizes[:-1]))
    b = tuple(boundaries)
    if len(b) != pp - 1:
        raise InputError(f"{b_name} {list(b)} must list {pp - 1} stage start layer(s) for {pp_name} {pp}, "
                         f"got {len(b)}")
    for x in b:
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise InputError(f"boundary {x!r} in {list(b)} is not an integer layer index")
        if not 0 < x < num_layers:
            raise InputError(f"boundary {x} in {list(b)} is outside [1, {num_layers}): stage 0 and the last "
                             f"stage need at least one layer")
    starts = (0, *map(int, b))
    for s in range(1, pp):
        if starts[s] == starts[s - 1]:
            raise InputError(f"{b_name} {list(b)} leave stage {s - 1} with no layers (it starts and ends at "
                             f"layer {starts[s]})")
        if starts[s] < starts[s - 1]:
            raise InputError(f"{b_name} {list(b)} must be strictly increasing ({starts[s - 1]} then {starts[s]})")
    return starts


def stage_of_layer(num_layers: int, pp: int, boundaries: Sequence[int] | None = None) -> tuple[int, ...]:
    """Stage index of every layer."""
    starts = stage_starts(num_layers, pp, boundaries)
    return tuple(int(np.searchsorted(starts, i, side="right") - 1) for i in range(num_layers))


def pipeline_devices(pp: int, devices=None, pp_name: str = "pp") -> list:
    """The first ``pp`` devices (all processes' devices in multi-process runs); InputError if too few."""
    devices = list(jax.devices() if devices is None else devices)
    if pp > len(devices):
        n = len(devices)
        raise InputError(f"{pp_name} {pp} needs {pp} devices but {n} {'is' if n == 1 else 'are'} available (on CPU: "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={pp})")
    return devices[:pp]


def check_pipeline(num_layers: int, pp: int, boundaries: Sequence[int] | None = None, devices=None,
                   names: tuple[str, str] = ("pp", "boundaries")):
    """All pipeline argument checks, before any weights are touched (the CLI calls this early, with its flags'
    ``names``)."""
    starts = stage_starts(num_layers, pp, boundaries, names)
    return starts, pipeline_devices(pp, devices, names[0])


# ----- the plan: how layers, weights and caches map onto stages ----------------------------------
def _flat(tree) -> list[tuple[str, object]]:
    return [(jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _variables(state) -> list[tuple[str, nnx.Variable]]:
    """(key, variable) of every variable of ``state``, in order."""
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return [(jax.tree_util.keystr(p), var) for p, var in leaves]


def _leaf_variables(state) -> list[tuple[str, nnx.Variable]]:
    """``_flat``'s keys (which end in ``.value``, then ``.values`` / ``.scales`` for a QuantArray) with the
    variable each leaf belongs to, in the same order."""
    return [(k + leaf_key, var) for k, var in _variables(state) for leaf_key, _ in _flat(var)]


def _head_name(key: str) -> str:
    return key.split("'")[1] if key.startswith("['") else key.lstrip(".").split(".")[0]


@dataclasses.dataclass(frozen=True)
class _Variant:
    """One layer variant (attention type, MoE type): how to rebuild its module and cache from stacks."""

    name: str
    graphdef: object
    treedef: object
    sources: tuple  # per state leaf: (group, key); group TRUNK or "attn:<type>" / "mlp:<type>"
    cache_treedef: object
    cache_sources: tuple


class PipelinePlan:
    """Static description of a split: stages, positions, variants, stacking groups, index tables."""

    def __init__(self, model: DeepseekV4ForCausalLM, starts: Sequence[int], mesh: ModelMesh, capacity: int,
                 microbatches: int | None = None, kv_cache_dtype: str = "auto"):
        cfg = model.config
        L = cfg.num_hidden_layers
        self.cfg, self.dtype, self.capacity, self.microbatches = cfg, model.dtype, capacity, microbatches
        self.kv_cache_dtype = kv_cache_dtype  # the caches' K=V rows ("auto" or "fp8", model.cache.init_cache)
        self.pp = pp = len(starts)
        if mesh.pp != pp:
            raise ValueError(f"{pp} stages on a mesh of pp {mesh.pp}")
        self.starts = tuple(starts)
        ends = (*starts[1:], L)
        self.stage_layers = tuple(tuple(range(a, b)) for a, b in zip(starts, ends))
        self.P = max(len(s) for s in self.stage_layers)
        self.model_mesh, self.mesh = mesh, mesh.mesh
        kinds = [(cfg.layer_types[i], cfg.mlp_layer_types[i]) for i in range(L)]
        group_of = {"self_attn": lambda i: f"attn:{kinds[i][0]}", "mlp": lambda i: f"mlp:{kinds[i][1]}"}

        # Split every layer; sort its weight and cache leaves into trunk and per-type groups.
        splits = [nnx.split(layer) for layer in model.model.layers]
        self._layer_leaves = [dict(_flat(state)) for _, state in splits]
        self._axes = {k: axes_of(var) for _, state in splits for k, var in _leaf_variables(state)}
        for i, (_, state) in enumerate(splits):  # a released-precision weight's split must cut whole blocks
            for k, var in _variables(state):
                value_placement(f"layer {i} parameter {k}", axes_of(var), var.get_value(), self.mesh, mesh.rules)
        cache_shapes = jax.eval_shape(lambda: init_cache(cfg, 1, capacity, model.dtype, kv_cache_dtype))
        cache_leaves = [dict(_flat(c)) for c in cache_shapes]

        def classify(leaves_per_layer, group_fn):
            first = leaves_per_layer[0]
            trunk = {k for k, v in first.items()
                     if all(k in lv and lv[k].shape == v.shape and lv[k].dtype == v.dtype for lv in leaves_per_layer)}
            groups: dict[str, dict[str, tuple]] = {}
            for i, lv in enumerate(leaves_per_layer):
                for k, v in lv.items():
                    if k in trunk:
                        continue
                    g = group_fn(i, k)
                    spec = groups.setdefault(g, {})
                    if spec.get(k, (v.shape, v.dtype)) != (v.shape, v.dtype):
                        raise ValueError(f"layer {i}: {k} has shape {v.shape} unlike other {g} layers")
                    spec[k] = (v.shape, v.dtype)
            return trunk, groups

        def param_group(i, key):
            head = _head_name(key)
            if head not in group_of:
                raise ValueError(f"layer {i}: weight {key} differs between layers outside self_attn/mlp")
            return group_of[head](i)

        self.trunk_keys, self.param_groups = classify(self._layer_leaves, param_group)
        self.cache_trunk_keys, self.cache_groups = classify(cache_leaves, lambda i, k: group_of["self_attn"](i))
        self._trunk_spec = {k: (v.shape, v.dtype) for k, v in self._layer_leaves[0].items() if k in self.trunk_keys}
        self._cache_trunk_spec = {k: (v.shape, v.dtype) for k, v in cache_leaves[0].items()
                                  if k in self.cache_trunk_keys}

        # Layer variants (one nnx GraphDef each) and per-stage index tables.
        variants: dict[tuple, _Variant] = {}
        for i, kind in enumerate(kinds):
            gdef, state = splits[i]
            if kind in variants:
                if variants[kind].graphdef != gdef:
                    raise ValueError(f"layer {i} ({kind}) has a module structure unlike earlier {kind} layers")
                continue
            src = tuple((TRUNK if k in self.trunk_keys else param_group(i, k), k) for k, _ in _flat(state))
            csrc = tuple((TRUNK if k in self.cache_trunk_keys else group_of["self_attn"](i), k)
                         for k, _ in _flat(cache_shapes[i]))
            variants[kind] = _Variant(name=f"{kind[0]}+{kind[1]}", graphdef=gdef,
                                      treedef=jax.tree_util.tree_structure(state), sources=src,
                                      cache_treedef=jax.tree_util.tree_structure(cache_shapes[i]), cache_sources=csrc)
        self.variant_kinds = sorted(variants)
        self.variants = [variants[k] for k in self.variant_kinds]
        vid = {k: j for j, k in enumerate(self.variant_kinds)}

        all_groups = sorted(set(self.param_groups) | set(self.cache_groups))
        self.members = {g: [[] for _ in range(pp)] for g in all_groups}  # group -> stage -> layers
        self.variant_table = np.full((pp, self.P), -1, np.int32)
        self.group_index = {g: np.zeros((pp, self.P), np.int32) for g in all_groups}
        for s, layers in enumerate(self.stage_layers):
            for p, i in enumerate(layers):
                self.variant_table[s, p] = vid[kinds[i]]
                for g in {group_of["self_attn"](i), group_of["mlp"](i)} & set(all_groups):
                    self.group_index[g][s, p] = len(self.members[g][s])
                    self.members[g][s].append(i)
        self.group_size = {g: max(1, max(len(m) for m in self.members[g])) for g in all_groups}
        # Variants that occur at each position on some stage, and whether some stage pads there.
        self.position_variants = tuple(tuple(sorted({int(v) for v in self.variant_table[:, p] if v >= 0}))
                                       for p in range(self.P))
        self.position_padded = tuple(bool((self.variant_table[:, p] < 0).any()) for p in range(self.P))

        # Embedding, hyper head, final norm and LM head.
        # The model without its layers (embedding, hc_head, norm, LM head): the engine's step merges it with
        # ``abstract_state`` standing in for the layers, which run here, over the stages.
        self.graphdef, layer_state, self._rest = nnx.split(model, nnx.PathContains("layers"), ...)
        self.abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), layer_state)
        self.state_def = jax.tree.structure(self._rest)
        self._stacks_def = jax.tree.structure({"trunk": dict.fromkeys(self._trunk_spec, 0),
                                               "groups": {g: dict.fromkeys(spec, 0)
                                                          for g, spec in self.param_groups.items()}})

    # -- placing weights and caches -------------------------------------------------------------
    def _stacked(self, shape, dtype, stage_value, spec: P):
        """Global [pp, n, *shape] array split over stages (and within a stage as ``spec``, a layer leaf's
        PartitionSpec, says); stage_value(s) -> np array [n, *shape]."""
        def cb(index):
            rows = range(self.pp)[index[0]]
            out = np.stack([np.asarray(stage_value(s), dtype) for s in rows])
            return out[(slice(None), *index[1:])]
        return jax.make_array_from_callback((self.pp, *shape), NamedSharding(self.mesh, P(PP, None, *spec)), cb)

    def layout(self, batch: int) -> tuple[int, int]:
        """(microbatches, padded batch) used for a batch of ``batch`` rows: each of the dp row shards is split
        into the microbatches."""
        dp = self.model_mesh.dp
        local = -(-batch // dp)
        M = min(self.microbatches or self.pp, local)
        return M, -(-local // M) * M * dp

    def rows(self, batch: int) -> int:
        """The padded batch (a multiple of dp x the microbatches) the engine's step runs for ``batch`` rows."""
        return self.layout(batch)[1]

    def place_weights(self, abstract: bool = False) -> list:
        """The weights argument of the engine's steps: the model's leaves outside the layers, placed as the
        mesh's rules say (the same on every stage), then the layers' leaves as stage-split stacks, each layer
        leaf placed within its stage as the rules say (each process materialises only its own shards).
        ``abstract``: ShapeDtypeStructs of those arrays instead (no memory; for compiling ahead of time, from an
        abstract model)."""
        rules = self.model_mesh.rules

        def stacked_layers(key, shape, dtype, n, layers_of_stage):
            placed_shape, sharding = placement(f"layer parameter {key}", self._axes[key], shape, self.mesh, rules)
            if abstract:
                return jax.ShapeDtypeStruct((self.pp, n, *placed_shape), dtype,
                                            sharding=NamedSharding(self.mesh, P(PP, None, *sharding.spec)))

            def stage_value(s):
                out = np.zeros((n, *placed_shape), dtype)  # padding slots stay zero and are never read
                for j, i in enumerate(layers_of_stage(s)):
                    out[j] = to_placed(np.asarray(self._layer_leaves[i][key]), placed_shape)
                return out
            return self._stacked((n, *placed_shape), dtype, stage_value, sharding.spec)

        trunk = {k: stacked_layers(k, shape, dtype, self.P, lambda s: self.stage_layers[s])
                 for k, (shape, dtype) in self._trunk_spec.items()}
        groups = {g: {k: stacked_layers(k, shape, dtype, self.group_size[g], lambda s, g=g: self.members[g][s])
                      for k, (shape, dtype) in spec.items()}
                  for g, spec in self.param_groups.items()}
        rest = [leaf for key, var in _variables(self._rest)
                for leaf in jax.tree.leaves(place_variable(key, var, self.model_mesh, abstract))]
        return rest + jax.tree.leaves({"trunk": trunk, "groups": groups})

    def cache_shapes(self, batch: int) -> dict:
        """The stacked caches of ``batch`` rows (a multiple of dp) as ShapeDtypeStructs with their shardings:
        [pp, n, batch, ...], split over stages and, within a stage, as each field's logical axes say."""
        layer_caches = jax.eval_shape(lambda: init_cache(self.cfg, batch, self.capacity, self.dtype,
                                                         self.kv_cache_dtype))
        specs = {k: s.spec for c in cache_shardings(layer_caches, self.mesh, self.model_mesh.rules)
                 for k, s in _flat(c)}

        def spec(key, shape, dtype, n):
            return jax.ShapeDtypeStruct((self.pp, n, batch, *shape[1:]), dtype,
                                        sharding=NamedSharding(self.mesh, P(PP, None, *specs[key])))
        return {"trunk": {k: spec(k, s, d, self.P) for k, (s, d) in self._cache_trunk_spec.items()},
                "groups": {g: {k: spec(k, s, d, self.group_size[g]) for k, (s, d) in sp.items()}
                           for g, sp in self.cache_groups.items()}}

    def cache_sites(self) -> dict:
        """The stacked caches' leaves as ``model.rollback`` reads them: ``cache_shapes``' tree of ``rollback.Site``s,
        each with the stage and layer axes before its batch axis. A group's layers share one compression ratio
        (their attention type's); so do all layers for a trunk field other than the window ring."""
        rates = {self.cfg.layer_compress_rate(i) for i in range(self.cfg.num_hidden_layers)}

        def site(group: str, key: str) -> Site:
            field = key.split(".")[1]  # ".compressor.kv" -> "compressor"
            if group != TRUNK:
                return field_site(field, self.cfg.compress_rate(group.split(":")[1]), lead=2)
            if FIELD_SITES[field] != "ring" and len(rates) > 1:
                raise ValueError(f"trunk cache field {key} is held by layers of compression ratios {sorted(rates)}")
            return field_site(field, min(rates), lead=2)
        return {"trunk": {k: site(TRUNK, k) for k in self._cache_trunk_spec},
                "groups": {g: {k: site(g, k) for k in spec} for g, spec in self.cache_groups.items()}}

    def unstack_cache(self, cache: dict) -> tuple:
        """Stacked caches -> the per-layer LayerCache tuple of ``init_cache`` (host copies; for tests)."""
        cache = jax.tree.map(np.asarray, cache)
        out = []
        for i, kind in enumerate(zip(self.cfg.layer_types, self.cfg.mlp_layer_types)):
            var = self.variants[self.variant_kinds.index(kind)]
            s = next(s for s, layers in enumerate(self.stage_layers) if i in layers)
            p = self.stage_layers[s].index(i)
            leaves = [cache["trunk"][k][s, p] if g == TRUNK else cache["groups"][g][k][s, self.members[g][s].index(i)]
                      for g, k in var.cache_sources]
            out.append(jax.tree_util.tree_unflatten(var.cache_treedef, leaves))
        return tuple(out)

    # -- the layer stack over the stages (``run_layers`` inside the sharded step's shard_map) --------
    def run(self, weights: list, streams, token_ids, meta, cache, logits_at=None):
        """``DeepseekV4ForCausalLM.run_layers`` over the stages, on one device's shards (inside
        ``runtime.mesh.ShardedStep``'s shard_map); ``weights``: its shards of ``place_weights``' stacks.

        streams [B, C, n, d] of this device's dp shard of rows (B a multiple of the microbatches), the
        metadata of those rows (built once for the whole batch before the shard_map; every stage slices its
        microbatch's rows). Returns (streams after the last layer, [B, C, n, d] or [B, n, d] at ``logits_at``
        [B], on every stage; this device's stacked caches).
        """
        B = token_ids.shape[0]
        M = min(self.microbatches or self.pp, B)
        if B % M:
            raise ValueError(f"batch {B} is not a multiple of microbatches {M}")
        bad = [x.shape for x in jax.tree.leaves(meta) if x.shape[:1] != (B,)]
        if bad:  # microbatches take row slices of the metadata, so every field must be per row
            raise ValueError(f"metadata fields without a leading batch axis of {B}: {bad}")
        last_only = logits_at is not None
        params = jax.tree.unflatten(self._stacks_def, weights)
        at = logits_at if last_only else jnp.zeros((B,), jnp.int32)
        ys, cache = self.stage_program(M, last_only, params, cache, streams, token_ids, meta, at)
        # The last stage finishes microbatch m at tick m + pp - 1; every stage gets its result (the others add 0).
        out = ys[0, self.pp - 1:].reshape(B, *ys.shape[3:])
        out = lax.psum(jnp.where(lax.axis_index(PP) == self.pp - 1, out, jnp.zeros_like(out)), PP)
        return out, cache

    # -- the stage program (runs inside shard_map; every leaf has a leading stage axis of 1) ----
    def stage_program(self, microbatches: int, last_only: bool, params, cache, first_streams,
                      token_ids, meta, logits_at):
        """One device's stage: a scan over the GPipe ticks (module docstring); leaves carry a stage axis of 1."""
        cfg, pp, M = self.cfg, self.pp, microbatches
        with jax.named_scope(STAGE_SCOPE):
            params = jax.tree.map(lambda x: x[0], params)
            cache = jax.tree.map(lambda x: x[0], cache)
            stage = lax.axis_index(PP_AXIS)
            B, C = token_ids.shape
            Bm = B // M
            n, d = cfg.hc_mult, cfg.hidden_size
            variant_row = jnp.asarray(self.variant_table)[stage]
            group_rows = {g: jnp.asarray(t)[stage] for g, t in self.group_index.items()}

            def tick(carry, t):
                recv_streams, recv_ids, cache = carry
                m = t - stage
                valid = (m >= 0) & (m < M)
                row0 = jnp.clip(m, 0, M - 1) * Bm
                if M == 1:
                    row0 = 0

                def rows(x):
                    return x if M == 1 else lax.dynamic_slice_in_dim(x, row0, Bm, axis=0)
                meta_m = jax.tree.map(rows, meta)  # this microbatch's rows of the one metadata (a slice)
                first = stage == 0
                streams = jnp.where(first, rows(first_streams), recv_streams)
                ids = jnp.where(first, rows(token_ids), recv_ids)
                for p in range(self.P):
                    with jax.named_scope(f"position_{p}"):
                        streams, cache = self._position(p, params, cache, streams, ids, meta_m, valid, row0,
                                                        variant_row, group_rows, Bm)
                out = at_positions(streams, rows(logits_at) if last_only else None)
                if pp > 1:
                    streams, ids = lax.ppermute((streams, ids), PP_AXIS, [(s, s + 1) for s in range(pp - 1)])
                return (streams, ids, cache), out

            init = (jnp.zeros((Bm, C, n, d), self.dtype), jnp.zeros((Bm, C), token_ids.dtype), cache)
            (_, _, cache), ys = lax.scan(tick, init, jnp.arange(M + pp - 1))
        return ys[None], jax.tree.map(lambda x: x[None], cache)

    def _position(self, p, params, cache, streams, ids, meta_m, valid, row0, variant_row, group_rows, Bm):
        """Run position p of this stage's layer order: lax.switch over the variants found at p."""
        vids = self.position_variants[p]
        cache_groups = sorted({g for v in vids for g, _ in self.variants[v].cache_sources if g != TRUNK})
        idx = {g: group_rows[g][p] for g in group_rows}

        def rows_of(x, lead):  # x [N, B, ...] -> [Bm, ...] at (lead, row0)
            return x[lead] if Bm == x.shape[1] else lax.dynamic_slice_in_dim(x[lead], row0, Bm, axis=0)

        old_trunk = {k: rows_of(v, p) for k, v in cache["trunk"].items()}
        old_groups = {g: {k: rows_of(v, idx[g]) for k, v in cache["groups"][g].items()} for g in cache_groups}

        def branch(v):
            var = self.variants[v]

            def run(streams, ids, meta_m, old_trunk, old_groups):
                leaves = [params["trunk"][k][p] if g == TRUNK else params["groups"][g][k][idx[g]]
                          for g, k in var.sources]
                layer = nnx.merge(var.graphdef, jax.tree_util.tree_unflatten(var.treedef, leaves))
                layer_cache = jax.tree_util.tree_unflatten(
                    var.cache_treedef, [old_trunk[k] if g == TRUNK else old_groups[g][k] for g, k in var.cache_sources])
                with jax.named_scope(f"layer_{var.name}"):
                    streams, layer_cache = layer(streams, ids, meta_m, layer_cache)
                new_trunk, new_groups = dict(old_trunk), {g: dict(c) for g, c in old_groups.items()}
                for (g, k), leaf in zip(var.cache_sources, jax.tree.leaves(layer_cache)):
                    if g == TRUNK:
                        new_trunk[k] = leaf
                    else:
                        new_groups[g][k] = leaf
                return streams, new_trunk, new_groups
            return run

        def identity(streams, ids, meta_m, old_trunk, old_groups):
            return streams, old_trunk, old_groups

        operands = (streams, ids, meta_m, old_trunk, old_groups)
        if self.pp == 1 and len(vids) == 1 and not self.position_padded[p]:
            streams, new_trunk, new_groups = branch(vids[0])(*operands)
        else:
            v = variant_row[p]
            local = sum(jnp.where(v == vid, j + 1, 0) for j, vid in enumerate(vids))
            index = jnp.where(valid, local, 0).astype(jnp.int32)
            streams, new_trunk, new_groups = lax.switch(index, [identity] + [branch(v) for v in vids], *operands)

        def put(x, new, lead):
            starts = (lead, row0) + (0,) * (x.ndim - 2)
            return lax.dynamic_update_slice(x, new[None].astype(x.dtype), starts)

        cache = {"trunk": {k: put(x, new_trunk[k], p) for k, x in cache["trunk"].items()},
                 "groups": {g: ({k: put(x, new_groups[g][k], idx[g]) for k, x in c.items()}
                                if g in new_groups else c) for g, c in cache["groups"].items()}}
        return streams, cache
