"""Pipeline parallelism (dsv4_jax.runtime.pipeline): parity with the unpipelined model for pp = 1, 2, 4, 8,
determinism, metadata built once, the engine's decode lookahead and kernel default, clear errors, and a
2-process multi-host run.

The pipelined programs need several devices. XLA's fake CPU device count must be set before JAX
initialises, and conftest.py imports JAX first, so every multi-device run happens in a subprocess
that runs this file as a script (``python tests/test_pipeline.py <mode> ...``); the pytest process
(one device) computes the unpipelined reference and compares.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from conftest import tiny  # noqa: E402  (sets JAX_PLATFORMS=cpu before jax is imported)
from workers import finish, free_port, jaxpr_walk, spawn, stop  # noqa: E402
from dsv4_jax.model.config import CSA, HASH_MOE, HCA, MOE, SLIDING  # noqa: E402

# 8 layers: every stage split below starts some stage on a sliding, a CSA and an HCA layer, and the
# hash-routed layers (0-2) land on stages > 0 for pp >= 4. 3 Sinkhorn iterations keep compiles short.
CFG = tiny(num_hidden_layers=8, layer_types=(SLIDING, SLIDING, CSA, HCA, CSA, HCA, CSA, HCA),
           mlp_layer_types=(HASH_MOE,) * 3 + (MOE,) * 5, hc_sinkhorn_iters=3)
SEED = 7
PROMPT_LENS = (23, 5, 14)  # ragged; longer than the window (8), several CSA (4) and HCA (8) windows
CAPACITY, CHUNK, NEW_TOKENS = 48, 8, 8
# (pp, boundaries, microbatches): stages start right before CSA (2, 4, 6) and HCA (3, 5, 7) layers;
# batch 3 is padded to 4 rows for 2 microbatches. With microbatches < batch the per-microbatch matmuls
# have other shapes than the unpipelined batch, so results agree to ~5e-7 (XLA CPU), not bitwise.
CASES = {
    "pp1": (1, None, 2),
    "pp2": (2, (3,), 1),  # stage 1 starts on HCA; one microbatch: bitwise equal to the unpipelined model
    "pp4": (4, (2, 3, 6), 2),  # stages start SWA, CSA, HCA, CSA; uneven (2, 1, 3, 2 layers)
    "pp8": (8, None, None),  # one layer per stage (default microbatches = min(pp, batch) = 3)
}
DETERMINISM_CASE, DETERMINISM_RUNS = "pp4", 20
SAMPLED_CASE = "pp4"  # also generates with temperature and top-k, against the unpipelined engine
# Logits at every prompt position (one more compile per case) for these; last-token logits, caches and
# tokens for all cases.
FULL_LOGITS_CASES = ("pp4", "pp8")
CASE_GROUPS = (("pp2", "pp4"), ("pp1", "pp8"))  # two 8-device subprocesses, to use both CPU cores
# The CLI on the demo model (6 layers): unpipelined, and --pp 3 with stages starting SWA, CSA, HCA.
CLI_ARGS = ["-m", "dsv4_jax.generate", "--prompt-ids", "5,17,42,9,3,77,120,8,1,2,3", "--max-new-tokens", "6",
            "--greedy", "--json"]
CLI_RUNS = (("cli_plain", 1, []), ("cli_pp3", 3, ["--pp", "3", "--pp-boundaries", "2,3"]))


def prompts() -> list[list[int]]:
    rng = np.random.RandomState(0)
    return [[int(t) for t in rng.randint(2, CFG.vocab_size, n)] for n in PROMPT_LENS]


def sampled_tokens(engine) -> list[list[int]]:
    """Tokens of a generation with temperature and top-k (the sampling settings reach the decode step)."""
    from dsv4_jax.runtime.sampling import SamplingParams
    return [r.tokens for r in engine.generate(prompts(), max_new_tokens=NEW_TOKENS, seed=3,
                                              sampling=SamplingParams(temperature=0.9, top_k=6))]


def lookahead_events(engine) -> list[str]:
    """Generate and record, in order, every decode step issued ("dispatch s") and every step's tokens read
    back by the host ("read s"); "fed back" when step s + 1 took step s's device output as it was, "host"
    when a step's tokens came back as a host array (a blocking read inside the step)."""
    events, run_decode = [], engine._run_decode

    class Tokens:
        """A step's next tokens: notes when the host reads them."""

        def __init__(self, value, step):
            self.value, self.step = value, step

        def __array__(self, dtype=None, copy=None):
            events.append(f"read {self.step}")
            return np.asarray(self.value, dtype)

    def recorded(cache, tokens, *args):
        step = sum(e.startswith("dispatch") for e in events)
        if isinstance(tokens, Tokens):
            assert tokens.step == step - 1
            events.append("fed back")
            tokens = tokens.value
        events.append(f"dispatch {step}")
        next_tokens, *rest = run_decode(cache, tokens, *args)
        if isinstance(next_tokens, np.ndarray):
            events.append("host")
        return Tokens(next_tokens, step), *rest

    engine._run_decode = recorded
    try:
        engine.generate(prompts(), max_new_tokens=NEW_TOKENS, eos_token_ids=[])
    finally:
        del engine._run_decode
    return events


