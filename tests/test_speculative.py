"""Speculative decoding with the MTP block: greedy tokens equal decoding without it, rejected drafts rolled back
exactly (caches equal a fresh prefill), the round's metadata built once before any layer, bad settings refused;
the same with the FP8 cache, and on a device mesh (tp, dp x tp with ep, pp: tokens and caches equal one device's,
the metadata built once outside the shard_map).

Most cases use an oracle drafter: the real MTP block runs (its cache is the real one), but the tokens it proposes
are replaced by the reference greedy continuation, wrong at fixed positions, so that rounds accept every length
0..N, and reject tokens that close compressor windows and that wrap the window ring (asserted, not hoped for).

The mesh runs are one subprocess with 8 fake CPU devices running this file as a script (tests/workers.py), started
before this process computes its one-device references, as tests/test_mesh.py does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from conftest import tiny  # noqa: E402  (sets JAX_PLATFORMS=cpu before jax starts)
from workers import finish, jaxpr_walk, spawn, stop  # noqa: E402
from dsv4_jax.model import kv_rows  # noqa: E402
from dsv4_jax.model.cache import init_cache  # noqa: E402
from dsv4_jax.model.mtp import DeepseekV4WithMTP, mtp_config  # noqa: E402
from dsv4_jax.model.transformer import METADATA_SCOPE, DeepseekV4ForCausalLM, InputError  # noqa: E402
from dsv4_jax.ops.parallel import own_rows  # noqa: E402
from dsv4_jax.runtime import speculative as spec  # noqa: E402
from dsv4_jax.runtime.engine import Engine  # noqa: E402
from dsv4_jax.runtime.sampling import SamplingParams, first_token, sampling_args  # noqa: E402

CFG = tiny()  # window 8, CSA m = 4 (state ring 8), HCA m = 8 (state ring 8): draft_tokens <= 7
N = 3
CAPACITY = 64
NEW = 40
PROMPTS = [list(np.random.RandomState(n).randint(2, CFG.vocab_size, n)) for n in (13, 5, 20)]


def wrong(t):
    """Absolute positions where the oracle's draft is wrong: rounds then accept 0, 1, 2 or all 3 drafts."""
    return (t % 7 == 3) | (t % 11 == 0) | (t % 13 == 5)


# name -> (dp, tp, pp, ep); the batch of 3 prompts runs at 4 rows (dp 2: 2 each; pp 2: 2 microbatches of 2)
MESH_LAYOUTS = {"tp2": (1, 2, 1, False), "dp2_tp2_ep": (2, 2, 1, True), "pp2": (1, 1, 2, False)}
ROUNDS = 8  # the rounds whose caches are compared


