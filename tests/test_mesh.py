"""The sharded engine (dsv4_jax.runtime.mesh): tensor, data and expert parallel layouts on 8 fake CPU devices
against the one-device engine (fp32 logits, greedy tokens of a ragged batch, sampled tokens, caches), 20
repeated runs bitwise identical, each device holding exactly its share of the weights, the metadata built
once outside the shard_map, one-line errors for meshes that do not fit, and a 2-process x 4-device run.

As in test_pipeline.py, every multi-device run is a subprocess running this file as a script; the pytest
process (one device) computes the reference.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from conftest import tiny  # noqa: E402  (sets JAX_PLATFORMS=cpu before jax is imported)
from test_pipeline import chunked_logits, flat_caches, rel_err  # noqa: E402
from workers import finish, free_port, jaxpr_walk, spawn, stop  # noqa: E402
from dsv4_jax.model.config import CSA, HASH_MOE, HCA, MOE, SLIDING  # noqa: E402

# Every layer type, 8 layers (one a stage at pp = 8); a vocabulary tp = 2 does not divide (padded to 252);
# 8 experts for ep sizes 2, 4, 8.
CFG = tiny(vocab_size=251, num_hidden_layers=8, layer_types=(SLIDING, CSA, HCA, CSA, SLIDING, HCA, CSA, HCA),
           mlp_layer_types=(HASH_MOE, HASH_MOE) + (MOE,) * 6, hc_sinkhorn_iters=3)
SEED = 11
PROMPT_LENS = (23, 5, 14)  # ragged; batch 3 padded to a multiple of dp
CAPACITY, CHUNK, NEW_TOKENS = 48, 8, 8
REPEATS = 20
# name -> (dp, tp, pp, ep): the layouts
LAYOUTS = {"tp2": (1, 2, 1, False), "tp2_ep": (1, 2, 1, True), "dp2_tp2_ep": (2, 2, 1, True),
           "dp4_tp2_ep": (4, 2, 1, True), "pp2_tp2_ep": (1, 2, 2, True), "dp8_ep": (8, 1, 1, True),
           "pp8": (1, 1, 8, False)}
# two subprocesses, two CPU cores
LAYOUT_GROUPS = (("tp2", "dp2_tp2_ep", "dp8_ep", "pp8"), ("tp2_ep", "dp4_tp2_ep", "pp2_tp2_ep"))
SAMPLED_LAYOUT = "dp2_tp2_ep"  # also generates with temperature and top-p
MULTIHOST = (8, 1, 1, True)  # 2 processes x 4 devices: --dp 8 --ep
# The CLI on the demo model: one device, and --tp 2 --dp 2 --ep on 4 (its vocabulary of 259 padded to 260).
CLI_ARGS = ["-m", "dsv4_jax.generate", "--prompt-ids", "5,17,42,9,3,77,120,8,1,2,3", "--max-new-tokens", "6",
            "--greedy", "--json"]
CLI_RUNS = (("cli_plain", 1, []), ("cli_sharded", 4, ["--tp", "2", "--dp", "2", "--ep"]))


def prompts() -> list[list[int]]:
    rng = np.random.RandomState(1)
    return [[int(t) for t in rng.randint(2, CFG.vocab_size, n)] for n in PROMPT_LENS]


def build_model():
    from flax import nnx

    from dsv4_jax.model.transformer import DeepseekV4ForCausalLM
    return DeepseekV4ForCausalLM(CFG, rngs=nnx.Rngs(SEED))


def sampled(engine) -> list[list[int]]:
    from dsv4_jax.runtime.sampling import SamplingParams
    return [r.tokens for r in engine.generate(prompts(), max_new_tokens=NEW_TOKENS, seed=5,
                                              sampling=SamplingParams(temperature=0.8, top_p=0.9))]


def engine_logits(engine) -> np.ndarray:
    """Logits at every prompt position [B, S_max, V] of the engine's chunk step over ragged chunks."""
    def run_chunk(cache, ids, start, n_new, last_only):
        return engine.steps.chunk(engine.weights, cache, *engine._inputs(ids, start, n_new), last_only=last_only,
                                  kernels=engine.kernels)
    return chunked_logits(run_chunk, engine._new_cache, prompts(), CHUNK)


