"""Speculative decoding with the MTP block (``Engine(..., speculative="mtp", draft_tokens=N)``).

One device step, a round, per N + 1 verified tokens:

1. extend: the MTP block over the positions the last verify step committed (the main model's streams there and
   the tokens after them; at the first round the prompt's last position), writing its cache; its head at the
   last of them gives the first draft's logits;
2. draft: N - 1 one-token steps of the MTP block on its own output streams (the block applied recursively),
   each drawing the next draft; their writes to the block's cache are dropped (step 1 redoes those positions
   with the main model's streams once they are committed);
3. verify: the main model over [last committed token, N drafts] in one chunk, reading the rows its writes
   will overwrite first (``model.rollback.undo_rows``);
4. accept (``sampling.verify_drafts``): the longest agreeing prefix and the main model's next token;
5. roll back the rejected tokens' writes (``model.rollback.roll_back``).

The metadata of steps 1 to 3 (one chunk, N - 1 single tokens, one chunk, all at positions known when the
round starts) is built once, before the first layer runs (``round_metadata``); steps 4 and 5 read only the
verify step's metadata and the accepted length.

The prefill runs the MTP block over each chunk too (``prefill_chunk``), for every prompt position whose next
token is in the prompt; the last one waits for the first generated token and is the first round's extend.

On a mesh (``Engine(mesh=...)``) a round and a prefill chunk are the sharded engine's step (``ShardedStep.run``):
the metadata built once on the whole batch, then one shard_map in which every device runs the MTP block, the main
model's layers (a pipeline's stages with pp > 1; the MTP block and the head on every stage, as the embedding) and
the roll back on its shards. The sampler draws each batch row as one device does: it sees the whole batch
(``whole_batch``: the logits gathered over dp, as the plain step's replicated logits) and keeps its shard's rows.

Shapes: B batch rows, N draft tokens, n residual streams, d hidden, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from .. import ops
from ..model.config import DeepseekV4Config
from ..model.metadata import ForwardMetadata, build_metadata
from ..model.mtp import DeepseekV4WithMTP, mtp_layer_config
from ..model.rollback import layer_sites, max_verify_tokens, roll_back, undo_rows
from ..model.transformer import METADATA_SCOPE, InputError, at_positions, prepare_chunk
from ..weights.sharding import DP
from ..ops.parallel import all_rows, own_rows
from .sampling import SamplingParams, first_token, sample, sampling_args, verify_drafts

SPECULATIVE_METHODS = ("mtp",)


def check_speculative(cfg: DeepseekV4Config, speculative: str | None, draft_tokens, has_mtp: bool | None = None,
                      names: dict[str, str] | None = None) -> None:
    """Raise InputError naming a bad speculative setting. ``has_mtp``: whether the model holds its MTP block
    (None: not known yet, e.g. before the weights load); ``names``: how the caller spells speculative /
    draft_tokens (the CLI's flags)."""
    names = names or {}
    spec, n = names.get("speculative", "speculative"), names.get("draft_tokens", "draft_tokens")
    if speculative is None:
        return
    if speculative not in SPECULATIVE_METHODS:
        raise InputError(f"{spec} {speculative!r} is not one of {SPECULATIVE_METHODS}")
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, (int, np.integer)) or draft_tokens < 1:
        raise InputError(f"{n} {draft_tokens!r} must be a positive integer")
    limit = max_verify_tokens(cfg) - 1
    if draft_tokens > limit:
        raise InputError(f"{n} {draft_tokens} must be at most {limit} for this model: a verify step of {n} + 1 "
                         f"tokens must fit the sliding window ({cfg.sliding_window}) and each compressor's state "
                         "ring, so that rejected tokens can be rolled back")
    if cfg.num_nextn_predict_layers < 1:
        raise InputError(f"{spec} mtp needs the model's MTP block, and this config has num_nextn_predict_layers 0")
    if has_mtp is False:
        raise InputError(f"{spec} mtp needs the model's MTP block: load it with from_pretrained(path, mtp=True) "
                         "(or demo_model(mtp=True))")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftState:
    """What a round carries to the next, on the device: the main cache holds positions < ``pos``; the MTP block's
    cache those before ``pos - count``; the block's next chunk (step 1 of a round) is positions pos - count ..
    pos - 1, with the main model's streams there and the token after each (the last: the token the main model
    chose at pos - 1, the next round's first verified token)."""

    pos: jax.Array  # [B] int32
    streams: jax.Array  # [B, N + 1, n, d] the main model's at positions pos - count ..
    next_ids: jax.Array  # [B, N + 1] int32: the token after each of those positions
    count: jax.Array  # [B] int32, 1 .. N + 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoundMetadata:
    extend: ForwardMetadata  # the MTP block's chunk (step 1), N + 1 long
    drafts: tuple[ForwardMetadata, ...]  # its N - 1 one-token draft steps
    verify: ForwardMetadata  # the main model's chunk (step 3), N + 1 long


