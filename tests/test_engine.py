"""Engine: chunked prefill + decode against the stateless forward, ragged batches, metadata once."""

from __future__ import annotations

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny
from dsv4_jax import ops
from dsv4_jax.model.cache import init_cache
from dsv4_jax.model.config import CSA, HCA, SLIDING
from dsv4_jax.runtime.engine import Engine, batch_bucket, chunk_bucket
from dsv4_jax.model.transformer import METADATA_SCOPE, DeepseekV4ForCausalLM, InputError, run_chunk

CFG = tiny()  # window 8, CSA m=4 (top-k 4), HCA m=8


@pytest.fixture(scope="module")
def model():
    return DeepseekV4ForCausalLM(CFG, rngs=nnx.Rngs(7))


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def chunked_logits(engine: Engine, ids: np.ndarray, chunk: int) -> np.ndarray:
    """Logits at every position of ids [B, S] fed to the caches ``chunk`` tokens at a time."""
    B, S = ids.shape
    cache = init_cache(engine.config, B, engine.capacity, engine.model.dtype)
    out = []
    for pos in range(0, S, chunk):
        n = min(chunk, S - pos)
        logits, cache = engine.steps.chunk(engine.weights, cache, jnp.asarray(ids[:, pos:pos + n]),
                                           jnp.full((B,), pos, jnp.int32), jnp.full((B,), n, jnp.int32),
                                           last_only=False)
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("chunk", [1, 3, 5, 70])
def test_chunked_prefill_and_decode_equal_stateless(model, chunk):
    """70 tokens: longer than the window (8), several HCA windows (8) and CSA entries above top-k (4).
    chunk 1 is token-by-token decode; 3 and 5 do not align with 4 or 8."""
    ids = np.random.RandomState(chunk).randint(0, CFG.vocab_size, (2, 70))
    full = np.asarray(model(ids))
    got = chunked_logits(Engine(model, capacity=80), ids, chunk)
    assert rel_err(got, full) < 1e-5
    np.testing.assert_array_equal(got.argmax(-1), full.argmax(-1))


@pytest.mark.parametrize("kernels", ["xla", "pallas"])
def test_decode_past_the_window_equals_stateless(model, kernels):
    """A 5-token prompt in one chunk, then 19 one-token steps (the decode layout: the written ring is the
    window) to position 23: the ring (8) wraps twice. Every logit against the stateless forward, on the XLA
    path and through the Pallas kernels (interpret mode on the CPU)."""
    ids = np.random.RandomState(9).randint(0, CFG.vocab_size, (2, 24))
    engine = Engine(model, capacity=32, kernels=kernels)
    cache = init_cache(CFG, 2, engine.capacity, engine.model.dtype)
    out = []
    for pos, n in [(0, 5)] + [(p, 1) for p in range(5, 24)]:
        logits, cache = engine.steps.chunk(engine.weights, cache, jnp.asarray(ids[:, pos:pos + n]),
                                           jnp.full((2,), pos, jnp.int32), jnp.full((2,), n, jnp.int32),
                                           last_only=False, kernels=kernels)
        out.append(np.asarray(logits))
    full = np.asarray(model(ids))
    got = np.concatenate(out, axis=1)
    assert rel_err(got, full) < 1e-5
    np.testing.assert_array_equal(got.argmax(-1), full.argmax(-1))


def test_prefill_steps_shrink_to_the_prompts_left():
    """A long chunk does not pad a short prompt (or a long prompt's tail) to its length: powers of two >= 64."""
    assert [chunk_bucket(r, 8192) for r in (1, 64, 65, 300, 8192, 9000)] == [64, 64, 128, 512, 8192, 8192]
    assert [chunk_bucket(r, 10) for r in (3, 10, 500)] == [10, 10, 10]


def test_prefill_chunk_does_not_change_tokens(model):
    """Ragged prompts of 100 / 5 / 70 tokens: one 4096-token chunk (steps of 128 then nothing) and 16-token
    chunks give the same greedy tokens."""
    rng = np.random.RandomState(8)
    prompts = [list(rng.randint(2, CFG.vocab_size, n)) for n in (100, 5, 70)]
    small = Engine(model, capacity=128, prefill_chunk=16).generate(prompts, max_new_tokens=6)
    large = Engine(model, capacity=128, prefill_chunk=4096).generate(prompts, max_new_tokens=6)
    assert [r.tokens for r in large] == [r.tokens for r in small]