def run_engine(engine, with_sampling: bool = True) -> dict:
    """Full chunked-prefill logits, greedy (and sampled) tokens, last logits and caches after prefill."""
    logits = engine_logits(engine)
    tokens = [r.tokens for r in engine.generate(prompts(), max_new_tokens=NEW_TOKENS)]
    last, cache, _ = engine.prefill(prompts())
    if engine.plan is not None:
        cache = engine.plan.unstack_cache(cache)
    return dict(logits=logits, tokens=tokens, sampled=sampled(engine) if with_sampling else None,
                last_logits=np.asarray(last), cache=flat_caches(cache))


# ----- the pytest side -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("mesh")
    port = free_port()
    script = str(Path(__file__).resolve())
    procs = {f"layouts{i}": spawn([script, "layouts", str(out_dir / f"layouts{i}"), *group], 8,
                                  out_dir / f"layouts{i}.log")
             for i, group in enumerate(LAYOUT_GROUPS)}
    for i in range(2):
        procs[f"multihost{i}"] = spawn([script, "multihost", str(out_dir), str(port), str(i)], 4,
                                       out_dir / f"multihost{i}.log")
    for name, devices, extra in CLI_RUNS:
        procs[name] = spawn([*CLI_ARGS, *extra], devices, out_dir / f"{name}.log", stdout=out_dir / f"{name}.out")
    procs["experts"] = spawn([script, "experts", str(out_dir)], 4, out_dir / "experts.log")
    yield out_dir, procs
    stop(procs)


@pytest.fixture(scope="module")
def reference(workers):
    from dsv4_jax.runtime.engine import Engine
    return run_engine(Engine(build_model(), capacity=CAPACITY, prefill_chunk=CHUNK))