def round_metadata(cfg: DeepseekV4Config, state: DraftState, active: jax.Array, capacity: int) -> RoundMetadata:
    """The metadata of every forward of a round, from the positions it starts at (inactive rows write nothing)."""
    C = state.next_ids.shape[1]
    on = active.astype(jnp.int32)
    mtp = mtp_layer_config(cfg)
    with jax.named_scope(METADATA_SCOPE):
        return RoundMetadata(
            extend=build_metadata(mtp, state.pos - state.count, state.count * on, C, capacity),
            drafts=tuple(build_metadata(mtp, state.pos + i, on, 1, capacity) for i in range(C - 2)),
            verify=build_metadata(cfg, state.pos, C * on, C, capacity))


def speculative_round(model: DeepseekV4WithMTP, cache: tuple, state: DraftState, active: jax.Array, key: jax.Array,
                      temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *, capacity: int, filters: bool,
                      propose=None):
    """One round on one device (module docstring) -> (tokens [B, N + 1], emitted [B] (accepted drafts + 1; 0 for
    inactive rows), next DraftState, next key, caches). ``cache``: the model's layers, then the MTP block's.
    ``propose``: steps 1 and 2, with ``draft``'s signature and results (default: ``draft``)."""
    L = model.config.num_hidden_layers
    meta = round_metadata(model.config, state, active, capacity)
    tokens, emitted, state, key, main, mtp = play_round(model, cache[:L], cache[L], state, active, meta, key,
                                                        (temperature, top_k, top_p), filters, propose)
    return tokens, emitted, state, key, main + (mtp,)


def play_round(model: DeepseekV4WithMTP, cache, mtp_cache, state: DraftState, active: jax.Array, meta: RoundMetadata,
               key: jax.Array, settings: tuple, filters: bool, propose=None, layers=None, sites=None):
    """Steps 1 to 5 of a round, on its metadata (``round_metadata``, built before) -> (tokens, emitted, next state,
    next key, the main model's caches, the MTP block's). On a mesh every device runs this on its shards (its rows
    of the state, ``active`` and the metadata); ``layers``, ``sites``: ``verify``'s."""
    key, draft_key, accept_key = jax.random.split(key, 3)
    drafts, draft_logits, mtp_cache = (propose or draft)(model, mtp_cache, state, meta, draft_key, settings, filters)
    tokens, emitted, state, cache = verify(model, cache, state, active, drafts, draft_logits, meta, accept_key,
                                           settings, filters, layers=layers, sites=sites)
    return tokens, emitted, state, key, cache, mtp_cache


def whole_batch(fn, *rows):
    """``fn`` (the sampler) over the whole batch from this data-parallel shard's rows [B_shard, ...] of each input ->
    its outputs at this shard's rows. The sampler draws every row from one key, so each shard then draws its rows as
    one device does; off a mesh (or with dp 1) this is ``fn(*rows)``."""
    n = rows[0].shape[0]
    return jax.tree.map(lambda y: own_rows(y, n), fn(*(all_rows(x) for x in rows)))


def draft(model: DeepseekV4WithMTP, mtp_cache, state: DraftState, meta: RoundMetadata, key: jax.Array,
          settings: tuple, filters: bool):
    """Steps 1 and 2 of a round -> (drafts [B, N], the logits each was drawn from [B, N, V], the MTP block's cache
    after step 1). ``settings``: (temperature, top_k, top_p) of ``sample``."""
    N = state.next_ids.shape[1] - 1
    keys = jax.random.split(key, N)

    def draw(logits, i):
        return whole_batch(lambda x: sample(x, keys[i], *settings, filters=filters), logits)

    # 1. extend: the block over the committed positions; its head at the last gives the first draft
    x, mtp_cache = model.mtp_streams(state.streams, state.next_ids, meta.extend, mtp_cache)
    g = at_positions(x, jnp.maximum(state.count - 1, 0))  # [B, n, d]
    logits = [model.mtp_head(g)]
    drafts = [draw(logits[0], 0)]
    # 2. the block on its own output streams, one position on each step; its cache writes here are not kept
    scratch = mtp_cache
    for i, step_meta in enumerate(meta.drafts, start=1):
        x, scratch = model.mtp_streams(g[:, None], drafts[-1][:, None], step_meta, scratch)
        g = x[:, 0]
        logits.append(model.mtp_head(g))
        drafts.append(draw(logits[-1], i))
    return jnp.stack(drafts, axis=1), jnp.stack(logits, axis=1), mtp_cache