def test_ragged_batch_equals_each_sequence_alone(model):
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(2, CFG.vocab_size, n)) for n in (37, 5, 20)]
    engine = Engine(model, capacity=64, prefill_chunk=16)
    batch = engine.generate(prompts, max_new_tokens=12)
    for prompt, res in zip(prompts, batch):
        alone = engine.generate([prompt], max_new_tokens=12)[0]
        assert res.tokens == alone.tokens

    # Caches after a ragged prefill: every entry a real token can read equals the single-sequence cache.
    _, ragged, lens = engine.prefill(prompts)
    for b, prompt in enumerate(prompts):
        _, single, _ = engine.prefill([prompt])
        n = len(prompt)
        for layer, (rc, sc) in enumerate(zip(ragged, single)):
            ring_slots = [p % CFG.sliding_window for p in range(max(0, n - CFG.sliding_window), n)]
            np.testing.assert_allclose(rc.window_kv[b, ring_slots], sc.window_kv[0, ring_slots], rtol=1e-5, atol=1e-6)
            if rc.compressed_kv is not None:
                m = CFG.layer_compress_rate(layer)
                np.testing.assert_allclose(rc.compressed_kv[b, : n // m], sc.compressed_kv[0, : n // m],
                                           rtol=1e-5, atol=1e-6)
                assert not np.asarray(rc.compressed_kv[b, n // m:]).any(), "padding wrote a compressed entry"
            if rc.index_keys is not None:
                np.testing.assert_allclose(rc.index_keys[b, : n // 4], sc.index_keys[0, : n // 4], rtol=1e-5, atol=1e-6)
                assert not np.asarray(rc.index_keys[b, n // 4:]).any(), "padding wrote an indexer key"


def test_padding_never_writes_cache(model):
    """A row with no new tokens (n_new = 0) leaves every cache array of that row untouched."""
    B = 2
    engine = Engine(model, capacity=32)
    cache = init_cache(CFG, B, 32, jnp.float32)
    ids = jnp.asarray(np.random.RandomState(3).randint(0, CFG.vocab_size, (B, 16)))
    _, cache = engine.steps.chunk(engine.weights, cache, ids, jnp.zeros(B, jnp.int32), jnp.array([16, 0], jnp.int32),
                                  last_only=True)
    for leaf in jax.tree.leaves(cache):
        assert not np.asarray(leaf[1]).any()
        assert np.asarray(leaf[0]).any()


def _metadata_eqns(jaxpr, inherited="", into_kernels=True):
    """Yield (name_stack, eqn) over a jaxpr and its sub-jaxprs (with ``into_kernels``, the Pallas kernels'
    bodies too), in program order."""
    for eqn in jaxpr.eqns:
        stack = inherited + "/" + str(eqn.source_info.name_stack)
        yield stack, eqn
        if into_kernels or eqn.primitive.name != "pallas_call":
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from _metadata_eqns(sub, stack, into_kernels)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("n_layers", [3, 7])
def test_metadata_is_built_once_before_the_first_layer(n_layers, kv_cache_dtype):
    """Also with the FP8 cache, whose writes quantise and whose reads dequantise inside the layers."""
    types = (SLIDING, CSA, HCA, CSA, HCA, CSA, HCA)[:n_layers]
    cfg = dataclasses.replace(CFG, num_hidden_layers=n_layers, layer_types=types,
                              mlp_layer_types=(CFG.mlp_layer_types * 2)[:n_layers])
    m = DeepseekV4ForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(m)
    B, C, cap = 2, 12, 32

    def step(state, cache, ids, start, n_new):
        return run_chunk(nnx.merge(graphdef, state), cache, ids, start, n_new, cap)

    jaxpr = jax.make_jaxpr(step)(state, init_cache(cfg, B, cap, jnp.float32, kv_cache_dtype),
                                 jnp.zeros((B, C), jnp.int32), jnp.zeros(B, jnp.int32), jnp.full(B, C, jnp.int32)).jaxpr
    order = [("meta" if METADATA_SCOPE in s else "layer" if "layer_" in s else "other")
             for s, _ in _metadata_eqns(jaxpr)]
    meta_idx = [i for i, o in enumerate(order) if o == "meta"]
    layer_idx = [i for i, o in enumerate(order) if o == "layer"]
    assert meta_idx and layer_idx
    assert max(meta_idx) < min(layer_idx), "metadata must be complete before the first layer runs"
    # No layer scope contains metadata work, and the metadata work does not grow with the layer count.
    assert not any(METADATA_SCOPE in s and "layer_" in s for s, _ in _metadata_eqns(jaxpr))
    counts = test_metadata_is_built_once_before_the_first_layer.counts.setdefault(kv_cache_dtype, {})
    counts[n_layers] = len(meta_idx)
    if len(counts) == 2:
        assert len(set(counts.values())) == 1, counts


test_metadata_is_built_once_before_the_first_layer.counts = {}


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("kernels", ["xla", "pallas"])
@pytest.mark.parametrize("C", [1, 12])
def test_layers_build_no_index_the_metadata_holds(kernels, C, kv_cache_dtype):
    """The metadata step builds every index a layer reads: no layer scope builds the HCA visible entry ids
    (an iota over the HCA entry axis) or assembles index or mask lists (a concatenate of integer or boolean
    arrays; the only ones left join one-wide index columns into gather / scatter index tuples), on either
    kernel path, for a chunk and a decode step (CPU: the Pallas kernels are traced, not run), with either
    cache."""
    types = (SLIDING, CSA, HCA)
    cfg = dataclasses.replace(CFG, num_hidden_layers=3, layer_types=types, mlp_layer_types=CFG.mlp_layer_types[:3])
    graphdef, state = nnx.split(DeepseekV4ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    B, cap = 2, 32
    n_hca = cap // cfg.hca_compress_rate
    assert n_hca not in (B, cap // cfg.csa_compress_rate)  # an iota of this length can only be the HCA ids

    def step(state, cache, ids, start, n_new):
        with ops.use(kernels):
            return run_chunk(nnx.merge(graphdef, state), cache, ids, start, n_new, cap)

    jaxpr = jax.make_jaxpr(step)(state, init_cache(cfg, B, cap, jnp.float32, kv_cache_dtype),
                                 jnp.zeros((B, C), jnp.int32), jnp.zeros(B, jnp.int32), jnp.full(B, C, jnp.int32)).jaxpr
    in_layers = [e for s, e in _metadata_eqns(jaxpr, into_kernels=False) if "layer_" in s]
    assert in_layers
    ids = [e for e in in_layers if e.primitive.name == "iota" and e.params["shape"][e.params["dimension"]] == n_hca]
    assert not ids, "a layer builds the HCA visible entry ids"
    lists = [e for e in in_layers if e.primitive.name == "concatenate"  # uint8: the FP8 cache's scale bytes (data)
             and not jnp.issubdtype(e.outvars[0].aval.dtype, jnp.floating) and e.outvars[0].aval.dtype != jnp.uint8
             and any(v.aval.shape[e.params["dimension"]] > 1 for v in e.invars)]
    assert not lists, [str(e) for e in lists]


def test_same_inputs_bitwise_identical(model):
    ids = np.random.RandomState(1).randint(0, CFG.vocab_size, (2, 40))
    engine = Engine(model, capacity=48)
    a = chunked_logits(engine, ids, 7)
    b = chunked_logits(engine, ids, 7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(model(ids)))


def test_per_sequence_stop_on_eos(model):
    """Greedy: pick the token the first sequence produces at step 3 as EOS; that row stops there."""
    engine = Engine(model, capacity=64)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    free = engine.generate(prompts, max_new_tokens=10)
    eos = free[0].tokens[3]
    stopped = engine.generate(prompts, max_new_tokens=10, eos_token_ids=[eos])
    first = free[0].tokens.index(eos)
    assert stopped[0].tokens == free[0].tokens[: first + 1] and stopped[0].finish_reason == "eos"
    if eos not in free[1].tokens:
        assert stopped[1].tokens == free[1].tokens and stopped[1].finish_reason == "length"


def test_batch_sizes_share_a_bucket_and_padding_rows_never_emit(model):
    """Batch 3 runs at 4: no new compilation after batch 4, and the padding row yields nothing."""
    engine = Engine(model, capacity=64)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    four = engine.generate(prompts, max_new_tokens=5, eos_token_ids=[])
    compiled = (engine.steps.chunk._cache_size(), engine.steps.decode._cache_size())
    three = engine.generate(prompts[:3], max_new_tokens=5, eos_token_ids=[])
    assert (engine.steps.chunk._cache_size(), engine.steps.decode._cache_size()) == compiled
    assert [r.tokens for r in three] == [r.tokens for r in four[:3]]
    assert engine.stats.generated_tokens == 15 and len(engine.finish_reasons) == 3
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


def test_generation_stats_account_for_the_decode_time(model):
    """Token counts, and the host time spent issuing steps and waiting on read-back within the decode time."""
    engine = Engine(model, capacity=64)
    engine.generate([[5, 6, 7], [8, 9]], max_new_tokens=6, eos_token_ids=[])
    st = engine.stats
    assert (st.prompt_tokens, st.generated_tokens) == (5, 12)
    assert st.decode_dispatch_seconds > 0 and st.decode_wait_seconds >= 0
    assert st.decode_dispatch_seconds + st.decode_wait_seconds <= st.decode_seconds


def test_lookahead_decode_equals_one_step_at_a_time(model):
    """The engine issues step s + 1 before reading step s back. Against a plain loop that reads each step's
    tokens, checks EOS and only then issues the next (same prefill, same key splits): sampled tokens and
    finish reasons are equal, including a row that stops on EOS while the others go on."""
    from dsv4_jax.runtime.sampling import SamplingParams, sample, sampling_args

    engine = Engine(model, capacity=64, prefill_chunk=8)
    prompts = [list(range(3, 3 + n)) for n in (13, 6, 9)]
    sampling, seed, new = SamplingParams(temperature=0.9, top_k=6), 3, 12

    def one_step_at_a_time(eos):
        logits, cache, lens = engine.prefill(prompts)
        key, sub = jax.random.split(jax.random.PRNGKey(seed))
        params = sampling_args(sampling)
        tokens, active, pos = np.asarray(sample(logits, sub, *params)), np.ones(len(prompts), bool), lens.copy()
        out, reasons = [[] for _ in prompts], ["length"] * len(prompts)
        for step in range(new):
            for b in np.flatnonzero(active):
                out[b].append(int(tokens[b]))
                if int(tokens[b]) in eos:
                    active[b], reasons[b] = False, "eos"
            if step == new - 1 or not active.any():
                break
            nxt, _, key, cache = engine.steps.decode(engine.weights, cache, jnp.asarray(tokens), jnp.asarray(pos),
                                                     jnp.asarray(active), key, *params, kernels=engine.kernels)
            pos, tokens = pos + active, np.asarray(nxt)
        return out, reasons

    free, _ = one_step_at_a_time(set())
    eos = {free[1][4]}  # row 1 stops at (or before) its fifth token
    want, want_reasons = one_step_at_a_time(eos)
    got = engine.generate(prompts, max_new_tokens=new, sampling=sampling, seed=seed, eos_token_ids=eos)
    assert [r.tokens for r in got] == want
    assert [r.finish_reason for r in got] == want_reasons and "eos" in want_reasons


def test_engine_rejects_bad_input(model):
    engine = Engine(model, capacity=16)
    with pytest.raises(InputError, match=r"token id 300 is outside the vocabulary \[0, 256\)"):
        engine.generate([[1, 300]])
    with pytest.raises(InputError, match="token id -1"):
        engine.generate([[1, -1]])
    with pytest.raises(InputError, match="empty prompt"):
        engine.generate([[]])
    with pytest.raises(InputError, match="max_new_tokens -1"):
        engine.generate([[1]], max_new_tokens=-1)
    with pytest.raises(InputError, match="prompt of 10 tokens \\+ max_new_tokens 7 exceeds the cache capacity of 16"):
        engine.generate([[1] * 10], max_new_tokens=7)
    with pytest.raises(InputError, match=r"^kernels 'triton' is not one of \('xla', 'pallas'\)$"):
        Engine(model, capacity=16, kernels="triton")
    with pytest.raises(InputError, match=r"prefill_chunk \(0\) must be positive"):
        Engine(model, capacity=16, prefill_chunk=0)


def test_kernel_choice(model):
    """Off the GPU the engine defaults to the reference; an explicit choice is kept."""
    assert Engine(model, capacity=16).kernels == ops.Kernels("xla")
    assert Engine(model, capacity=16, kernels="pallas").kernels == ops.Kernels("pallas")
