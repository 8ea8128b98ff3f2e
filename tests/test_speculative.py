"""Speculative decoding with the MTP block: greedy tokens equal decoding without it, rejected drafts rolled back
exactly (caches equal a fresh prefill), the round's metadata built once before any layer, bad settings refused.

Most cases use an oracle drafter: the real MTP block runs (its cache is the real one), but the tokens it proposes
are replaced by the reference greedy continuation, wrong at fixed positions, so that rounds accept every length
0..N, and reject tokens that close compressor windows and that wrap the window ring (asserted, not hoped for).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny
from dsv4_jax.model.cache import init_cache
from dsv4_jax.model.mtp import DeepseekV4WithMTP, mtp_config
from dsv4_jax.model.transformer import DeepseekV4ForCausalLM, InputError
from dsv4_jax.runtime import speculative as spec
from dsv4_jax.runtime.engine import Engine, split_weights
from dsv4_jax.runtime.sampling import SamplingParams, first_token, sampling_args

CFG = tiny()  # window 8, CSA m = 4 (state ring 8), HCA m = 8 (state ring 8): draft_tokens <= 7
N = 3
CAPACITY = 64
NEW = 40
PROMPTS = [list(np.random.RandomState(n).randint(2, CFG.vocab_size, n)) for n in (13, 5, 20)]


def wrong(t):
    """Absolute positions where the oracle's draft is wrong: rounds then accept 0, 1, 2 or all 3 drafts."""
    return (t % 7 == 3) | (t % 11 == 0) | (t % 13 == 5)


@pytest.fixture(scope="module")
def model():
    return DeepseekV4WithMTP(CFG, rngs=nnx.Rngs(7))


@pytest.fixture(scope="module")
def reference(model):
    """(non-speculative engine, its greedy tokens for PROMPTS)."""
    engine = Engine(model, capacity=CAPACITY)
    return engine, [r.tokens for r in engine.generate(PROMPTS, max_new_tokens=NEW, eos_token_ids=[])]


def sequences(reference) -> np.ndarray:
    """[4, T]: each prompt and its greedy tokens (the batch bucket's padding row: zeros)."""
    _, tokens = reference
    table = np.zeros((4, max(len(p) for p in PROMPTS) + NEW), np.int32)
    for b, (p, t) in enumerate(zip(PROMPTS, tokens)):
        table[b, :len(p) + len(t)] = p + t
    return table


@pytest.fixture(scope="module")
def oracle(model, reference):
    """A speculative engine whose drafts are the reference continuation, wrong at ``wrong`` positions."""
    table = jnp.asarray(sequences(reference))

    def oracle_draft(model, mtp_cache, state, meta, key, settings, filters):
        _, logits, mtp_cache = spec.draft(model, mtp_cache, state, meta, key, settings, filters)
        t = state.pos[:, None] + jnp.arange(1, N + 1)  # the drafts' positions
        want = jnp.take_along_axis(table, jnp.minimum(t, table.shape[1] - 1), axis=1)
        return jnp.where(wrong(t), (want + 1) % CFG.vocab_size, want), logits, mtp_cache

    engine = Engine(model, capacity=CAPACITY, speculative="mtp", draft_tokens=N)
    engine.speculative = spec.SpeculativeSteps(*split_weights(model)[:2], CAPACITY, N, propose=oracle_draft)
    return engine


def rounds(prompt_len: int, n_tokens: int):
    """The oracle's rounds for one row: [(position verified first, drafts accepted)] until n_tokens are out."""
    out, pos, emitted = [], prompt_len, 1
    while emitted < n_tokens:
        t = pos + np.arange(1, N + 1)
        accepted = int(np.cumprod(~wrong(t)).sum())
        out.append((pos, accepted))
        pos, emitted = pos + accepted + 1, emitted + accepted + 1
    return out


def test_oracle_rounds_cover_every_accept_length():
    lengths = {a for p in PROMPTS for _, a in rounds(len(p), NEW)}
    assert lengths == set(range(N + 1)), lengths


