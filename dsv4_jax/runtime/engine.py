"""Inference engine: fixed-capacity caches, chunked ragged prefill, token-by-token decode, sampling.

One jitted step serves prefill and decode: the metadata step, every layer, and (for decode) the
sampler, with the caches donated so XLA updates them in place. Rows of a batch are independent:
each has its own length, and padding never writes a cache slot (the metadata routes its writes
out of bounds, where they are dropped).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import ops
from ..model.cache import init_cache
from ..model.kv_rows import check_kv_cache_dtype
from ..model.mtp import DeepseekV4WithMTP, mtp_config
from ..model.transformer import DeepseekV4ForCausalLM, InputError, check_capacity, check_vocab, run_chunk
from .compile_cache import enable_compile_cache
from .mesh import ModelMesh, ShardedStep, check_layout, make_mesh, place_weights, replicated, weight_specs
from .pipeline import PipelinePlan, check_pipeline, stage_starts
from .sampling import SamplingParams, first_token, sample, sampling_args
from . import speculative as spec


class DeviceSteps:
    """The engine's two jitted device steps for one model structure and cache capacity.

    ``chunk``: a prefill chunk -> (logits, caches). ``decode``: one token per row, in the form the next
    call takes back, so a generation loop feeds the device's outputs straight in and sends nothing from
    the host per token: tokens [B], pos [B] int32, active [B] bool, key -> (next tokens [B], pos + active,
    next key, caches). The key is split inside (``split(key) = (next key, sampling key)``, as a host loop
    would); inactive rows write nothing. Caches are donated.

    Both take ``kernels`` (static: an ``ops.Kernels`` or an implementation name for every op) and trace the
    model under ``ops.use(kernels)``, so each choice compiles its own step.

    Both take the model's weights first, as a list of arrays (``split_weights``), and close over the graph
    definition and the state's tree structure: a batch-1 step is bound by the host's time to issue it, and
    hashing a graph definition or flattening an nnx.State per call costs far more than a list of arrays,
    which flattens in C++ (docs/performance.md, "Host time").
    """

    def __init__(self, graphdef, state_def, capacity: int, sharded=None):
        """``sharded``: a ``runtime.mesh.ShardedStep`` runs the forward on a device mesh (its weights list and
        caches; the batch padded to ``sharded.rows(B)`` before the metadata is built); else the model's own
        loop on one device."""

        def forward(weights, cache, token_ids, start, n_new, last_only, kernels):
            if sharded is None:
                with ops.use(kernels):
                    model = nnx.merge(graphdef, jax.tree.unflatten(state_def, weights))
                    return run_chunk(model, cache, token_ids, start, n_new, capacity, last_only)
            B = token_ids.shape[0]
            rows = sharded.rows(B)
            if rows != B:  # empty rows (n_new 0) write nothing
                token_ids, start, n_new = (jnp.pad(x, [(0, rows - B)] + [(0, 0)] * (x.ndim - 1))
                                           for x in (token_ids, start, n_new))
            logits, cache = sharded(weights, cache, token_ids, start, n_new, last_only, kernels)
            return logits[:B], cache

        def chunk(weights, cache, token_ids, start, n_new, *, last_only: bool, kernels: ops.Kernels = ops.Kernels()):
            return forward(weights, cache, token_ids, start, n_new, last_only, kernels)

        def decode(weights, cache, tokens, pos, active, key, temperature, top_k, top_p, *,
                   kernels: ops.Kernels = ops.Kernels(), filters: bool = True):
            key, sub = jax.random.split(key)
            logits, cache = forward(weights, cache, tokens[:, None], pos, active.astype(jnp.int32), True, kernels)
            return sample(logits, sub, temperature, top_k, top_p, filters=filters), pos + active, key, cache

        self.chunk = jax.jit(chunk, static_argnames=("last_only", "kernels"), donate_argnames=("cache",))
        self.decode = jax.jit(decode, static_argnames=("kernels", "filters"), donate_argnames=("cache",))


def split_weights(model) -> tuple:
    """model -> (graph definition, the state's tree structure, its leaves as a list): the first two build
    ``DeviceSteps``, the list is the weights argument of its steps."""
    graphdef, state = nnx.split(model)
    weights, state_def = jax.tree.flatten(state)
    return graphdef, state_def, weights


def parse_kernels(kernels: str | ops.Kernels | None) -> ops.Kernels:
    """The engine's ``kernels`` argument: a ``Kernels``, an implementation name for every op, or None
    (``default_kernels``); raises InputError naming a bad value."""
    try:
        return ops.Kernels.parse(kernels or default_kernels())
    except ValueError as e:
        raise InputError(str(e)) from None


def default_kernels() -> str:
    """The implementation the engine uses unless told. Off the GPU, the plain-JAX reference (Pallas runs
    there only in interpret mode, for tests). On the GPU, "pallas": faster at every measured batch size, and
    XLA's prefill runs out of memory in its dense ragged dot (docs/performance.md, "Why "pallas" is the GPU
    default")."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def default_prefill_chunk() -> int:
    """Prompt tokens per prefill step unless told. On the GPU 16384: the longer the chunk, the more rows
    each expert's grouped matmul gets (docs/performance.md, "Why 16384-token prefill chunks"). Elsewhere 256
    (the demo model on a CPU). Short prompts do not pay for a long chunk (``Engine.prefill`` shrinks the
    steps)."""
    return 16384 if jax.default_backend() == "gpu" else 256


def chunk_bucket(remaining: int, chunk: int) -> int:
    """The step length for a prefill with at most ``remaining`` prompt tokens left in any row: ``chunk``, or
    the next power of two >= ``remaining`` (at least 64) when that is shorter, so a short prompt (or a long
    one's tail) is not padded to a long chunk, and few distinct shapes get compiled."""
    return min(chunk, max(64, 1 << (remaining - 1).bit_length()))


def batch_bucket(batch: int) -> int:
    """The batch a generation of ``batch`` prompts runs at: the next power of two, so that a new batch size
    mostly reuses a step already compiled (the padding rows never emit a token)."""
    return 1 << (batch - 1).bit_length()


@dataclasses.dataclass
class GenerationResult:
    tokens: list[int]  # the new tokens (EOS included when it stopped the sequence)
    text: str | None = None
    finish_reason: str = "length"  # "eos" or "length"


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    # Host time inside decode_seconds: issuing the decode steps, and blocked reading their tokens back
    # (the rest is the Python loop and whatever the caller does between yielded tokens).
    decode_dispatch_seconds: float = 0.0
    decode_wait_seconds: float = 0.0
    # Speculative decoding (runtime/speculative.py), over the rows active in each round: rounds, tokens drafted,
    # drafts accepted.
    speculative_rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Drafted tokens the main model accepted, as a fraction."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens a row gains per speculative round: accepted drafts plus the main model's own."""
        return (self.accepted_tokens + self.speculative_rounds) / self.speculative_rounds if self.speculative_rounds \
            else 0.0


class Engine:
    """Load once, generate many times.

    >>> engine = Engine(dsv4_jax.from_pretrained(path), capacity=4096, tokenizer=tok)
    >>> engine.generate(["Once upon a time"], max_new_tokens=32)

    ``kv_cache_dtype``: how the caches keep the attention's K=V rows (window ring and compressed entries): "auto",
    in the model's dtype; "fp8", DeepSeek's FP8 record (e4m3 no-RoPE channels with a power-of-two scale per 64,
    bf16 RoPE channels: 583 bytes a row against 1,024 in bf16; model/kv_rows.py, docs/performance.md).

    ``mesh``: a ``runtime.mesh.ModelMesh`` (``make_mesh(tp=, dp=, pp=, ep=)``) to shard the model over; the
    weights are placed as its rules say. Weights already laid out so (``from_pretrained(..., mesh=)``, or a
    one-device model on a 1-device mesh) keep their buffers; others are copied to their shards while the
    engine keeps ``model`` (``self.model``), so a one-device model placed on a larger mesh is held twice: load
    it with ``from_pretrained(..., mesh=)`` where that does not fit. With pp > 1 the layers run as pipeline
    stages (``runtime.pipeline``): ``pp_boundaries``, the first layer of stages 1..pp-1 (default: an even
    split); ``microbatches``, GPipe microbatches per dp shard of rows (default min(pp, rows)).

    ``speculative="mtp"``: decode with the model's MTP block (a ``DeepseekV4WithMTP``) drafting ``draft_tokens``
    tokens a step, verified in one chunk step of the main model (runtime/speculative.py); greedy tokens are those
    of decoding without it, sampled ones distributed as they are. On a mesh too (its steps are the sharded step's),
    and with either ``kv_cache_dtype``.
    """

    pipelined = False  # layers as pipeline stages (runtime.pipeline) only when the mesh has pp > 1

    def __init__(self, model: DeepseekV4ForCausalLM, capacity: int = 2048, prefill_chunk: int | None = None,
                 tokenizer=None, kernels: str | ops.Kernels | None = None, compile_cache: bool = True,
                 mesh: ModelMesh | None = None, pp_boundaries: Sequence[int] | None = None,
                 microbatches: int | None = None, kv_cache_dtype: str = "auto", speculative: str | None = None,
                 draft_tokens: int = 3):
        spec.check_speculative(model.config, speculative, draft_tokens, isinstance(model, DeepseekV4WithMTP))
        if compile_cache:  # (dsv4_jax.runtime.compile_cache): a second run loads its steps from disk
            enable_compile_cache()
        if prefill_chunk is None:
            prefill_chunk = default_prefill_chunk()
        if capacity <= 0 or prefill_chunk <= 0:
            raise InputError(f"capacity ({capacity}) and prefill_chunk ({prefill_chunk}) must be positive")
        self.kernels = parse_kernels(kernels)
        try:
            self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        except ValueError as e:
            raise InputError(str(e)) from None
        if mesh is not None:
            check_layout(model.config, mesh.tp, mesh.dp, mesh.pp, mesh.ep, mesh.mesh.size)
        if microbatches is not None and (isinstance(microbatches, bool) or microbatches < 1):
            raise InputError(f"microbatches {microbatches!r} must be a positive integer")
        if (pp_boundaries is not None or microbatches is not None) and (mesh is None or not (
                mesh.pp > 1 or self.pipelined)):
            raise InputError("pp_boundaries and microbatches need a mesh with pp > 1")
        self.mesh, self.pp_boundaries, self.microbatches = mesh, pp_boundaries, microbatches
        self.plan = None  # the pipeline's stages (runtime.pipeline.PipelinePlan), when the layers run as such
        self.pp = 1 if mesh is None else mesh.pp
        self.model = model
        self.config = model.config
        self.capacity = capacity
        self.prefill_chunk = prefill_chunk
        self.tokenizer = tokenizer
        self.sharded = None  # the sharded step (runtime.mesh.ShardedStep), on a mesh
        self.steps, self.weights = self._place(model)
        self.speculative = None  # the speculative steps (runtime.speculative.SpeculativeSteps), when on
        if speculative is not None:
            self.speculative = self.speculative_steps(draft_tokens)
        self.stats = GenerationStats()

    # ----- input checks --------------------------------------------------------------------
    def _token_lists(self, prompts) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if len(prompts) == 0:
            raise InputError("no prompts given; expected at least one")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise InputError("a text prompt needs a tokenizer; pass token ids or a tokenizer")
                p = self.tokenizer.encode(p)
            ids = [int(t) for t in p]
            if not ids:
                raise InputError("empty prompt; expected at least one token")
            check_vocab(ids, self.config.vocab_size)
            out.append(ids)
        return out

    def _check_capacity(self, prompts: list[list[int]], max_new_tokens: int):
        check_capacity(max(len(p) for p in prompts), max_new_tokens, self.capacity)

    # ----- device steps ------------------------------------------------------------------------
    def _place(self, model: DeepseekV4ForCausalLM) -> tuple[DeviceSteps, list]:
        """(the jitted steps, their weights argument): the model's own layer loop on one device, or the
        sharded step on the mesh."""
        if self.mesh is None:
            graphdef, state_def, weights = split_weights(model)
            return DeviceSteps(graphdef, state_def, self.capacity), weights
        if self.mesh.pp == 1 and not self.pipelined:
            graphdef, state_def, weights = place_weights(model, self.mesh)
        else:
            starts = stage_starts(self.config.num_hidden_layers, self.mesh.pp, self.pp_boundaries)
            self.plan = PipelinePlan(model, starts, self.mesh, self.capacity, self.microbatches, self.kv_cache_dtype)
            graphdef, state_def, weights = self.plan.graphdef, self.plan.state_def, self.plan.place_weights()
        self.sharded = ShardedStep(self.config, graphdef, state_def, weight_specs(weights), self.mesh, self.capacity,
                                   model.dtype, plan=self.plan, kv_cache_dtype=self.kv_cache_dtype)
        return DeviceSteps(graphdef, state_def, self.capacity, sharded=self.sharded), weights

    def speculative_steps(self, draft_tokens: int, propose=None) -> spec.SpeculativeSteps:
        """Speculative decoding's steps for this engine's model and placement (on its mesh when it has one);
        ``propose``: ``SpeculativeSteps``'."""
        graph = split_weights(self.model)[:2] if self.sharded is None else (self.sharded.graphdef,
                                                                             self.sharded.state_def)
        return spec.SpeculativeSteps(*graph, self.capacity, draft_tokens, propose=propose, sharded=self.sharded)

    def layout(self, batch: int) -> tuple[int, int]:
        """(microbatches per dp shard, padded batch) a step of ``batch`` rows runs with."""
        if self.mesh is None:
            return 1, batch
        return (1, self.mesh.rows(batch)) if self.plan is None else self.plan.layout(batch)

    def _new_cache(self, batch: int):
        if self.mesh is not None:  # with speculative decoding: (the layers' caches, the MTP block's)
            return self.sharded.new_cache(batch, mtp=self.speculative is not None)
        cfg = self.config if self.speculative is None else mtp_config(self.config)  # + the MTP block's cache
        return init_cache(cfg, batch, self.capacity, self.model.dtype, self.kv_cache_dtype)

    def _inputs(self, *xs) -> list:
        """Host or device inputs of a step: on a mesh, global arrays replicated over it (valid across processes;
        the previous step's outputs already are and pass through); else as they are (host arrays as jax ones)."""
        if self.mesh is None:
            return [jnp.asarray(x) for x in xs]
        devices = set(self.mesh.mesh.devices.flat)
        return [x if isinstance(x, jax.Array) and x.sharding.device_set == devices else replicated(self.mesh, x)
                for x in xs]

    def _run_chunk(self, cache, ids: np.ndarray, start: np.ndarray, n_new: np.ndarray, last_only: bool):
        """ids [B, C] host ints -> (logits, caches): one prefill chunk. On a mesh the logits come back to the
        host (they are replicated, so every process reads them whole)."""
        logits, cache = self.steps.chunk(self.weights, cache, *self._inputs(ids, start, n_new), last_only=last_only,
                                         kernels=self.kernels)
        return (logits if self.mesh is None else np.asarray(logits)), cache

    def _run_decode(self, cache, tokens, pos, active, key, temperature, top_k, top_p, filters: bool):
        """``DeviceSteps.decode``'s contract: (next tokens [B], pos + active, next key, caches); the sampling
        settings as ``sampling_args`` makes them (device scalars) and ``SamplingParams.filters``."""
        if self.mesh is not None:
            tokens, pos, active, key, temperature, top_k, top_p = self._inputs(tokens, pos, active, key, temperature,
                                                                               top_k, top_p)
        return self.steps.decode(self.weights, cache, tokens, pos, active, key, temperature, top_k, top_p,
                                 kernels=self.kernels, filters=filters)

    # ----- the two phases ------------------------------------------------------------------
    def prefill(self, prompts: list[list[int]], chunk: int | None = None, step=None):
        """Run all prompts through the caches in chunks; returns (last-token logits [B, V], caches, lengths).
        ``step(cache, ids, start, n_new)`` -> (outputs [B, ...], caches) runs a chunk instead of the main model's
        last-token logits; each output is then returned at each row's last prompt token, [B, ...]."""
        chunk = chunk or self.prefill_chunk
        step = step or (lambda cache, ids, start, n_new: self._run_chunk(cache, ids, start, n_new, last_only=True))
        B = len(prompts)
        lens = np.array([len(p) for p in prompts], np.int32)
        cache = self._new_cache(B)
        done = np.zeros(B, np.int32)
        last = [None] * B
        while (done < lens).any():
            size = chunk_bucket(int((lens - done).max()), chunk)
            n_new = np.minimum(lens - done, size).astype(np.int32)
            ids = np.zeros((B, size), np.int32)
            for b in range(B):
                ids[b, : n_new[b]] = prompts[b][done[b] : done[b] + n_new[b]]
            out, cache = step(cache, ids, done, n_new)
            done = done + n_new
            for b in np.flatnonzero((n_new > 0) & (done == lens)):
                last[b] = jax.tree.map(lambda x: x[b], out)
        return jax.tree.map(lambda *rows: jnp.stack(rows), *last), cache, lens

    def stream(self, prompts, max_new_tokens: int = 32, sampling: SamplingParams = SamplingParams(),
               seed: int = 0, eos_token_ids: Sequence[int] | None = None) -> Iterator[tuple[int, int]]:
        """Yield (sequence index, new token id) as tokens are produced; stops per sequence on EOS."""
        prompts = self._token_lists(prompts)
        self._check_capacity(prompts, max_new_tokens)
        eos = set(self.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.stats = stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts))
        self.finish_reasons = ["length"] * len(prompts)
        if max_new_tokens == 0:
            return
        t0 = time.perf_counter()
        # Padding rows: one token each, inactive from the start, so they never yield a token.
        padded = prompts + [prompts[0][:1]] * (batch_bucket(len(prompts)) - len(prompts))
        if self.speculative is not None:
            yield from spec.stream(self, padded, len(prompts), max_new_tokens, sampling, seed, eos)
            return
        logits, cache, lens = self.prefill(padded)
        # The settings as device scalars once per generation, not per step: host time a batch-1 step cannot spare.
        settings = sampling_args(sampling)
        step_tokens, pos, key = first_token(logits, lens, seed, *settings, filters=sampling.filters)
        tokens = np.asarray(step_tokens)
        stats.prefill_seconds = time.perf_counter() - t0
        active = np.arange(len(padded)) < len(prompts)
        # Positions, the key and the active mask stay on the device from step to step; the mask is sent
        # again only after an EOS has changed it (as a copy: the host edits ``active`` while a step may
        # still be reading the device array, which on a CPU can share its memory).
        active_dev = None
        t0 = time.perf_counter()

        def dispatch(step_tokens):
            """Issue the next decode step on the device outputs of the previous one (no host round trip)."""
            nonlocal cache, key, pos, active_dev
            t = time.perf_counter()
            if active_dev is None:
                active_dev = jnp.asarray(active.copy())
            next_tokens, pos, key, cache = self._run_decode(cache, step_tokens, pos, active_dev, key, *settings,
                                                            sampling.filters)
            stats.decode_dispatch_seconds += time.perf_counter() - t
            return next_tokens

        # One step of lookahead: step s + 1 is issued before step s's tokens are read back and yielded, so
        # the device never waits for the host's read, EOS check and launch of the next step. A row that
        # ends at step s has therefore run step s + 1 as well; that token is dropped and the row's cache no
        # longer matters. Tokens and sampling keys are the same as stepping one token at a time.
        in_flight = dispatch(step_tokens) if max_new_tokens > 1 else None
        for step in range(max_new_tokens):
            for b in np.flatnonzero(active):
                stats.generated_tokens += 1
                yield int(b), int(tokens[b])
                if int(tokens[b]) in eos:
                    active[b], active_dev = False, None
                    self.finish_reasons[b] = "eos"
            if step == max_new_tokens - 1 or not active.any():
                break
            step_tokens = in_flight
            in_flight = dispatch(step_tokens) if step + 2 < max_new_tokens else None
            t = time.perf_counter()
            tokens = np.asarray(step_tokens)
            stats.decode_wait_seconds += time.perf_counter() - t
        stats.decode_seconds = time.perf_counter() - t0

    def generate(self, prompts, max_new_tokens: int = 32, sampling: SamplingParams = SamplingParams(),
                 seed: int = 0, eos_token_ids: Sequence[int] | None = None) -> list[GenerationResult]:
        """Generate for a batch of prompts (text or token-id lists); returns one result per prompt."""
        token_lists = self._token_lists(prompts)
        new = [[] for _ in token_lists]
        for b, tok in self.stream(token_lists, max_new_tokens, sampling, seed, eos_token_ids):
            new[b].append(tok)
        results = []
        for b, toks in enumerate(new):
            text = self.tokenizer.decode(toks) if self.tokenizer is not None else None
            results.append(GenerationResult(tokens=toks, text=text, finish_reason=self.finish_reasons[b]))
        return results