def build_model():
    return DeepseekV4WithMTP(CFG, rngs=nnx.Rngs(7))


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.fixture(scope="module")
def mesh_workers(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("speculative_mesh")
    proc = spawn([str(Path(__file__).resolve()), "mesh", str(out_dir), *MESH_LAYOUTS], 8, out_dir / "mesh.log")
    yield out_dir, proc
    stop({"mesh": proc})


def greedy_tokens(engine) -> list[list[int]]:
    return [r.tokens for r in engine.generate(PROMPTS, max_new_tokens=NEW, eos_token_ids=[])]


@pytest.fixture(scope="module")
def reference(model, mesh_workers):
    """(non-speculative engine, its greedy tokens for PROMPTS); the mesh worker starts first, to run beside this
    process's one-device cases."""
    engine = Engine(model, capacity=CAPACITY)
    return engine, greedy_tokens(engine)


@pytest.fixture(scope="module")
def fp8_reference(model):
    """``reference`` with the FP8 cache."""
    engine = Engine(model, capacity=CAPACITY, kv_cache_dtype="fp8")
    return engine, greedy_tokens(engine)


def sequences(tokens) -> np.ndarray:
    """[4, T]: each prompt and its greedy tokens (the batch bucket's padding row: zeros)."""
    table = np.zeros((4, max(len(p) for p in PROMPTS) + NEW), np.int32)
    for b, (p, t) in enumerate(zip(PROMPTS, tokens)):
        table[b, :len(p) + len(t)] = p + t
    return table


def oracle_engine(model, tokens, **engine_args) -> Engine:
    """A speculative engine whose drafts are the continuation ``tokens``, wrong at ``wrong`` positions (on a mesh,
    each data-parallel shard reads its rows of the table)."""
    table = jnp.asarray(sequences(tokens))

    def oracle_draft(model, mtp_cache, state, meta, key, settings, filters):
        _, logits, mtp_cache = spec.draft(model, mtp_cache, state, meta, key, settings, filters)
        t = state.pos[:, None] + jnp.arange(1, N + 1)  # the drafts' positions
        rows = own_rows(table, t.shape[0])
        want = jnp.take_along_axis(rows, jnp.minimum(t, table.shape[1] - 1), axis=1)
        return jnp.where(wrong(t), (want + 1) % CFG.vocab_size, want), logits, mtp_cache

    engine = Engine(model, capacity=CAPACITY, speculative="mtp", draft_tokens=N, **engine_args)
    engine.speculative = engine.speculative_steps(N, propose=oracle_draft)
    return engine


@pytest.fixture(scope="module")
def oracle(model, reference):
    return oracle_engine(model, reference[1])


@pytest.fixture(scope="module")
def fp8_oracle(model, fp8_reference):
    return oracle_engine(model, fp8_reference[1], kv_cache_dtype="fp8")


ENGINES = {"auto": ("oracle", "reference"), "fp8": ("fp8_oracle", "fp8_reference")}  # kv_cache_dtype -> fixtures


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


def stats_of(engine) -> list[int]:
    st = engine.stats
    return [st.accepted_tokens, st.speculative_rounds, st.drafted_tokens]


@pytest.mark.parametrize("kv_cache_dtype", list(ENGINES))
def test_greedy_equals_non_speculative_ragged(request, kv_cache_dtype):
    """Ragged prompts (13 / 5 / 20 tokens) in a batch of 3 (run at 4), 40 tokens each: every token equal. With the
    FP8 cache too, against decoding with it: the verify chunk reads its own tokens' K=V rows as decoding reads them,
    encoded as the cache stores them (sliding_window.window_keys; entries are read back after their write)."""
    oracle, (_, tokens) = (request.getfixturevalue(name) for name in ENGINES[kv_cache_dtype])
    assert greedy_tokens(oracle) == tokens
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


def play_rounds(engine, n: int):
    """The oracle's first ``n`` greedy rounds after a prefill of PROMPTS (4 rows, the last empty): yields (positions
    before the round [B], DraftState after it, caches after it; donated by the next round: read them first)."""
    steps = engine.speculative
    padded = PROMPTS + [PROMPTS[0][:1]]
    greedy = engine._inputs(*sampling_args(SamplingParams()))
    (logits, streams), cache, lens = engine.prefill(padded, step=spec.prefill_step(engine, padded))
    first, pos, key = first_token(logits, lens, 0, *greedy, filters=False)
    state = steps.start(*engine._inputs(streams, first, pos))
    active, = engine._inputs(np.arange(4) < 3)
    for _ in range(n):
        start = np.asarray(state.pos)
        _, _, state, key, cache = steps.round(engine.weights, cache, state, active, key, *greedy,
                                              kernels=engine.kernels, filters=False)
        yield start, state, cache


def layer_caches(engine, cache) -> tuple:
    """A speculative engine's caches as one device keeps them: each layer's, then the MTP block's (a mesh keeps the
    pair (the layers' as its step does, the block's))."""
    if engine.sharded is None:
        return cache
    layers, block = cache
    return tuple(layers if engine.plan is None else engine.plan.unstack_cache(layers)) + (block,)


def kv_rows_of(caches):
    """Every K=V row of per-layer caches (window rings, compressed entries) as one store [rows, D]: an array, or
    one FP8 record."""
    stores = [getattr(c, f) for c in caches for f in ("window_kv", "compressed_kv") if getattr(c, f) is not None]
    leaves = [jax.tree.leaves(store) for store in stores]
    joined = [np.concatenate([np.asarray(x[i]).reshape(-1, x[i].shape[-1]) for x in leaves])
              for i in range(len(leaves[0]))]
    return kv_rows.Fp8Entries(*joined) if isinstance(stores[0], kv_rows.Fp8Rows) else joined[0]


def assert_caches_equal(got, want, what: str):
    """Per-layer caches hold the same rows: all K=V rows together as ``assert_rows_match`` says (FP8 records: values
    on a rounding boundary may take the neighbouring code, at most 1 byte in 1,000), every other array within 1e-5
    relative, 1e-6 absolute."""
    from test_kv_cache_fp8 import assert_rows_match

    try:
        assert_rows_match(kv_rows_of(want), kv_rows_of(got))
    except AssertionError as e:
        raise AssertionError(f"{what}: K=V rows: {e}") from None
    for layer, (g, w) in enumerate(zip(got, want, strict=True)):
        for name in ("compressor", "index_keys", "indexer"):
            for x, y in zip(jax.tree.leaves(getattr(g, name)), jax.tree.leaves(getattr(w, name)), strict=True):
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6,
                                           err_msg=f"{what}: layer {layer} {name}")