def verify(model: DeepseekV4WithMTP, cache, state: DraftState, active: jax.Array, drafts: jax.Array,
           draft_logits: jax.Array, meta: RoundMetadata, key: jax.Array, settings: tuple, filters: bool, *,
           layers=None, sites=None):
    """Steps 3 to 5 of a round: the main model's caches ``cache`` and the drafts [B, N] (drawn from draft_logits
    [B, N, V]) -> (tokens [B, N + 1], emitted [B], next DraftState, the main model's caches). ``layers``: how the
    layer stack runs (default ``model.run_layers``; a pipeline's stages); ``sites``: the caches' leaves as
    ``model.rollback`` reads them (default: per layer, ``layer_sites``)."""
    cfg = model.config
    sites = layer_sites(cfg, cache) if sites is None else sites
    # 3. the main model over the last committed token and the drafts, the rows it overwrites read first
    last = jnp.take_along_axis(state.next_ids, jnp.maximum(state.count - 1, 0)[:, None], axis=1)
    ids = jnp.concatenate([last, drafts], axis=1)  # [B, N + 1]
    undo = undo_rows(sites, cache, meta.verify)
    streams, cache = (layers or model.run_layers)(model.embed_streams(ids), ids, meta.verify, cache)
    # 4. accept, 5. roll back what the rejected drafts wrote
    n, tokens = whole_batch(lambda *x: verify_drafts(*x, key, *settings, filters=filters), model.logits(streams),
                            draft_logits, drafts)
    emitted = (n + 1) * active
    with jax.named_scope("rollback"):
        cache = roll_back(sites, cache, undo, meta.verify, state.pos + emitted)
    on = active[:, None]
    next_state = DraftState(pos=state.pos + emitted, streams=jnp.where(on[..., None, None], streams, state.streams),
                            next_ids=jnp.where(on, tokens, state.next_ids), count=jnp.where(active, n + 1, state.count))
    return tokens, emitted, next_state, cache


def prefill_inputs(cfg: DeepseekV4Config, ids: jax.Array, next_ids: jax.Array, start: jax.Array, n_new: jax.Array,
                   n_mtp: jax.Array, capacity: int) -> tuple:
    """A prefill chunk's inputs to its layers, the metadata built once: ids, next_ids [B, S] (next_ids[:, t] the
    token after ids[:, t]) -> (both padded to the query block [B, C], the main model's metadata, the MTP block's
    (its first ``n_mtp`` [B] positions: those whose next token is known), each row's last real offset [B])."""
    S = ids.shape[1]
    ids, meta, last = prepare_chunk(cfg, ids, start, n_new, capacity, last_only=True)
    next_ids = jnp.pad(next_ids, ((0, 0), (0, ids.shape[1] - S)))
    with jax.named_scope(METADATA_SCOPE):
        mtp_meta = build_metadata(mtp_layer_config(cfg), start, n_mtp, ids.shape[1], capacity)
    return ids, next_ids, meta, mtp_meta, last


def prefill_layers(model: DeepseekV4WithMTP, cache, mtp_cache, ids: jax.Array, next_ids: jax.Array,
                   meta: ForwardMetadata, mtp_meta: ForwardMetadata, last: jax.Array, layers=None):
    """``prefill_inputs``' outputs through the main model and the MTP block -> ((logits [B, V], the main model's
    streams [B, n, d]) at each row's last real token, the main model's caches, the MTP block's). ``layers``: as
    ``verify``'s."""
    streams, cache = (layers or model.run_layers)(model.embed_streams(ids), ids, meta, cache)
    _, mtp_cache = model.mtp_streams(streams, next_ids, mtp_meta, mtp_cache)
    at_last = at_positions(streams, last)
    return (model.logits(at_last), at_last), cache, mtp_cache