def build_model():
    from flax import nnx

    from dsv4_jax.model.transformer import DeepseekV4ForCausalLM
    return DeepseekV4ForCausalLM(CFG, rngs=nnx.Rngs(SEED))


def chunked_logits(run_chunk, new_cache, batch_prompts, chunk: int):
    """Feed ragged prompts ``chunk`` tokens at a time; logits [B, S_max, V] (0 at padding positions)."""
    B = len(batch_prompts)
    lens = np.array([len(p) for p in batch_prompts])
    cache = new_cache(B)
    out = None
    for pos in range(0, lens.max(), chunk):
        n_new = np.clip(lens - pos, 0, chunk).astype(np.int32)
        ids = np.zeros((B, chunk), np.int32)
        for b in range(B):
            ids[b, :n_new[b]] = batch_prompts[b][pos:pos + n_new[b]]
        logits, cache = run_chunk(cache, ids, np.full(B, pos, np.int32), n_new, last_only=False)
        logits = np.asarray(logits)
        if out is None:
            out = np.zeros((B, lens.max(), logits.shape[-1]), np.float32)
        for b in range(B):
            out[b, pos:pos + n_new[b]] = logits[b, :n_new[b]]
    return out


def flat_caches(caches) -> dict[str, np.ndarray]:
    import jax
    return {f"{i}{jax.tree_util.keystr(p)}": np.asarray(v)
            for i, c in enumerate(caches) for p, v in jax.tree_util.tree_flatten_with_path(c)[0]}


def run_script(args: list[str], devices: int, log: Path) -> subprocess.Popen:
    """Run this file as a worker with ``devices`` fake CPU devices; its output goes to ``log``."""
    return spawn([str(Path(__file__).resolve()), *args], devices, log)