def test_greedy_equals_non_speculative_ragged(oracle, reference):
    """Ragged prompts (13 / 5 / 20 tokens) in a batch of 3 (run at 4), 40 tokens each: every token equal."""
    got = oracle.generate(PROMPTS, max_new_tokens=NEW, eos_token_ids=[])
    assert [r.tokens for r in got] == reference[1]
    want_rounds = [rounds(len(p), NEW) for p in PROMPTS]
    st = oracle.stats
    assert st.accepted_tokens == sum(a for r in want_rounds for _, a in r)
    assert st.speculative_rounds == sum(len(r) for r in want_rounds) and st.drafted_tokens == N * st.speculative_rounds
    assert st.tokens_per_step == (st.accepted_tokens + st.speculative_rounds) / st.speculative_rounds


def test_eos_inside_a_draft_stops_that_row_only(oracle, reference):
    """EOS is a token the oracle proposes as an accepted draft with more tokens after it in its round: the row
    stops right there (tokens after it in the round are dropped), the others go on as without drafts."""
    tokens = reference[1]
    L = len(PROMPTS[0])
    inside = [pos + i - L for pos, a in rounds(L, NEW) for i in range(1, a)]  # accepted, not its round's last
    k = next(k for k in inside if tokens[0][k] not in tokens[0][:k])
    eos = tokens[0][k]
    got = oracle.generate(PROMPTS, max_new_tokens=NEW, eos_token_ids=[eos])
    for r, want in zip(got, tokens):
        cut = want.index(eos) + 1 if eos in want else len(want)
        assert r.tokens == want[:cut] and r.finish_reason == ("eos" if eos in want else "length")
    assert len(got[0].tokens) == k + 1


def assert_caches_equal(got, want, what: str):
    for layer, (g, w) in enumerate(zip(got, want)):
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(w), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{what}: layer {layer}{jax.tree_util.keystr(path)}")


def test_caches_after_accepts_and_rejects_equal_a_fresh_prefill(oracle, reference):
    """Round after round of the oracle's accepts and rejects: the main model's caches (window rings, entries,
    compressor and indexer states, indexer keys; every row of every array) equal a fresh prefill of the
    committed tokens, and the MTP block's cache that of a fresh prefill up to where it has run. Among the
    rounds, rejected tokens closed CSA and HCA windows and wrapped the window ring."""
    ref_engine, _ = reference
    steps, L = oracle.speculative, CFG.num_hidden_layers
    table = sequences(reference)
    padded = PROMPTS + [PROMPTS[0][:1]]
    greedy = SamplingParams()
    (logits, streams), cache, lens = oracle.prefill(padded, step=spec.prefill_step(oracle, padded))
    first, pos, key = first_token(logits, lens, 0, *sampling_args(greedy), filters=False)
    state = steps.start(streams, first, pos)
    active = jnp.asarray(np.arange(4) < 3)
    rejected = set()  # (what the rejected tokens did): closed an entry of ratio m, wrapped the ring
    for _ in range(8):
        start = np.asarray(state.pos)
        _, counts, state, key, cache = steps.round(oracle.weights, cache, state, active, key, *sampling_args(greedy),
                                                   kernels=oracle.kernels, filters=False)
        pos, count = np.asarray(state.pos), np.asarray(state.count)
        for b in range(3):
            for t in range(pos[b], start[b] + N + 1):  # the rejected positions
                rejected |= {m for m in (4, 8) if (t + 1) % m == 0}
                rejected |= {"wrap"} if t % CFG.sliding_window == 0 else set()
        committed = [list(table[b, :pos[b]]) for b in range(3)] + [padded[3]]
        _, fresh, _ = ref_engine.prefill(committed)
        assert_caches_equal(cache[:L], fresh, f"main, round at {start}")
        upto = [seq[:len(seq) - count[b] + 1] for b, seq in enumerate(committed[:3])] + [padded[3]]
        _, fresh, _ = oracle.prefill(upto, step=spec.prefill_step(oracle, upto))
        assert_caches_equal(cache[L:], fresh[L:], f"MTP block, round at {start}")
    assert rejected == {4, 8, "wrap"}, rejected


def test_greedy_with_the_mtp_drafts_equals_non_speculative(model, reference):
    """The block's own drafts (random weights: mostly rejected) with N = 1 and the batch's three prompts."""
    engine = Engine(model, capacity=CAPACITY, speculative="mtp", draft_tokens=1)
    assert [r.tokens for r in engine.generate(PROMPTS, max_new_tokens=12, eos_token_ids=[])] == \
        [t[:12] for t in reference[1]]