def prefill_chunk(model: DeepseekV4WithMTP, cache: tuple, ids: jax.Array, next_ids: jax.Array, start: jax.Array,
                  n_new: jax.Array, n_mtp: jax.Array, capacity: int):
    """A prefill chunk on one device (``prefill_inputs``, then ``prefill_layers``) -> ((logits [B, V], streams
    [B, n, d]) at each row's last real token, caches: the model's layers, then the MTP block's)."""
    L = model.config.num_hidden_layers
    inputs = prefill_inputs(model.config, ids, next_ids, start, n_new, n_mtp, capacity)
    out, main, mtp = prefill_layers(model, cache[:L], cache[L], *inputs)
    return out, main + (mtp,)


def first_state(streams: jax.Array, first: jax.Array, pos: jax.Array, draft_tokens: int) -> DraftState:
    """The first round's state after the prefill: the block's chunk is the prompt's last position (the main
    model's streams there [B, n, d]), followed by the first generated token ``first`` [B]; ``pos`` [B] the
    prompt lengths."""
    C = draft_tokens + 1
    return DraftState(pos=pos, streams=jnp.pad(streams[:, None], ((0, 0), (0, C - 1), (0, 0), (0, 0))),
                      next_ids=jnp.pad(first[:, None], ((0, 0), (0, C - 1))), count=jnp.ones_like(pos))


class SpeculativeSteps:
    """The jitted steps of speculative decoding, built like ``engine.DeviceSteps`` (weights as a flat list, the
    graph definition closed over, caches donated, ``kernels`` static):

    ``prefill``: ``prefill_chunk``. ``round``: ``speculative_round`` (``filters`` static, as ``DeviceSteps.decode``)
    with ``propose`` drafting (default: the MTP block, ``draft``).

    ``sharded``: a ``runtime.mesh.ShardedStep`` (of this graph definition) runs both on its mesh: the metadata
    built on the whole batch, then ``ShardedStep.run``'s one shard_map; the caches are then the pair (the layers'
    caches as the sharded step keeps them, the MTP block's), the batch ``sharded.rows(B)``, and the tokens and
    logits come out whole on every device. Else one device, the caches a tuple of the layers' and the block's.
    """

    def __init__(self, graphdef, state_def, capacity: int, draft_tokens: int, propose=None, sharded=None):
        def model_of(weights):
            return nnx.merge(graphdef, jax.tree.unflatten(state_def, weights))

        def prefill(weights, cache, ids, next_ids, start, n_new, n_mtp, *, kernels: ops.Kernels):
            if sharded is None:
                with ops.use(kernels):
                    return prefill_chunk(model_of(weights), cache, ids, next_ids, start, n_new, n_mtp, capacity)
            inputs = prefill_inputs(sharded.cfg, ids, next_ids, start, n_new, n_mtp, capacity)

            def body(model, layers, cache, *inputs):
                out, main, mtp = prefill_layers(model, *cache, *inputs, layers=layers)
                return out, (main, mtp)
            out, cache = sharded.run(body, weights, cache, inputs, (), P(DP), kernels, mtp=True)
            return sharded.whole(out), cache

        def start(streams, first, pos):
            return first_state(streams, first, pos, draft_tokens)

        def round_(weights, cache, state, active, key, temperature, top_k, top_p, *, kernels: ops.Kernels,
                   filters: bool):
            if sharded is None:
                with ops.use(kernels):
                    return speculative_round(model_of(weights), cache, state, active, key, temperature, top_k,
                                             top_p, capacity=capacity, filters=filters, propose=propose)
            meta = round_metadata(sharded.cfg, state, active, capacity)

            def body(model, layers, cache, state, active, meta, key, settings):
                tokens, emitted, state, key, main, mtp = play_round(model, *cache, state, active, meta, key, settings,
                                                                    filters, propose, layers, sharded.cache_sites())
                return (tokens, emitted, state, key), (main, mtp)
            (tokens, emitted, state, key), cache = sharded.run(
                body, weights, cache, (state, active, meta), (key, (temperature, top_k, top_p)),
                (P(DP), P(DP), P(DP), P()), kernels, mtp=True)
            tokens, emitted = sharded.whole((tokens, emitted))
            return tokens, emitted, state, key, cache

        self.draft_tokens = draft_tokens
        self.prefill = jax.jit(prefill, static_argnames=("kernels",), donate_argnames=("cache",))
        self.start = jax.jit(start)
        self.round = jax.jit(round_, static_argnames=("kernels", "filters"), donate_argnames=("cache",))