@pytest.fixture(scope="module")
def sharded(workers):
    out_dir, procs = workers
    summary, arrays = {}, {}
    for i in range(len(LAYOUT_GROUPS)):
        finish(procs[f"layouts{i}"], timeout=1800)
        summary.update(json.loads((out_dir / f"layouts{i}" / "summary.json").read_text()))
        arrays.update(np.load(out_dir / f"layouts{i}" / "arrays.npz"))
    return summary, arrays


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_device(sharded, reference, layout):
    summary, arrays = sharded
    got = summary[layout]
    assert rel_err(arrays[f"{layout}/logits"], reference["logits"]) < 1e-5
    assert rel_err(arrays[f"{layout}/last_logits"], reference["last_logits"]) < 1e-5
    assert got["tokens"] == reference["tokens"]
    if layout == SAMPLED_LAYOUT:
        assert got["sampled"] == reference["sampled"]
    for key, want in reference["cache"].items():  # the caches, gathered from their shards
        have = arrays[f"{layout}/cache/{key}"]
        assert have.shape == want.shape, key
        assert rel_err(have, want) < 1e-5, (key, rel_err(have, want))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_repeated_runs_are_bitwise_identical(sharded, layout):
    assert sharded[0][layout]["repeats_identical"] == REPEATS


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_device_holds_exactly_its_share(sharded, layout):
    """Every device of the mesh holds one shard of every weight, of the shape the layout gives it (worked out
    here from the parameter's name, independently of the sharding rules), and with ep the experts' shards
    partition the experts."""
    got = sharded[0][layout]["shards"]
    dp, tp, pp, ep = LAYOUTS[layout]
    E, F, V = CFG.n_routed_experts, CFG.moe_intermediate_size, CFG.vocab_size
    assert any(name.startswith("stack:") for name in got) == (pp > 1)
    for name, (shape, shard_shapes, expert_starts) in got.items():
        stacked = name.startswith("stack:")  # [pp, layers, ...]: each device holds its stage's
        if stacked:
            shard_shapes = [s[2:] for s in shard_shapes]
        want = list(shape)
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            want[0] = -(-V // tp)
        elif name.endswith(("q_b_proj.weight", "o_a_proj.weight", "weights_proj.weight")) or name.endswith("sinks"):
            want[0] //= tp
        elif name.endswith("o_b_proj.weight") or name.endswith("shared_experts.down_proj.weight"):
            want[1] //= tp
        elif "shared_experts" in name:
            want[0] //= tp
        elif name.endswith("experts.gate_up_proj"):
            # split along F (tp without ep) it is held as [E, 2, F, d]: each device's gate and up rows
            want = ([E // (dp * tp), 2 * F, CFG.hidden_size] if ep else
                    [E, 2, F // tp, CFG.hidden_size] if tp > 1 else [E, 2 * F, CFG.hidden_size])
        elif name.endswith("experts.down_proj"):
            want = [E // (dp * tp), CFG.hidden_size, F] if ep else [E, CFG.hidden_size, F // tp]
        assert shard_shapes == [want] * (pp * dp * tp), name  # the mesh is the first pp x dp x tp devices
        if ep and "experts." in name and "shared" not in name:
            assert sorted(expert_starts) == [i * E // (dp * tp) for i in range(dp * tp) for _ in range(pp)], name


def test_metadata_is_built_once_outside_the_shards(sharded):
    """The sharded step's metadata is built once, before the shard_map, on the whole batch; inside it (where
    every layer runs) no equation belongs to the metadata scope, and as many metadata equations exist as one
    build of it has."""
    for layout, report in sharded[0]["jaxpr"].items():
        assert report["meta_eqns"] == report["one_build_metadata_eqns"], layout
        assert report["meta_inside_shard_map"] == 0, layout
        assert report["last_meta"] < report["shard_map_at"], layout
        assert report["layer_eqns_outside_shard_map"] == 0, layout


# (dp, tp, ep) x token counts: every routed-expert path (Pallas one-token, few-rows and grouped kernels; XLA
# gathered and ragged) with the experts spread over 4 devices, and with their width split.
EXPERT_LAYOUTS = {(1, 4, True): (1, 3, 40), (2, 2, True): (2, 6, 40), (1, 2, False): (1, 6, 40)}


def test_routed_experts_sharded_equal_one_device(workers):
    """ops.routed_experts inside a shard_map (bf16 weights, 4 fake devices), on both implementations, against
    the same op on one device (relative to the largest output). Spread experts: the dispatch and combine add
    nothing but fp32 reordering (measured <= 8.9e-8; bound 1e-6). A split width with the XLA path likewise
    (<= 2.0e-7). The Pallas expert kernels return bf16 (fp32 accumulation), so a split width rounds each
    device's partial sum before the sum over devices: there the bound is the one-device kernels' own error
    against the fp32 XLA result, doubled (measured: sharded 4.3e-3-4.9e-3 against one device's 5.6e-3-6.3e-3)."""
    out_dir, procs = workers
    finish(procs["experts"])
    errors = json.loads((out_dir / "experts.json").read_text())
    assert len(errors) == 2 * sum(len(ts) for ts in EXPERT_LAYOUTS.values())
    for case, err in errors.items():
        if case.endswith("pallas") and "_ep0_" in case:
            assert err["sharded_vs_xla"] <= 2 * err["one_device_vs_xla"], (case, err)
        else:
            assert err["vs_one_device"] < 1e-6, (case, err)


def test_multihost_two_processes(workers, reference):
    """2 processes x 4 fake devices as one dp = 8 expert-parallel mesh: both processes generate the one-device
    tokens and read the same logits."""
    out_dir, procs = workers
    results = []
    for i in range(2):
        finish(procs[f"multihost{i}"])
        results.append(json.loads((out_dir / f"process{i}.json").read_text()))
    for res in results:
        assert (res["process_count"], res["device_count"], res["local_devices"]) == (2, 8, 4)
        assert res["tokens"] == reference["tokens"]
        assert rel_err(res["last_logits"], reference["last_logits"]) < 1e-5


@pytest.mark.parametrize("layout, message", [
    (dict(tp=3), "tp 3 does not divide the model's 4 query heads"),
    (dict(tp=4), "tp 4 does not divide the model's 2 output groups"),
    (dict(tp=2, dp=3, ep=True), r"the expert-parallel size dp x tp = 6 does not divide the model's 8 routed experts"),
    (dict(dp=16), r"dp 16 needs 16 devices but 1 is available \(on CPU: "
                  r"XLA_FLAGS=--xla_force_host_platform_device_count=16\)"),
    (dict(tp=0), "tp 0 must be a positive integer"),
    (dict(pp=9), r"pp 9 is larger than the number of layers \(8\); every stage needs a layer"),
])
def test_meshes_that_do_not_fit_are_one_line_errors(layout, message):
    from dsv4_jax.model.transformer import InputError
    from dsv4_jax.runtime.mesh import check_layout
    with pytest.raises(InputError, match=f"^{message}$"):
        check_layout(CFG, **layout, devices=1)


def test_indexer_heads_must_split_too():
    from dsv4_jax.model.transformer import InputError
    from dsv4_jax.runtime.mesh import check_layout
    cfg = tiny(index_n_heads=6, num_attention_heads=4, o_groups=4)
    with pytest.raises(InputError, match="^tp 4 does not divide the model's 6 indexer heads$"):
        check_layout(cfg, tp=4, devices=8)


def test_one_device_mesh_shares_the_weights_buffers():
    """Placing a one-device model on a 1-device mesh keeps every weight's buffer, in bf16 and in released FP8 /
    FP4 (codes and scales), as ``Engine(model, mesh=)`` does: no second copy, so a model that fits the card
    fits placed (issue 25's check on one H200). A copy would be a transfer, which the guard forbids (on CPU a
    host round trip can land on the same address, so equal pointers alone would not tell)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from dsv4_jax.runtime.engine import Engine, split_weights
    from dsv4_jax.runtime.mesh import make_mesh, place_weights
    from dsv4_jax.weights.random_init import released_model

    def pointers(weights):
        return [w.addressable_shards[0].data.unsafe_buffer_pointer() for w in weights]

    for model in (build_model(), released_model(CFG, jnp.bfloat16)):
        plain = split_weights(model)[2]
        with jax.transfer_guard("disallow_explicit"):
            placed = place_weights(model, make_mesh())[2]
            engine = Engine(model, capacity=CAPACITY, mesh=make_mesh(), compile_cache=False)
        assert all(isinstance(w.sharding, NamedSharding) for w in placed)
        assert pointers(placed) == pointers(engine.weights) == pointers(plain)


def test_generate_cli_sharded(workers):
    """``--tp 2 --dp 2 --ep`` on the CLI (4 fake CPU devices): the same greedy tokens as on one device."""
    out_dir, procs = workers
    tokens = {}
    for name, _, _ in CLI_RUNS:
        finish(procs[name], timeout=600)
        tokens[name] = json.loads((out_dir / f"{name}.out").read_text().strip().splitlines()[-1])["tokens"]
    assert len(tokens["cli_sharded"]) == 6 and tokens["cli_sharded"] == tokens["cli_plain"]


@pytest.mark.parametrize("args, message", [
    (["--tp", "3"], "--tp 3 does not divide the model's 4 query heads"),
    (["--tp", "2", "--dp", "3", "--ep"], "the expert-parallel size --dp x --tp = 6 does not divide the model's 8 "
                                         "routed experts"),
    (["--tp", "2"], "--tp 2 needs 2 devices but 1 is available (on CPU: "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=2)"),
    (["--dp", "0"], "--dp 0 must be a positive integer"),
    (["--pp", "2", "--tp", "2", "--ep"], "--pp 2 x --tp 2 needs 4 devices but 1 is available (on CPU: "
                                         "XLA_FLAGS=--xla_force_host_platform_device_count=4)"),
])
def test_generate_cli_mesh_errors(capsys, args, message):
    """A mesh that does not fit is one line on stderr and exit code 2, before any weights are built."""
    from dsv4_jax.runtime.cli import main
    capsys.readouterr()
    assert main(["--prompt-ids", "1,2", "--max-new-tokens", "2", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}", err


# ----- the subprocess side -----------------------------------------------------------------------
def _jaxpr_report(engine) -> dict:
    import jax
    import jax.numpy as jnp

    from dsv4_jax.model.metadata import build_metadata
    from dsv4_jax.model.transformer import METADATA_SCOPE
    B = engine.sharded.rows(len(PROMPT_LENS))
    ids, rows = jnp.zeros((B, CHUNK), jnp.int32), jnp.zeros((B,), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda *a: engine.steps.chunk(*a, last_only=True, kernels=engine.kernels))(
        engine.weights, engine._new_cache(B), ids, rows, rows + CHUNK).jaxpr
    walk = list(jaxpr_walk(jaxpr))
    top = [e.primitive.name for e in jaxpr.eqns]
    shard_map_at = next(i for i, (_, e) in enumerate(walk) if e.primitive.name == "shard_map")
    inside = {id(e) for _, sm in walk if sm.primitive.name == "shard_map" for _, e in jaxpr_walk(sm.params["jaxpr"])}
    meta = [i for i, (s, _) in enumerate(walk) if METADATA_SCOPE in s]

    def one_build(start, n_new):
        with jax.named_scope(METADATA_SCOPE):
            return build_metadata(CFG, start, n_new, CHUNK, CAPACITY)
    alone = list(jaxpr_walk(jax.make_jaxpr(one_build)(rows, rows + CHUNK).jaxpr))
    return dict(meta_eqns=len(meta), one_build_metadata_eqns=len(alone), last_meta=max(meta), shard_map_at=shard_map_at,
                meta_inside_shard_map=sum(1 for i in meta if id(walk[i][1]) in inside),
                layer_eqns_outside_shard_map=sum(1 for s, e in walk if "layer_" in s and id(e) not in inside),
                top_level=len(top))


def dotted(key: str) -> str:
    """A pytree key string (``['model']['layers'][0]['mlp']...``) as a parameter name (``model.layers.0.mlp...``)."""
    return re.sub(r"\['?([^\]']+)'?\]", r".\1", key).removesuffix(".value").strip(".")


def _shards(engine) -> dict:
    """Parameter name -> (its shape in the model, each device's shard shape, each shard's first index on the
    experts' axis); a pipeline's layer stacks as "stack:<name in the layer>" (shapes [pp, layers, ...])."""
    import jax
    from flax import nnx

    def entry(shape, w, lead):
        shards = sorted(w.addressable_shards, key=lambda s: s.device.id)
        return list(shape), [list(s.data.shape) for s in shards], [s.index[lead].start or 0 for s in shards]

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    if engine.plan is None:
        variables = jax.tree_util.tree_flatten_with_path(nnx.state(engine.model), is_leaf=is_var)[0]
        return {dotted(jax.tree_util.keystr(p)): entry(v.get_value().shape, w, 0)
                for (p, v), w in zip(variables, engine.weights)}
    plan = engine.plan
    rest = jax.tree_util.tree_flatten_with_path(plan._rest, is_leaf=is_var)[0]
    out = {dotted(jax.tree_util.keystr(p)): entry(v.get_value().shape, w, 0) for (p, v), w in zip(rest, engine.weights)}
    stacks = jax.tree.unflatten(plan._stacks_def, engine.weights[len(rest):])
    shapes = {**{k: s for k, (s, _) in plan._trunk_spec.items()},
              **{k: s for spec in plan.param_groups.values() for k, (s, _) in spec.items()}}
    for key, w in [*stacks["trunk"].items(), *[kw for g in stacks["groups"].values() for kw in g.items()]]:
        out["stack:" + dotted(key)] = entry(shapes[key], w, 2)
    return out


def _worker_layouts(out_dir: Path, names: list[str]):
    import jax

    from dsv4_jax.runtime.engine import Engine
    from dsv4_jax.runtime.mesh import make_mesh
    assert len(jax.devices()) == 8, jax.devices()
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model()
    summary, arrays = {"jaxpr": {}}, {}
    for name in names:
        dp, tp, pp, ep = LAYOUTS[name]
        engine = Engine(model, capacity=CAPACITY, prefill_chunk=CHUNK,
                        mesh=make_mesh(tp=tp, dp=dp, pp=pp, ep=ep, cfg=CFG))
        res = run_engine(engine, with_sampling=name == SAMPLED_LAYOUT)
        first = res["logits"]
        # the compiled chunk steps again, from fresh caches
        same = sum(bool(np.array_equal(engine_logits(engine), first)) for _ in range(REPEATS))
        summary[name] = dict(tokens=res["tokens"], sampled=res["sampled"], repeats_identical=same,
                             shards=_shards(engine))
        summary["jaxpr"][name] = _jaxpr_report(engine)
        arrays[f"{name}/logits"] = first
        arrays[f"{name}/last_logits"] = res["last_logits"]
        for key, value in res["cache"].items():
            arrays[f"{name}/cache/{key}"] = value[:len(PROMPT_LENS)]
    np.savez(out_dir / "arrays.npz", **arrays)
    (out_dir / "summary.json").write_text(json.dumps(summary))


def _worker_experts(out_dir: Path):
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from dsv4_jax import ops
    from dsv4_jax.ops.parallel import use_axes
    from dsv4_jax.runtime.mesh import make_mesh
    E, F, d, k = 8, 128, 128, 2  # the grouped matmul tiles need K, N multiples of 64 and 128
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    gate_up = (0.1 * jax.random.normal(keys[0], (E, 2 * F, d))).astype(jnp.bfloat16)
    down = (0.1 * jax.random.normal(keys[1], (E, d, F))).astype(jnp.bfloat16)
    errors = {}
    for (dp, tp, ep), token_counts in EXPERT_LAYOUTS.items():
        mesh = make_mesh(tp=tp, dp=dp, ep=ep)
        # the engine's placement: experts over (dp, tp) with ep, else F over tp (gate | up held [E, 2, F, d])
        gu = gate_up if ep else gate_up.reshape(E, 2, F, d)
        gu_spec, down_spec = (P(("dp", "tp")), P(("dp", "tp"))) if ep else (P(None, None, "tp"), P(None, None, "tp"))
        for T in token_counts:
            x = jax.random.normal(keys[2], (T, d)).astype(jnp.bfloat16)
            scores = jax.random.normal(keys[3], (T, E))
            idx = jax.lax.top_k(scores, k)[1]
            w = jax.nn.softmax(jax.lax.top_k(scores, k)[0], axis=-1)
            def one_device(x, idx, w, kernels):
                with ops.use(kernels):
                    return ops.routed_experts(x, idx, w, gate_up, down, 10.0)
            single = jax.jit(one_device, static_argnums=3)  # each choice its own trace
            fp32 = single(x, idx, w, "xla")  # the XLA path's products are fp32
            for kernels in ("xla", "pallas"):
                def body(x, idx, w, gu, dn):
                    with ops.use(kernels), use_axes(mesh.axes):
                        return ops.routed_experts(x, idx, w, gu.reshape(gu.shape[0], -1, d), dn, 10.0)
                rows = P("dp")
                got = jax.jit(jax.shard_map(body, mesh=mesh.mesh, in_specs=(rows, rows, rows, gu_spec, down_spec),
                                            out_specs=rows, check_vma=False))(x, idx, w, gu, down)
                want = single(x, idx, w, kernels)
                errors[f"dp{dp}_tp{tp}_ep{int(ep)}_T{T}_{kernels}"] = dict(
                    vs_one_device=rel_err(got, want), sharded_vs_xla=rel_err(got, fp32),
                    one_device_vs_xla=rel_err(want, fp32))
    (out_dir / "experts.json").write_text(json.dumps(errors))


def _worker_multihost(out_dir: Path, port: int, process_id: int):
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from dsv4_jax.runtime.engine import Engine
    from dsv4_jax.runtime.mesh import make_mesh
    dp, tp, pp, ep = MULTIHOST
    engine = Engine(build_model(), capacity=CAPACITY, prefill_chunk=CHUNK,
                    mesh=make_mesh(tp=tp, dp=dp, pp=pp, ep=ep, cfg=CFG))
    tokens = [r.tokens for r in engine.generate(prompts(), max_new_tokens=NEW_TOKENS)]
    last_logits = np.asarray(engine.prefill(prompts())[0])
    res = dict(process_count=jax.process_count(), device_count=jax.device_count(),
               local_devices=jax.local_device_count(), tokens=tokens, last_logits=last_logits.tolist())
    (out_dir / f"process{process_id}.json").write_text(json.dumps(res))
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "layouts":
        _worker_layouts(Path(sys.argv[2]), sys.argv[3:])
    elif mode == "experts":
        _worker_experts(Path(sys.argv[2]))
    elif mode == "multihost":
        _worker_multihost(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