def test_bad_settings_are_one_line_errors(model):
    with pytest.raises(InputError, match=r"^draft_tokens 0 must be a positive integer$"):
        Engine(model, capacity=16, speculative="mtp", draft_tokens=0)
    with pytest.raises(InputError, match=r"^draft_tokens 8 must be at most 7 for this model"):
        Engine(model, capacity=16, speculative="mtp", draft_tokens=8)
    with pytest.raises(InputError, match=r"^speculative 'eagle' is not one of \('mtp',\)$"):
        Engine(model, capacity=16, speculative="eagle")
    plain = DeepseekV4ForCausalLM(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(InputError, match=r"^speculative mtp needs the model's MTP block"):
        Engine(plain, capacity=16, speculative="mtp")
    from dsv4_jax.runtime.mesh import make_mesh
    with pytest.raises(InputError, match=r"^speculative mtp does not run on a device mesh yet"):
        Engine(model, capacity=16, speculative="mtp", mesh=make_mesh())
    with pytest.raises(InputError, match=r"^speculative='mtp' with kv_cache_dtype='fp8' is not supported yet"):
        Engine(model, capacity=16, speculative="mtp", kv_cache_dtype="fp8")


def _scopes(fn, *args):
    """(name stack, eqn) of fn's jaxpr, sub-jaxprs included (not into Pallas kernels), in program order."""
    from test_engine import _metadata_eqns

    return list(_metadata_eqns(jax.make_jaxpr(fn)(*args).jaxpr, into_kernels=False))


@pytest.mark.parametrize("step", ["round", "prefill"])
def test_metadata_is_built_once_before_any_layer(model, step):
    """The round's metadata (the MTP block's chunk, its N - 1 draft steps, the verify chunk) and the prefill's
    (the main model's and the block's) are built in the metadata scope before any layer runs, the main model's or
    the MTP block's; no layer builds an index or mask list (as test_engine checks for the plain steps); the roll
    back runs after the layers."""
    from dsv4_jax.model.transformer import METADATA_SCOPE

    graphdef, state = nnx.split(model)
    B = 2
    cache = init_cache(mtp_config(CFG), B, CAPACITY, jnp.float32)
    settings = sampling_args(SamplingParams(temperature=1.0, top_k=5))
    if step == "round":
        d = CFG.hidden_size
        draft = spec.DraftState(pos=jnp.full(B, 9, jnp.int32), streams=jnp.zeros((B, N + 1, CFG.hc_mult, d)),
                                next_ids=jnp.zeros((B, N + 1), jnp.int32), count=jnp.ones(B, jnp.int32))

        def fn(state, cache, draft):
            return spec.speculative_round(nnx.merge(graphdef, state), cache, draft, jnp.ones(B, bool),
                                          jax.random.PRNGKey(0), *settings, capacity=CAPACITY, filters=True)

        eqns = _scopes(fn, state, cache, draft)
    else:
        def fn(state, cache, ids):
            return spec.prefill_chunk(nnx.merge(graphdef, state), cache, ids, ids, jnp.zeros(B, jnp.int32),
                                      jnp.full(B, 12, jnp.int32), jnp.full(B, 11, jnp.int32), CAPACITY)

        eqns = _scopes(fn, state, cache, jnp.zeros((B, 12), jnp.int32))
    kind = ["meta" if METADATA_SCOPE in s else "layer" if ("layer_" in s or "mtp" in s) else
            "rollback" if "rollback" in s else "other" for s, _ in eqns]
    where = {k: [i for i, x in enumerate(kind) if x == k] for k in ("meta", "layer", "rollback")}
    assert where["meta"] and where["layer"] and max(where["meta"]) < min(where["layer"])
    assert not any(METADATA_SCOPE in s and ("layer_" in s or "mtp" in s) for s, _ in eqns)
    if step == "round":
        assert where["rollback"] and min(where["rollback"]) > max(where["layer"])
    lists = [e for s, e in eqns if ("layer_" in s or "mtp" in s) and e.primitive.name == "concatenate"
             and not jnp.issubdtype(e.outvars[0].aval.dtype, jnp.floating)
             and any(v.aval.shape[e.params["dimension"]] > 1 for v in e.invars)]
    assert not lists, [str(e) for e in lists]