def prefill_step(engine, prompts: list[list[int]]):
    """The chunk step ``Engine.prefill`` runs for speculative decoding: the main model and the MTP block, each
    chunk's next tokens read from the prompts."""
    steps = engine.speculative

    def run(cache, ids, start, n_new):
        B, size = ids.shape
        next_ids = np.zeros((B, size), np.int32)
        n_mtp = np.zeros(B, np.int32)
        for b, prompt in enumerate(prompts):
            nxt = prompt[start[b] + 1: start[b] + n_new[b] + 1]
            next_ids[b, :len(nxt)] = nxt
            n_mtp[b] = min(len(nxt), n_new[b])
        return steps.prefill(engine.weights, cache, *engine._inputs(ids, next_ids, start, n_new, n_mtp),
                             kernels=engine.kernels)

    return run


def stream(engine, padded: list[list[int]], n_prompts: int, max_new_tokens: int, sampling: SamplingParams,
           seed: int, eos: set[int]) -> Iterator[tuple[int, int]]:
    """``Engine.stream`` with speculative decoding: yields (sequence index, token) for the ``n_prompts`` first rows
    of ``padded`` (the rest pad the batch and never emit); fills ``engine.stats`` and ``engine.finish_reasons``.
    Rounds are issued one ahead of reading their tokens back, as ``Engine.stream`` issues its decode steps. On a
    mesh the batch is padded further, to the rows its steps run at (``Engine.layout``)."""
    steps, stats = engine.speculative, engine.stats
    t0 = time.perf_counter()
    padded = padded + [padded[0][:1]] * (engine.layout(len(padded))[1] - len(padded))
    (logits, last_streams), cache, lens = engine.prefill(padded, step=prefill_step(engine, padded))
    settings = engine._inputs(*sampling_args(sampling))
    first, pos, key = first_token(logits, lens, seed, *settings, filters=sampling.filters)
    state = steps.start(*engine._inputs(last_streams, first, pos))
    stats.prefill_seconds = time.perf_counter() - t0
    active = np.arange(len(padded)) < n_prompts
    left = np.where(active, max_new_tokens, 0)  # tokens each row may still emit
    active_dev = None
    t0 = time.perf_counter()

    def emit(tokens, counts):
        """Yield each active row's ``counts[b]`` first tokens until its EOS or its last allowed token."""
        for b in np.flatnonzero(active):
            for tok in tokens[b, :counts[b]]:
                stats.generated_tokens += 1
                left[b] -= 1
                yield int(b), int(tok)
                if int(tok) in eos:
                    engine.finish_reasons[b] = "eos"
                if int(tok) in eos or left[b] == 0:
                    active[b] = False
                    break

    def dispatch():
        nonlocal cache, key, state, active_dev
        t = time.perf_counter()
        if active_dev is None:
            active_dev, = engine._inputs(active.copy())
        tokens, counts, state, key, cache = steps.round(engine.weights, cache, state, active_dev, key, *settings,
                                                        kernels=engine.kernels, filters=sampling.filters)
        stats.decode_dispatch_seconds += time.perf_counter() - t
        return tokens, counts

    def read(in_flight):
        t = time.perf_counter()
        tokens, counts = (np.asarray(x) for x in in_flight)
        stats.decode_wait_seconds += time.perf_counter() - t
        rows = np.flatnonzero(active)
        stats.speculative_rounds += len(rows)
        stats.drafted_tokens += len(rows) * steps.draft_tokens
        stats.accepted_tokens += int(np.sum(counts[rows] - 1))
        return tokens, counts

    yield from emit(np.asarray(first)[:, None], np.ones(len(padded), np.int32))
    in_flight = dispatch() if active.any() else None
    # A round emits at least one token per active row, so the next is issued ahead only while some row has more
    # than one token left; a round in flight is then the last exactly when every row ends in it.
    while in_flight is not None:
        was = active.copy()
        ahead = dispatch() if (left[active] > 1).any() else None
        yield from emit(*read(in_flight))
        if (active != was).any():
            active_dev = None
        in_flight = ahead
    stats.decode_seconds = time.perf_counter() - t0
