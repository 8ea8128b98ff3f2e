"""``from_pretrained(path, mesh=make_mesh(...))`` and ``orbax.restore(path, mesh=...)``: every tensor read straight
into its shards (weights/placing.py).

A tiny model with every layer type (sliding, CSA, HCA; hash and learned MoE) is written in DeepSeek's released
format (FP8 linears, FP4 per-expert matrices with ue8m0 scales, bf16 / fp32 / int64 for the rest), as transformers'
stacked fp32 tensors, and as an orbax checkpoint; its vocabulary (250) does not divide by tp 4. Each is loaded on
three meshes of fake CPU devices: tp 2 x dp 2 with expert parallelism, tp 2 (the routed experts split along
their width, gate | up rows paired), and tp 4 x dp 2 (vocabulary padded to 252). The checks: every device holds
exactly its share (shard shapes written out here from the issue's layout, not from the rules), the placed arrays
equal the one-device load (padding zero, pairs a reshape), at no point of a load does any device hold more than
its final share (the orbax restore of paired rows: one layer's gate_up share more while it moves) or receive or
hold an array as large as a whole expert stack, ``Engine(model, mesh=)`` keeps the loaded arrays
as they are and gives the one-device engine's fp32 logits (within 1e-5 relative) and greedy tokens, and a mesh
that does not fit the config is a one-line error before any tensor is read.

Fake devices must be configured before JAX starts and conftest.py imports JAX first, so the mesh runs happen in
two subprocesses that run this file as a script (``python tests/test_mesh_loading.py meshes OUT ROOT NAME...``).
"""

from __future__ import annotations

import collections
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
from workers import finish, spawn  # noqa: E402
from dsv4_jax.model.config import CSA, HASH_MOE, HCA, MOE, SLIDING  # noqa: E402

# 8 query heads in 4 output groups and 8 indexer heads split over tp 4; 8 experts over dp x tp 4; vocabulary 250
# is padded to 252 on tp 4.
CFG = tiny(vocab_size=250, num_attention_heads=8, o_groups=4, num_hidden_layers=4,
           layer_types=(SLIDING, CSA, HCA, CSA), mlp_layer_types=(HASH_MOE, MOE, MOE, MOE), hc_sinkhorn_iters=3)
SEED = 5
MESHES = {"tp2_dp2_ep": dict(tp=2, dp=2, ep=True), "tp2": dict(tp=2), "tp4_dp2": dict(tp=4, dp=2)}
WORKERS = (("tp2_dp2_ep", "bad"), ("tp2", "tp4_dp2"))  # two 8-device subprocesses, one per CPU core
# Ragged, one prefill chunk each; 29 tokens: 7 CSA entries > index_topk 4, so the indexer weights matter.
PROMPTS = ([3, 17, 42, 9, 120, 8, 1, 2, 77, 5, 6, 200, 31, 4, 99, 13, 249, 64, 12, 7, 8, 9, 10, 11, 30, 31, 32, 33, 34],
           [5, 9, 2], [100, 101, 7, 45, 23, 11, 150, 3, 3, 4, 5, 66, 7, 8, 9, 90, 80, 70])
CAPACITY, CHUNK, NEW_TOKENS = 48, 32, 5
CHECKPOINTS = ("released", "stacked", "orbax")

# Parameters split over tp, and the dimension split (canonical shapes); the rest are replicated, except the
# routed experts (EXPERTS). From the issue: heads, output groups, indexer heads, the shared expert's width and
# the vocabulary over tp.
TP_SPLIT = {"self_attn.q_b_proj.weight": 0, "self_attn.sinks": 0, "self_attn.o_a_proj.weight": 0,
            "self_attn.o_b_proj.weight": 1, "indexer.q_b_proj.weight": 0, "indexer.scorer.weights_proj.weight": 0,
            "shared_experts.gate_proj.weight": 0, "shared_experts.up_proj.weight": 0,
            "shared_experts.down_proj.weight": 1, "embed_tokens.weight": 0, "lm_head.weight": 0}
EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
VOCAB = ("embed_tokens.weight", "lm_head.weight")