@pytest.mark.parametrize("kv_cache_dtype", list(ENGINES))
def test_caches_after_accepts_and_rejects_equal_a_fresh_prefill(request, kv_cache_dtype):
    """Round after round of the oracle's accepts and rejects: the main model's caches (window rings, entries,
    compressor and indexer states, indexer keys; every row of every array) equal a fresh prefill of the
    committed tokens, and the MTP block's cache that of a fresh prefill up to where it has run; with the FP8 cache
    too. Among the rounds, rejected tokens closed CSA and HCA windows and wrapped the window ring."""
    oracle, (ref_engine, tokens) = (request.getfixturevalue(name) for name in ENGINES[kv_cache_dtype])
    L = CFG.num_hidden_layers
    table = sequences(tokens)
    padded = PROMPTS + [PROMPTS[0][:1]]
    rejected = set()  # (what the rejected tokens did): closed an entry of ratio m, wrapped the ring
    for start, state, cache in play_rounds(oracle, ROUNDS):
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


# ----- on a device mesh: the pytest side --------------------------------------------------------------------
@pytest.fixture(scope="module")
def mesh_runs(mesh_workers):
    out_dir, proc = mesh_workers
    finish(proc, timeout=1800)
    return json.loads((out_dir / "summary.json").read_text()), dict(np.load(out_dir / "arrays.npz"))


@pytest.fixture(scope="module")
def one_device_rounds(oracle) -> list[dict]:
    """``play_rounds`` on one device: each round's positions, counts, streams, next tokens and caches (host)."""
    from test_pipeline import flat_caches

    return [dict(flat_caches(cache), pos=np.asarray(state.pos), count=np.asarray(state.count),
                 streams=np.asarray(state.streams), next_ids=np.asarray(state.next_ids))
            for _, state, cache in play_rounds(oracle, ROUNDS)]


@pytest.mark.parametrize("layout", list(MESH_LAYOUTS))
def test_mesh_greedy_equals_one_device(mesh_runs, oracle, reference, layout):
    """The oracle's ragged batch (3 prompts at 4 rows; with dp 2 two rows a shard, with pp 2 two microbatches) on the
    mesh: the greedy tokens of decoding without drafts on one device, and one device's speculative tokens and
    accept counts (the same rounds)."""
    got = mesh_runs[0][layout]
    assert got["tokens"] == reference[1]
    assert got["tokens"] == greedy_tokens(oracle) and got["stats"] == stats_of(oracle)


@pytest.mark.parametrize("layout", list(MESH_LAYOUTS))
def test_mesh_rollback_leaves_caches_equal_one_device(mesh_runs, one_device_rounds, layout):
    """After each of the rounds (every accept length; rejected tokens that closed CSA and HCA windows and wrapped the
    ring: ``test_caches_after_accepts_and_rejects_equal_a_fresh_prefill``), the mesh's caches (gathered from their
    shards; a pipeline's unstacked), the MTP block's included, and its draft state equal one device's (fp32)."""
    from test_pipeline import rel_err

    arrays = mesh_runs[1]
    for k, want in enumerate(one_device_rounds):
        for key, value in want.items():
            have = arrays[f"{layout}/{k}/{key}"]
            assert have.shape == value.shape, (k, key)
            if key in ("pos", "count", "next_ids"):
                np.testing.assert_array_equal(have, value, err_msg=f"round {k} {key}")
            else:
                assert rel_err(have, value) < 1e-5, (k, key, rel_err(have, value))


@pytest.mark.parametrize("layout", list(MESH_LAYOUTS))
def test_mesh_metadata_is_built_once_outside_the_shard_map(mesh_runs, layout):
    """The sharded round and prefill step: one shard_map; the metadata (the round's: the MTP block's chunk, its draft
    steps, the verify chunk; the prefill's: the main model's and the block's) built before it, on the whole batch,
    with as many equations as one build of it has, none inside; no layer (the main model's or the MTP block's)
    outside it; the roll back inside it, after every layer."""
    for step, report in mesh_runs[0][layout]["jaxpr"].items():
        assert report["shard_maps"] == 1, (step, report)
        assert report["meta_eqns"] == report["one_build_eqns"] > 0, (step, report)
        assert report["meta_inside"] == 0 and report["last_meta"] < report["shard_map_at"], (step, report)
        assert report["layer_eqns"] > 0 and report["layers_outside"] == 0, (step, report)
        if step == "round":
            assert report["rollback_eqns"] > 0 and report["rollback_outside"] == 0, report
            assert report["first_rollback"] > report["last_layer"], report