# ----- the pytest side -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Start every multi-device subprocess at once (they compile while the reference is computed):
    the 8-device run of all CASES (+ determinism + jaxpr checks) and the two multi-host processes."""
    out_dir = tmp_path_factory.mktemp("pipeline")
    port = free_port()
    procs = {f"cases{i}": run_script(["cases", str(out_dir / f"cases{i}"), *group], 8, out_dir / f"cases{i}.log")
             for i, group in enumerate(CASE_GROUPS)}
    for i in range(2):
        procs[f"multihost{i}"] = run_script(["multihost", str(out_dir), str(port), str(i)], 2,
                                            out_dir / f"multihost{i}.log")
    for name, devices, extra in CLI_RUNS:
        procs[name] = spawn([*CLI_ARGS, *extra], devices, out_dir / f"{name}.log", stdout=out_dir / f"{name}.out")
    yield out_dir, procs
    stop(procs)


@pytest.fixture(scope="module")
def reference(workers):
    """The unpipelined model (one device): ragged chunked logits, greedy tokens, caches after prefill."""
    import jax.numpy as jnp

    from dsv4_jax.runtime.engine import Engine
    model = build_model()
    engine = Engine(model, capacity=CAPACITY, prefill_chunk=CHUNK)

    def run_chunk(cache, ids, start, n_new, last_only):
        return engine.steps.chunk(engine.weights, cache, jnp.asarray(ids), jnp.asarray(start), jnp.asarray(n_new),
                                  last_only=last_only)

    logits = chunked_logits(run_chunk, engine._new_cache, prompts(), CHUNK)
    tokens = [r.tokens for r in engine.generate(prompts(), max_new_tokens=NEW_TOKENS)]
    last_logits, cache, _ = engine.prefill(prompts())
    return dict(logits=logits, tokens=tokens, last_logits=np.asarray(last_logits), cache=flat_caches(cache),
                sampled_tokens=sampled_tokens(engine), lookahead=lookahead_events(engine))


@pytest.fixture(scope="module")
def pipelined(workers, reference):
    """Results of the 8-device subprocess: every case of CASES, the determinism runs, the jaxpr checks."""
    out_dir, procs = workers
    summary, arrays = {"cases": {}, "jaxpr": {}}, {}
    for i in range(len(CASE_GROUPS)):
        finish(procs[f"cases{i}"])
        part = json.loads((out_dir / f"cases{i}" / "summary.json").read_text())
        for key in ("cases", "jaxpr"):
            summary[key].update(part[key])
        summary.update({k: v for k, v in part.items() if k not in ("cases", "jaxpr")})
        arrays.update(np.load(out_dir / f"cases{i}" / "arrays.npz"))
    return summary, arrays


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (the absolute difference where b is all zeros)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale, diff = np.abs(b).max(), np.abs(a - b).max()
    return float(diff / scale if scale else diff)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_tokens_equal_unpipelined(pipelined, reference, case):
    summary, arrays = pipelined
    got = summary["cases"][case]
    pp, boundaries, _ = CASES[case]
    assert got["stage_layers"] == [list(s) for s in _expected_stages(pp, boundaries)]
    if case in FULL_LOGITS_CASES:
        assert rel_err(arrays[f"{case}/logits"], reference["logits"]) < 1e-6
        np.testing.assert_array_equal(arrays[f"{case}/logits"].argmax(-1), reference["logits"].argmax(-1))
    np.testing.assert_array_equal(arrays[f"{case}/last_logits"].argmax(-1), reference["last_logits"].argmax(-1))
    assert rel_err(arrays[f"{case}/last_logits"], reference["last_logits"]) < 1e-6
    assert got["tokens"] == reference["tokens"]
    if CASES[case][2] == 1:  # same shapes as the unpipelined step: nothing but the staging differs
        np.testing.assert_array_equal(arrays[f"{case}/last_logits"], reference["last_logits"])
    # Every stage's caches (unstacked back to per-layer caches) equal the single-stage caches, relative to
    # each tensor's largest entry (1e-5, the element-wise rtol this replaced): an element-wise tolerance
    # fails on entries that are a cancellation's tiny residue (0.0035 off by 1.3e-6 on CI's CPU), which is
    # fp32 round-off of a differently fused program, not a defect.
    for key, want in reference["cache"].items():
        have = arrays[f"{case}/cache/{key}"]
        assert have.shape == want.shape, key
        assert rel_err(have, want) < 1e-5, (key, rel_err(have, want))


def _expected_stages(pp, boundaries):
    from dsv4_jax.runtime.pipeline import stage_starts
    starts = stage_starts(CFG.num_hidden_layers, pp, boundaries)
    ends = (*starts[1:], CFG.num_hidden_layers)
    return [range(a, b) for a, b in zip(starts, ends)]


def test_sampled_tokens_equal_unpipelined(pipelined, reference):
    summary, _ = pipelined
    assert summary["sampled_tokens"] == reference["sampled_tokens"]
    assert summary["sampled_tokens"] != reference["tokens"]  # the settings took effect: not greedy


def test_pipelined_generation_is_bitwise_deterministic(pipelined):
    summary, _ = pipelined
    runs = summary["determinism"]
    assert runs["runs"] == DETERMINISM_RUNS
    assert runs["distinct_tokens"] == 1 and runs["distinct_logits"] == 1


def test_pipelined_decode_keeps_the_engines_lookahead(pipelined, reference):
    """Step s + 1 is issued on step s's device output before step s's tokens are read back, as the Engine does
    (the pipeline runs Engine.stream and the engine's decode step)."""
    summary, _ = pipelined
    events = summary["lookahead"]
    assert events == reference["lookahead"]
    steps = NEW_TOKENS - 1
    assert "host" not in events
    assert events.count("fed back") == steps - 1
    for s in range(steps - 1):
        assert events.index(f"dispatch {s + 1}") < events.index(f"read {s}"), (s, events)


def test_pipeline_kernels_default_is_the_engines(monkeypatch):
    from dsv4_jax import ops
    from dsv4_jax.runtime import engine
    from dsv4_jax.runtime.engine import PipelineEngine
    model = _small_model()
    default = ops.Kernels(engine.default_kernels())
    assert PipelineEngine(model, pp=1).kernels == engine.Engine(model).kernels == default
    monkeypatch.setattr(engine, "default_kernels", lambda: "pallas")  # the GPU default
    assert PipelineEngine(model, pp=1).kernels == engine.Engine(model).kernels == ops.Kernels("pallas")
    assert PipelineEngine(model, pp=1, kernels="xla").kernels == ops.Kernels("xla")


def test_metadata_built_once_before_any_stage_work(pipelined):
    summary, _ = pipelined
    for pp, info in summary["jaxpr"].items():
        assert info["meta_eqns"] > 0 and info["stage_eqns"] > 0, (pp, info)
        assert info["last_meta"] < info["first_stage"], f"pp {pp}: metadata work after stage work: {info}"
        assert info["meta_inside_stage"] == 0, f"pp {pp}: metadata computed inside the stage program"
        # Exactly one metadata computation: as many metadata equations as one build_metadata.
        assert info["meta_eqns"] == info["one_build_metadata_eqns"], (pp, info)
        # What crosses a stage boundary: the full [Bm, C, hc_mult, d] streams plus the token ids.
        Bm, C = info["microbatch_rows"], info["chunk"]
        assert info["ppermute_operands"] == [[[Bm, C, CFG.hc_mult, CFG.hidden_size], "float32"], [[Bm, C], "int32"]]
        assert info["ppermute_perms"] == [[[s, s + 1] for s in range(int(pp[2:]) - 1)]] * 2


def test_stage_assignment():
    from dsv4_jax.runtime.pipeline import stage_of_layer, stage_starts
    assert stage_starts(8, 1) == (0,)
    assert stage_starts(8, 3) == (0, 3, 6)
    assert stage_of_layer(8, 3) == (0, 0, 0, 1, 1, 1, 2, 2)
    assert stage_of_layer(8, 4, (2, 3, 6)) == (0, 0, 1, 2, 2, 2, 3, 3)
    assert stage_of_layer(8, 8) == tuple(range(8))


@pytest.mark.parametrize("pp, boundaries, message", [
    (9, None, r"^pp 9 is larger than the number of layers \(8\); every stage needs a layer$"),
    (0, None, r"^pp 0 must be a positive integer$"),
    (4, (2, 2, 5), r"^boundaries \[2, 2, 5\] leave stage 1 with no layers \(it starts and ends at layer 2\)$"),
    (3, (5, 2), r"^boundaries \[5, 2\] must be strictly increasing \(5 then 2\)$"),
    (3, (0, 4), r"^boundary 0 in \[0, 4\] is outside \[1, 8\): stage 0 and the last stage need at least one layer$"),
    (3, (4, 8), r"^boundary 8 in \[4, 8\] is outside \[1, 8\)"),
    (3, (4,), r"^boundaries \[4\] must list 2 stage start layer\(s\) for pp 3, got 1$"),
    (2, (2.5,), r"^boundary 2.5 in \[2.5\] is not an integer layer index$"),
])
def test_bad_pipeline_arguments(pp, boundaries, message):
    from dsv4_jax.model.transformer import InputError
    from dsv4_jax.runtime.engine import PipelineEngine
    with pytest.raises(InputError, match=message) as e:
        PipelineEngine(_small_model(), pp=pp, boundaries=boundaries)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_more_stages_than_devices():
    import jax

    from dsv4_jax.model.transformer import InputError
    from dsv4_jax.runtime.engine import PipelineEngine
    n = len(jax.devices())
    verb = "is" if n == 1 else "are"
    with pytest.raises(InputError, match=rf"^pp {n + 1} needs {n + 1} devices but {n} {verb} available \(on CPU: "
                                         rf"XLA_FLAGS=--xla_force_host_platform_device_count={n + 1}\)$"):
        PipelineEngine(_small_model(), pp=n + 1)
    with pytest.raises(InputError, match=r"^microbatches 0 must be a positive integer$"):
        PipelineEngine(_small_model(), pp=1, microbatches=0)


@functools.lru_cache(maxsize=1)
def _small_model():
    from flax import nnx

    from dsv4_jax.model.transformer import DeepseekV4ForCausalLM
    return DeepseekV4ForCausalLM(CFG, rngs=nnx.Rngs(0))


def test_two_process_multihost_matches_single_process(workers, reference):
    """2 processes x 2 fake CPU devices, gloo collectives, one pp=4 mesh over both processes."""
    out_dir, procs = workers
    for i in range(2):
        finish(procs[f"multihost{i}"])
    for i in range(2):
        res = json.loads((out_dir / f"process{i}.json").read_text())
        assert res["process_count"] == 2 and res["device_count"] == 4 and res["local_devices"] == 2
        assert res["stage_processes"] == [0, 0, 1, 1]  # stages 0-1 on process 0, 2-3 on process 1
        assert res["tokens"] == reference["tokens"], f"process {i}"
        assert rel_err(np.asarray(res["last_logits"], np.float32), reference["last_logits"]) < 1e-6


@pytest.mark.parametrize("args, message", [
    (["--pp", "9"], "--pp 9 is larger than the number of layers (6); every stage needs a layer"),
    (["--pp", "3", "--pp-boundaries", "2,2"], "--pp-boundaries [2, 2] leave stage 1 with no layers (it starts and "
                                              "ends at layer 2)"),
    (["--pp", "2", "--pp-boundaries", "2,x"], "--pp-boundaries '2,x' must be comma-separated integers"),
    (["--pp", "0"], "--pp 0 must be a positive integer"),
    (["--pp", "2"], "--pp 2 needs 2 devices but 1 is available (on CPU: "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=2)"),
])
def test_generate_cli_pp_errors(capsys, args, message):
    """Bad --pp input is one line on stderr and exit code 2 (checked before any weights are built)."""
    import jax

    from dsv4_jax.runtime.cli import main
    if "needs 2 devices" in message and len(jax.devices()) >= 2:
        pytest.skip("this process has several devices")
    capsys.readouterr()
    assert main(["--prompt-ids", "1,2", "--max-new-tokens", "2", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}", err


def test_generate_cli_pp(workers):
    """``--pp 3`` on the CLI (3 fake CPU devices): the same greedy tokens as the unpipelined CLI."""
    out_dir, procs = workers
    tokens = {}
    for name, _, _ in CLI_RUNS:
        finish(procs[name], timeout=600)
        tokens[name] = json.loads((out_dir / f"{name}.out").read_text().strip().splitlines()[-1])["tokens"]
    assert len(tokens["cli_pp3"]) == 6 and tokens["cli_pp3"] == tokens["cli_plain"]


# ----- the subprocess side -----------------------------------------------------------------------
def _jaxpr_report(engine, batch: int, chunk: int) -> dict:
    import jax
    import jax.numpy as jnp

    from dsv4_jax.model.metadata import build_metadata
    from dsv4_jax.model.transformer import METADATA_SCOPE
    from dsv4_jax.runtime.pipeline import STAGE_SCOPE
    M, Bp = engine.layout(batch)
    # The engine's prefill step (it pads the batch to Bp rows before the metadata).
    fn = functools.partial(engine.steps.chunk, last_only=True, kernels=engine.kernels)
    ids, rows = jnp.zeros((batch, chunk), jnp.int32), jnp.zeros((batch,), jnp.int32)
    jaxpr = jax.make_jaxpr(fn)(engine.weights, engine.plan.cache_shapes(Bp), ids, rows, rows + chunk).jaxpr
    vec = jnp.zeros((Bp,), jnp.int32)
    walk = list(jaxpr_walk(jaxpr))
    meta = [i for i, (s, _) in enumerate(walk) if METADATA_SCOPE in s]
    stage = [i for i, (s, _) in enumerate(walk) if STAGE_SCOPE in s]

    def one_build(start, n_new):
        with jax.named_scope(METADATA_SCOPE):
            return build_metadata(CFG, start, n_new, chunk, CAPACITY)
    alone = list(jaxpr_walk(jax.make_jaxpr(one_build)(vec, vec + chunk).jaxpr))
    perms = [e for s, e in walk if e.primitive.name == "ppermute"]
    return dict(meta_eqns=len(meta), stage_eqns=len(stage), last_meta=max(meta), first_stage=min(stage),
                meta_inside_stage=sum(METADATA_SCOPE in s and STAGE_SCOPE in s for s, _ in walk),
                one_build_metadata_eqns=len(alone), microbatch_rows=Bp // M, chunk=chunk, n_ppermute=len(perms),
                ppermute_operands=[[list(v.aval.shape), str(v.aval.dtype)] for e in perms for v in e.invars],
                ppermute_perms=[[list(p) for p in e.params["perm"]] for e in perms])


def _worker_cases(out_dir: Path, names: list[str]):
    import jax

    from dsv4_jax.runtime.engine import PipelineEngine
    assert len(jax.devices()) == 8, jax.devices()
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model()
    summary, arrays = {"cases": {}, "jaxpr": {}}, {}
    engines = {}
    for name in names:
        pp, boundaries, micro = CASES[name]
        eng = PipelineEngine(model, pp=pp, boundaries=boundaries, microbatches=micro, capacity=CAPACITY,
                             prefill_chunk=CHUNK)
        engines[name] = eng
        if name in FULL_LOGITS_CASES:
            arrays[f"{name}/logits"] = chunked_logits(eng._run_chunk, eng._new_cache, prompts(), CHUNK)
        last_logits, cache, _ = eng.prefill(prompts())
        arrays[f"{name}/last_logits"] = np.asarray(last_logits)
        per_layer = eng.plan.unstack_cache(cache)
        B = len(PROMPT_LENS)
        for key, v in flat_caches(per_layer).items():
            arrays[f"{name}/cache/{key}"] = v[:B]
        tokens = [r.tokens for r in eng.generate(prompts(), max_new_tokens=NEW_TOKENS)]
        summary["cases"][name] = dict(tokens=tokens, stage_layers=[list(s) for s in eng.plan.stage_layers])
        print(name, "done", file=sys.stderr, flush=True)

    if DETERMINISM_CASE in engines:
        eng = engines[DETERMINISM_CASE]
        toks, logits = set(), set()
        for _ in range(DETERMINISM_RUNS):
            toks.add(json.dumps([r.tokens for r in eng.generate(prompts(), max_new_tokens=NEW_TOKENS)]))
            logits.add(np.asarray(eng.prefill(prompts())[0]).tobytes())
        summary["determinism"] = dict(runs=DETERMINISM_RUNS, distinct_tokens=len(toks), distinct_logits=len(logits))

    if SAMPLED_CASE in engines:
        summary["sampled_tokens"] = sampled_tokens(engines[SAMPLED_CASE])
        summary["lookahead"] = lookahead_events(engines[SAMPLED_CASE])

    for name, eng in engines.items():
        if eng.pp > 1:
            summary["jaxpr"][name] = _jaxpr_report(eng, len(PROMPT_LENS), CHUNK)
    np.savez(out_dir / "arrays.npz", **arrays)
    (out_dir / "summary.json").write_text(json.dumps(summary))


def _worker_multihost(out_dir: Path, port: int, process_id: int):
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from dsv4_jax.runtime.engine import PipelineEngine
    pp, boundaries, micro = CASES["pp4"]
    eng = PipelineEngine(build_model(), pp=pp, boundaries=boundaries, microbatches=micro, capacity=CAPACITY,
                         prefill_chunk=CHUNK)
    tokens = [r.tokens for r in eng.generate(prompts(), max_new_tokens=NEW_TOKENS)]
    last_logits = np.asarray(eng.prefill(prompts())[0])
    res = dict(process_count=jax.process_count(), device_count=jax.device_count(),
               local_devices=jax.local_device_count(),
               stage_processes=[d.process_index for d in eng.plan.mesh.devices.flat],
               tokens=tokens, last_logits=last_logits.tolist())
    (out_dir / f"process{process_id}.json").write_text(json.dumps(res))
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "cases":
        _worker_cases(Path(sys.argv[2]), sys.argv[3:])
    elif mode == "multihost":
        _worker_multihost(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