def expected_shard(name: str, shape: tuple[int, ...], tp: int, dp: int = 1, ep: bool = False) -> tuple[int, ...]:
    """The shape one device holds of parameter ``name`` (canonical ``shape``) on a tp x dp mesh."""
    E, F, d = CFG.n_routed_experts, CFG.moe_intermediate_size, CFG.hidden_size
    if name.endswith(EXPERTS):
        if ep:  # whole experts, spread over all dp x tp devices
            return (E // (dp * tp), *shape[1:])
        return (E, 2, F // tp, d) if name.endswith("gate_up_proj") else (E, d, F // tp)
    dim = next((dim for suffix, dim in TP_SPLIT.items() if name.endswith(suffix)), None)
    if dim is None:
        return shape
    return shape[:dim] + (-(-shape[dim] // tp),) + shape[dim + 1:]


def expected_placed(name: str, shape: tuple[int, ...], tp: int, dp: int = 1, ep: bool = False) -> tuple[int, ...]:
    """The whole placed shape: the vocabulary padded to a multiple of tp, gate | up rows as [E, 2, F, d]."""
    if name.endswith(VOCAB):
        return (-(-shape[0] // tp) * tp, *shape[1:])
    if name.endswith("gate_up_proj") and not ep and tp > 1:
        return (shape[0], 2, shape[1] // 2, shape[2])
    return shape


# ----- the checkpoints ------------------------------------------------------------------------------------------

def per_expert(canonical: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stacked routed experts -> DeepSeek's one matrix per expert (``...experts.3.w1.weight``: gate, w3 up, w2 down)."""
    F, out = CFG.moe_intermediate_size, {}
    for name, value in canonical.items():
        if name.endswith("experts.gate_up_proj"):
            for e, m in enumerate(value):
                out[name.replace("gate_up_proj", f"{e}.w1.weight")] = m[:F]
                out[name.replace("gate_up_proj", f"{e}.w3.weight")] = m[F:]
        elif name.endswith("experts.down_proj"):
            out |= {name.replace("down_proj", f"{e}.w2.weight"): m for e, m in enumerate(value)}
        else:
            out[name] = value
    return out


def write_checkpoints(root: Path) -> None:
    """root/released (FP8 / FP4 per expert), root/stacked (fp32, transformers' stacked experts), root/orbax
    (the released one as loaded, converted) from one random model."""
    import jax.numpy as jnp
    from flax import nnx

    from dsv4_jax.model.transformer import DeepseekV4ForCausalLM
    from dsv4_jax.weights import orbax
    from dsv4_jax.weights.params import param_table
    from test_quantized_checkpoint import released, write

    model = DeepseekV4ForCausalLM(CFG, dtype=jnp.float32, rngs=nnx.Rngs(SEED))
    canonical = {name: np.asarray(var.get_value()) for name, var in param_table(model).items()}
    config = CFG.to_hf_dict()
    tensors = {}
    for name, value in per_expert(canonical).items():
        tensors |= released(name, value)
    write(root / "released", config, tensors)
    write(root / "stacked", {**config, "dtype": "float32"}, canonical)
    import dsv4_jax
    orbax.save(dsv4_jax.from_pretrained(root / "released", "float32", dequantize=True), root / "orbax")


def load(root: Path, which: str, **kw):
    import dsv4_jax
    from dsv4_jax.weights import orbax
    # dequantised: this model's widths split into less than a quantisation block per shard (released precision
    # on a mesh: tests/test_released_precision.py)
    return orbax.restore(root / which, **kw) if which == "orbax" else dsv4_jax.from_pretrained(
        root / which, "float32", dequantize=True, **kw)


# ----- the pytest side ------------------------------------------------------------------------------------------

def run_worker(args: list[str], log: Path) -> subprocess.Popen:
    return spawn([str(Path(__file__).resolve()), *args], 8, log)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mesh_loading")
    write_checkpoints(root)
    return root


@pytest.fixture(scope="module")
def workers(checkpoints):
    """Both 8-device subprocesses, started at once (they load and compile while the reference runs)."""
    procs = [run_worker(["meshes", str(checkpoints / f"worker{i}"), str(checkpoints), *names],
                        checkpoints / f"worker{i}.log") for i, names in enumerate(WORKERS)]
    yield checkpoints, procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def reference(workers):
    """The one-device loads (canonical shapes) of every checkpoint; the one-device engine's logits after prefill
    and greedy tokens."""
    from dsv4_jax.runtime.engine import Engine
    from dsv4_jax.weights.params import param_table

    root, _ = workers
    models = {which: load(root, which) for which in CHECKPOINTS}
    engine = Engine(models["released"], capacity=CAPACITY, prefill_chunk=CHUNK)
    logits = np.asarray(engine.prefill(list(PROMPTS))[0])
    tokens = [r.tokens for r in engine.generate(list(PROMPTS), max_new_tokens=NEW_TOKENS)]
    arrays = {which: {name: np.asarray(var.get_value()) for name, var in param_table(m).items()}
              for which, m in models.items()}
    return dict(arrays=arrays, logits=logits, tokens=tokens)


@pytest.fixture(scope="module")
def results(workers):
    """mesh name (or "bad") -> its worker's report, with "dir": where its arrays are."""
    root, procs = workers
    for proc in procs:
        finish(proc)
    out = {}
    for i, names in enumerate(WORKERS):
        for name in names:
            d = root / f"worker{i}" / name
            out[name] = json.loads((d / "report.json").read_text()) | {"dir": d}
    return out


def unplaced(name: str, placed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A placed array -> its canonical form; padded vocabulary rows must be zero."""
    if name.endswith(VOCAB):
        assert not placed[shape[0]:].any(), f"{name}: padding rows are not zero"
        return placed[: shape[0]]
    return placed.reshape(shape)  # [E, 2, F, d] -> [E, 2F, d]: [e, 0] the gate rows, [e, 1] the up rows


@pytest.mark.parametrize("mesh", list(MESHES))
def test_each_device_holds_exactly_its_share(results, reference, mesh):
    kw = MESHES[mesh]
    devices = kw["tp"] * kw.get("dp", 1)
    for which in CHECKPOINTS:
        report = results[mesh]["shards"][which]
        assert sorted(report) == sorted(reference["arrays"][which]), which
        split = set()
        for name, got in report.items():
            shape = reference["arrays"][which][name].shape
            want = expected_shard(name, shape, **kw)
            assert got["shape"] == list(expected_placed(name, shape, **kw)), (which, name)
            assert got["shards"] == [list(want)] * devices, (which, name, got)
            if want != shape:
                split.add(next(s for s in (*TP_SPLIT, *EXPERTS) if name.endswith(s)))
        assert split == {*TP_SPLIT, *EXPERTS}, which  # every kind of split parameter was seen split


@pytest.mark.parametrize("mesh", list(MESHES))
def test_placed_arrays_equal_the_one_device_load(results, reference, mesh):
    """Bitwise, for every checkpoint; and every checkpoint's arrays have the same placed shapes and shardings
    (the orbax restore's as the safetensors import's)."""
    for which in CHECKPOINTS:
        with np.load(results[mesh]["dir"] / f"{which}.npz") as loaded:
            assert sorted(loaded.files) == sorted(reference["arrays"][which])
            for name, want in reference["arrays"][which].items():
                got = unplaced(name, loaded[name], want.shape)
                assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), (which, name)
    assert results[mesh]["placed_unlike_released"] == {"stacked": [], "orbax": []}


@pytest.mark.parametrize("mesh", list(MESHES))
def test_no_device_ever_holds_more_than_its_share(results, reference, mesh):
    """Watched after every tensor read (the orbax restore: after it and every move of paired rows): each device
    ends holding exactly its share of the model, never held more on the way (for the orbax restore of paired
    rows, plus one gate_up share: a layer's rows as read and as placed, while they move), and no buffer on any
    device, nor any value sent to one, was as large as a whole expert stack."""
    kw = MESHES[mesh]
    E, F, d = CFG.n_routed_experts, CFG.moe_intermediate_size, CFG.hidden_size
    stack = E * 2 * F * d * 4  # gate_up_proj, fp32
    paired = expected_placed("experts.gate_up_proj", (E, 2 * F, d), **kw) != (E, 2 * F, d)
    moving = int(np.prod(expected_shard("experts.gate_up_proj", (E, 2 * F, d), **kw))) * 4 if paired else 0
    for which, watch in results[mesh]["watch"].items():
        share = sum(int(np.prod(expected_shard(name, a.shape, **kw))) * a.itemsize
                    for name, a in reference["arrays"][which].items())
        assert watch["final"] == {str(i): share for i in range(kw["tp"] * kw.get("dp", 1))}, which
        slack = moving if which == "orbax" else 0
        for device, most in watch["most"].items():
            assert most <= watch["final"][device] + slack, (which, device, most, watch["final"][device])
        assert 0 < watch["largest"] < stack and 0 < watch["largest_sent"] < stack, (which, watch, stack)
    # released: one step per tensor read (every expert matrix); orbax: the restore and each move of paired rows
    assert results[mesh]["watch"]["released"]["steps"] > 3 * E * 3
    assert results[mesh]["watch"]["orbax"]["steps"] > (1 if paired else 0)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_engine_on_the_loaded_mesh_matches_one_device(results, reference, mesh):
    r = results[mesh]
    assert r["engine_kept_every_array"], "Engine(model, mesh=) placed a loaded array again"
    with np.load(r["dir"] / "logits.npz") as f:
        logits = f["logits"]
    want = reference["logits"]
    err = np.abs(logits.astype(np.float64) - want).max() / np.abs(want).max()
    assert err < 1e-5, f"{mesh}: logits differ from the one-device engine: max rel err {err:.2e}"
    assert r["tokens"] == reference["tokens"]


def test_a_mesh_that_does_not_fit_is_one_line_before_any_read(results):
    bad = results["bad"]
    for which in ("released", "orbax"):
        assert bad[which] == ["InputError", "tp 3 does not divide the model's 8 query heads", 0], which
    assert bad["rules_with_model_mesh"] == [
        "ValueError", "rules come with a ModelMesh (its ep setting); give rules only with a jax Mesh", 0]


def test_one_device_model_mesh_equals_the_plain_load(checkpoints, reference):
    """make_mesh() of one device: every array as the plain load has it."""
    from dsv4_jax.runtime.mesh import make_mesh
    from dsv4_jax.weights.params import param_table
    for which in ("released", "orbax"):
        table = param_table(load(checkpoints, which, mesh=make_mesh()))
        for name, want in reference["arrays"][which].items():
            got = table[name].get_value()
            assert got.shape == want.shape and np.asarray(got).tobytes() == want.tobytes(), (which, name)


# ----- the subprocess side --------------------------------------------------------------------------------------

class DeviceBytes:
    """Device memory held by arrays created since the watch began (each buffer once, however many arrays view
    it), per device at each ``record``; the most each device held at any record, the largest buffer, and the
    largest value ``sent`` to a device in one piece."""

    def __init__(self):
        self.known = set(self.buffers())
        self.most, self.largest, self.largest_sent, self.steps = collections.Counter(), 0, 0, 0

    @staticmethod
    def buffers() -> dict[tuple[int, int], int]:
        """(device id, buffer address) -> bytes, over every live array's shards."""
        import jax
        return {(s.device.id, s.data.unsafe_buffer_pointer()): s.data.nbytes
                for a in jax.live_arrays() for s in a.addressable_shards}

    def record(self) -> dict[str, int]:
        held = collections.Counter()
        for (device, address), nbytes in self.buffers().items():
            if (device, address) not in self.known:
                held[str(device)] += nbytes
                self.largest = max(self.largest, nbytes)
        for device, n in held.items():
            self.most[device] = max(self.most[device], n)
        self.steps += 1
        return held

    def sent(self, value):
        self.largest_sent = max(self.largest_sent, value.nbytes)
        return value


def watched_load(root: Path, which: str, mesh):
    """Load with a DeviceBytes watch: a step after every tensor read (checkpoint.iter_tensors) or, for orbax's
    one restore call, after every write of paired rows (ShardedBuffer.write), and at the end; every value given
    to jax.device_put (the loaders' and orbax's transfers) or returned by a make_array_from_callback callback
    (one device's shard) is measured."""
    import jax

    from dsv4_jax.weights import checkpoint, placing

    watch = DeviceBytes()
    real = (checkpoint.iter_tensors, placing.ShardedBuffer.write, jax.device_put, jax.make_array_from_callback)
    real_iter, real_write, real_put, real_from_callback = real

    def iter_tensors(files, *args, **kwargs):
        for item in real_iter(files, *args, **kwargs):
            watch.record()
            yield item

    def write(self, start, block):
        real_write(self, start, block)
        watch.record()

    def from_callback(shape, sharding, callback, *args, **kwargs):
        return real_from_callback(shape, sharding, lambda index: watch.sent(callback(index)), *args, **kwargs)

    checkpoint.iter_tensors, placing.ShardedBuffer.write = iter_tensors, write
    jax.device_put = lambda x, *args, **kwargs: real_put(watch.sent(x), *args, **kwargs)
    jax.make_array_from_callback = from_callback
    try:
        model = load(root, which, mesh=mesh)
    finally:
        checkpoint.iter_tensors, placing.ShardedBuffer.write, jax.device_put, jax.make_array_from_callback = real
    final = watch.record()
    return model, {"final": dict(final), "most": dict(watch.most), "largest": watch.largest,
                   "largest_sent": watch.largest_sent, "steps": watch.steps}


def _mesh_run(out: Path, root: Path, name: str):
    from dsv4_jax.runtime.engine import Engine
    from dsv4_jax.runtime.mesh import make_mesh
    from dsv4_jax.weights.params import param_table

    mesh = make_mesh(**MESHES[name], cfg=CFG)
    out.mkdir(parents=True)
    report = {"shards": {}, "watch": {}}
    models, tables = {}, {}
    for which in CHECKPOINTS:
        models[which], report["watch"][which] = watched_load(root, which, mesh)
        tables[which] = {n: v.get_value() for n, v in param_table(models[which]).items()}
        report["shards"][which] = {
            n: {"shape": list(a.shape),
                "shards": [list(s.data.shape) for s in sorted(a.addressable_shards, key=lambda s: s.device.id)]}
            for n, a in tables[which].items()}
        np.savez(out / f"{which}.npz", **{n: np.asarray(a) for n, a in tables[which].items()})
    report["placed_unlike_released"] = {
        which: [n for n, a in tables[which].items()
                if (a.shape, a.sharding) != (tables["released"][n].shape, tables["released"][n].sharding)]
        for which in ("stacked", "orbax")}
    engine = Engine(models["released"], capacity=CAPACITY, prefill_chunk=CHUNK, mesh=mesh)
    kept = {id(a) for a in tables["released"].values()}
    report["engine_kept_every_array"] = len(engine.weights) == len(kept) and {id(w) for w in engine.weights} == kept
    np.savez(out / "logits.npz", logits=np.asarray(engine.prefill(list(PROMPTS))[0]))
    report["tokens"] = [r.tokens for r in engine.generate(list(PROMPTS), max_new_tokens=NEW_TOKENS)]
    (out / "report.json").write_text(json.dumps(report))


def _bad_run(out: Path, root: Path):
    """A tp 3 mesh (8 query heads): the error, and how many tensors were read (safetensors) or restore calls made."""
    from dsv4_jax.runtime.mesh import make_mesh
    from dsv4_jax.weights import dequantise, orbax
    from dsv4_jax.weights.sharding import ShardingRules

    out.mkdir(parents=True)
    reads = collections.Counter()
    real_read, real_checkpointer = dequantise.read_tensor, orbax._checkpointer
    dequantise.read_tensor = lambda t: reads.update(["n"]) or real_read(t)
    orbax._checkpointer = lambda: reads.update(["n"]) or real_checkpointer()
    report = {}
    for case, which, kw in (("released", "released", dict(mesh=make_mesh(tp=3))),
                            ("orbax", "orbax", dict(mesh=make_mesh(tp=3))),
                            ("rules_with_model_mesh", "released", dict(mesh=make_mesh(tp=2), rules=ShardingRules()))):
        reads.clear()
        try:
            load(root, which, **kw)
            report[case] = ["no error", "", reads["n"]]
        except Exception as e:  # noqa: BLE001 (the test checks its type)
            report[case] = [type(e).__name__, str(e), reads["n"]]
    (out / "report.json").write_text(json.dumps(report))


def worker(out: str, root: str, *names: str):
    for name in names:
        if name == "bad":
            _bad_run(Path(out) / name, Path(root))
        else:
            _mesh_run(Path(out) / name, Path(root), name)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"meshes": worker}[mode](*rest)