# ----- on a device mesh: the subprocess side ----------------------------------------------------------------
def jaxpr_report(jaxpr, one_build) -> dict:
    """Where a sharded step's metadata, layers and roll back are (name scopes), against its shard_map, in the
    order of ``jaxpr``; ``one_build``: the jaxpr of building its metadata alone."""
    walk = list(jaxpr_walk(jaxpr))
    maps = [i for i, (_, e) in enumerate(walk) if e.primitive.name == "shard_map"]
    inside = {id(e) for i in maps for _, e in jaxpr_walk(walk[i][1].params["jaxpr"])}
    where = {kind: [i for i, (s, _) in enumerate(walk) if test(s)] for kind, test in (
        ("meta", lambda s: METADATA_SCOPE in s), ("layer", lambda s: "layer_" in s or "mtp" in s),
        ("rollback", lambda s: "rollback" in s))}

    def outside(kind):
        return sum(id(walk[i][1]) not in inside for i in where[kind])
    return dict(shard_maps=len(maps), shard_map_at=maps[0], meta_eqns=len(where["meta"]),
                one_build_eqns=sum(METADATA_SCOPE in s for s, _ in jaxpr_walk(one_build)),
                meta_inside=len(where["meta"]) - outside("meta"), last_meta=max(where["meta"]),
                layer_eqns=len(where["layer"]), layers_outside=outside("layer"), last_layer=max(where["layer"]),
                rollback_eqns=len(where["rollback"]), rollback_outside=outside("rollback"),
                first_rollback=min(where["rollback"], default=-1))


def mesh_jaxpr_reports(engine) -> dict:
    """``jaxpr_report`` of the engine's sharded round (sampling, with top-k) and prefill chunk (12 tokens)."""
    steps, B = engine.speculative, engine.layout(4)[1]
    rows = jnp.zeros(B, jnp.int32)
    state = spec.DraftState(pos=rows + 9, streams=jnp.zeros((B, N + 1, CFG.hc_mult, CFG.hidden_size)),
                            next_ids=jnp.zeros((B, N + 1), jnp.int32), count=rows + 1)
    active, ids = jnp.ones(B, bool), jnp.zeros((B, 12), jnp.int32)
    settings = sampling_args(SamplingParams(temperature=1.0, top_k=5))
    prefill_args = (ids, ids, rows, rows + 12, rows + 11)
    round_jaxpr = jax.make_jaxpr(lambda *a: steps.round(*a, kernels=engine.kernels, filters=True))(
        engine.weights, engine._new_cache(4), state, active, jax.random.PRNGKey(0), *settings).jaxpr
    prefill_jaxpr = jax.make_jaxpr(lambda *a: steps.prefill(*a, kernels=engine.kernels))(
        engine.weights, engine._new_cache(4), *prefill_args).jaxpr
    return {"round": jaxpr_report(round_jaxpr, jax.make_jaxpr(
                lambda s, a: spec.round_metadata(CFG, s, a, CAPACITY))(state, active).jaxpr),
            "prefill": jaxpr_report(prefill_jaxpr, jax.make_jaxpr(
                lambda *a: spec.prefill_inputs(CFG, *a, CAPACITY))(*prefill_args).jaxpr)}


def _worker_mesh(out_dir: Path, names: list[str]):
    """Each layout's oracle engine: greedy tokens and stats, ``play_rounds``' states and caches, the jaxpr reports."""
    from test_pipeline import flat_caches
    from dsv4_jax.runtime.mesh import make_mesh

    assert len(jax.devices()) == 8, jax.devices()
    model = build_model()
    tokens = greedy_tokens(Engine(model, capacity=CAPACITY))  # the oracle's continuation
    summary, arrays = {}, {}
    for name in names:
        dp, tp, pp, ep = MESH_LAYOUTS[name]
        engine = oracle_engine(model, tokens, mesh=make_mesh(tp=tp, dp=dp, pp=pp, ep=ep, cfg=CFG))
        summary[name] = dict(tokens=greedy_tokens(engine), stats=stats_of(engine), jaxpr=mesh_jaxpr_reports(engine))
        for k, (_, state, cache) in enumerate(play_rounds(engine, ROUNDS)):
            got = dict(flat_caches(layer_caches(engine, cache)), pos=state.pos, count=state.count,
                       streams=state.streams, next_ids=state.next_ids)
            arrays.update({f"{name}/{k}/{key}": np.asarray(v) for key, v in got.items()})
    np.savez(out_dir / "arrays.npz", **arrays)
    (out_dir / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    if sys.argv[1] != "mesh":
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
    _worker_mesh(Path(sys.argv[2]), sys.argv[3:])