class PipelineEngine(Engine):
    """``Engine`` with the layers pipelined over ``pp`` devices, one stage each: ``Engine(model,
    mesh=make_mesh(pp=pp, devices=devices), pp_boundaries=boundaries, microbatches=microbatches)``.

    >>> engine = PipelineEngine(model, pp=4, boundaries=(2, 3, 6), microbatches=2, capacity=4096)
    >>> engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=16)

    ``devices``: the pipeline's devices in stage order (default: the first pp of ``jax.devices()``, which spans
    all processes after ``jax.distributed.initialize``).
    """

    def __init__(self, model: DeepseekV4ForCausalLM, pp: int, boundaries: Sequence[int] | None = None,
                 microbatches: int | None = None, capacity: int = 2048, prefill_chunk: int | None = None,
                 tokenizer=None, devices=None, kernels: str | ops.Kernels | None = None, kv_cache_dtype: str = "auto"):
        _, devices = check_pipeline(model.config.num_hidden_layers, pp, boundaries, devices)
        super().__init__(model, capacity=capacity, prefill_chunk=prefill_chunk, tokenizer=tokenizer, kernels=kernels,
                         mesh=make_mesh(pp=pp, devices=devices), pp_boundaries=boundaries, microbatches=microbatches,
                         kv_cache_dtype=kv_cache_dtype)

    pipelined = True  # even at pp = 1: the stage program, with its microbatches
