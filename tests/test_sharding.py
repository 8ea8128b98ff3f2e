"""Logical axes, sharding rules and the quantised weight type (dsv4_jax.model.spec, dsv4_jax.weights.sharding,
dsv4_jax.weights.quant_array).

Every parameter and cache field declares its logical axes (checked against the table written out here from
spec §11); ShardingRules turn axes into PartitionSpecs, with one-line errors for what cannot be placed. The
demo checkpoint loaded onto a 2 x 2 mesh of fake CPU devices equals the single-device load bit for bit, each
array split as the rules say, and a cache lands as its fields' axes say; fake devices must be configured
before JAX starts and conftest.py imports JAX first, so that part runs this file as a script in a
subprocess (``python tests/test_sharding.py sharded OUT``). QuantArray dequantises exactly as
quantization.py's numpy functions do.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import jax  # noqa: E402  (conftest.py, or the parent's environment for the subprocess, picks the CPU)
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AbstractMesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import dsv4_jax  # noqa: E402
from dsv4_jax.model.cache import LayerCache, init_cache  # noqa: E402
from dsv4_jax.model.compression import CompressorState  # noqa: E402
from dsv4_jax.model.config import CSA, HASH_MOE, HCA, MOE, SLIDING  # noqa: E402
from dsv4_jax.model.spec import Storage, axes_of, field_axes, param, storage_of  # noqa: E402
from dsv4_jax.runtime.demo import DEMO_WEIGHTS  # noqa: E402
from dsv4_jax.weights.params import abstract_model, checkpoint_config, param_table  # noqa: E402
from dsv4_jax.weights.quant_array import QuantArray  # noqa: E402
from released_format import quantise_fp4, quantise_fp8_blocks  # noqa: E402
from workers import run  # noqa: E402
from dsv4_jax.weights.quantization import (  # noqa: E402
    dequantise_fp4, dequantise_fp8)
from dsv4_jax.weights.sharding import (  # noqa: E402
    LOGICAL_AXES, ShardingRules, cache_shardings, logical_sharding, logical_to_spec, target_shardings)

MODEL, FP32, INT32, FP8, FP4 = Storage.MODEL, Storage.FP32, Storage.INT32, Storage.FP8, Storage.FP4
DEVICES = 4
MESH_AXES = ("rows", "cols")
# Expert-parallel experts over the whole mesh, heads and the query rank tensor-parallel; the demo's vocabulary
# (259) splits over nothing, so vocab stays replicated.
LOAD_RULES = dict(experts=MESH_AXES, heads="rows", q_lora="cols", kv="cols", index_heads="rows", o_lora="rows",
                  hc_embed="cols")
CACHE_RULES = dict(batch="rows", kv="cols")

# ----- what every parameter declares (spec §11.1 / §11.2 for the storage) ---------------------------------

_HC = {"fn": (("hc", "hc_embed"), FP32), "base": (("hc",), FP32), "scale": (("hc",), FP32)}
_COMPRESSOR = {"kv_proj.weight": (("kv", "embed"), MODEL), "gate_proj.weight": (("kv", "embed"), MODEL),
               "position_bias": (("ratio", "kv"), FP32), "kv_norm.weight": (("kv",), FP32)}
LAYER = {
    **{f"{hc}_hc.{k}": v for hc in ("attn", "ffn") for k, v in _HC.items()},
    "input_layernorm.weight": (("embed",), FP32),
    "post_attention_layernorm.weight": (("embed",), FP32),
    "self_attn.q_a_proj.weight": (("q_lora", "embed"), FP8),
    "self_attn.q_a_norm.weight": (("q_lora",), FP32),
    "self_attn.q_b_proj.weight": (("heads", "q_lora"), FP8),
    "self_attn.kv_proj.weight": (("kv", "embed"), FP8),
    "self_attn.kv_norm.weight": (("kv",), FP32),
    "self_attn.o_a_proj.weight": (("o_lora", "o_in"), FP8),
    "self_attn.o_b_proj.weight": (("embed", "o_lora"), FP8),
    "self_attn.sinks": (("heads",), FP32),
    **{f"self_attn.compressor.{k}": v for k, v in _COMPRESSOR.items()},
    **{f"self_attn.compressor.indexer.{k}": v for k, v in _COMPRESSOR.items()},
    "self_attn.compressor.indexer.q_b_proj.weight": (("index_heads", "q_lora"), FP8),
    "self_attn.compressor.indexer.scorer.weights_proj.weight": (("index_heads", "embed"), MODEL),
    "mlp.gate.weight": (("router", "embed"), MODEL),
    "mlp.gate.tid2eid": (("token_table", "topk"), INT32),
    "mlp.gate.e_score_correction_bias": (("router",), FP32),
    "mlp.experts.gate_up_proj": (("experts", "expert_gate_up", "embed"), FP4),
    "mlp.experts.down_proj": (("experts", "embed", "expert_mlp"), FP4),
    "mlp.shared_experts.gate_proj.weight": (("mlp", "embed"), FP8),
    "mlp.shared_experts.up_proj.weight": (("mlp", "embed"), FP8),
    "mlp.shared_experts.down_proj.weight": (("embed", "mlp"), FP8),
}
HEAD = {"hc_head.hc_fn": (("hc", "hc_embed"), FP32), "hc_head.hc_base": (("hc",), FP32),
        "hc_head.hc_scale": (("hc",), FP32)}
EXPECTED = {
    "lm_head.weight": (("vocab", "embed"), MODEL),
    "model.embed_tokens.weight": (("vocab", "embed"), MODEL),
    "model.norm.weight": (("embed",), FP32),
    **{f"model.{k}": v for k, v in HEAD.items()},
    **{f"model.layers.N.{k}": v for k, v in LAYER.items()},
    # the MTP block is a sliding-window layer with a learned router
    **{f"model.mtp.N.{k}": v for k, v in {**LAYER, **HEAD}.items() if "compressor" not in k and "tid2eid" not in k},
    "model.mtp.N.e_proj.weight": (("embed", "embed_in"), FP8),
    "model.mtp.N.h_proj.weight": (("embed", "embed_in"), FP8),
    **{f"model.mtp.N.{k}.weight": (("embed",), FP32) for k in ("enorm", "hnorm", "norm")},
}


def every_feature():
    from conftest import tiny

    return tiny(num_hidden_layers=4, layer_types=(SLIDING, CSA, HCA, CSA), mlp_layer_types=(HASH_MOE, MOE, MOE, MOE))


def test_every_parameter_declares_its_axes_and_storage():
    table = param_table(abstract_model(every_feature(), jnp.bfloat16, mtp=True))
    kinds = {}
    for name, var in table.items():
        kinds.setdefault(re.sub(r"\.(layers|mtp)\.\d+\.", r".\1.N.", name), []).append(var)
    assert sorted(kinds) == sorted(EXPECTED)
    for kind, variables in kinds.items():
        axes, storage = EXPECTED[kind]
        for var in variables:
            value = var.get_value()
            assert (axes_of(var), storage_of(var)) == (axes, storage), kind
            assert len(axes) == value.ndim and set(axes) <= set(LOGICAL_AXES), kind
            assert value.dtype == storage.dtype(jnp.bfloat16), kind


def test_storage_dtype_and_declaration_errors():
    assert Storage.FP8.dtype(jnp.float32) == Storage.MODEL.dtype(jnp.float32) == jnp.float32
    assert Storage.FP4.dtype(jnp.bfloat16) == jnp.bfloat16
    assert (Storage.FP32.dtype(jnp.bfloat16), Storage.INT32.dtype()) == (jnp.float32, jnp.int32)
    with pytest.raises(ValueError, match=r"^a parameter stored as FP8 is held in the model dtype; pass it "
                                         r"\(dtype=\.\.\.\)$"):
        Storage.FP8.dtype()
    with pytest.raises(ValueError, match=r"^logical axes \('vocab',\) name 1 dimensions but the value has shape "
                                         r"\(2, 3\)$"):
        param(jnp.zeros((2, 3)), ("vocab",), FP32)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_every_cache_field_declares_its_axes(kv_cache_dtype):
    """With the FP8 cache the ring and the entries are records whose own fields declare the axes."""
    assert field_axes(LayerCache) == {"window_kv": ("batch", "window", "kv"),
                                      "compressed_kv": ("batch", "cache_seq", "kv"),
                                      "index_keys": ("batch", "cache_seq", "kv")}
    assert field_axes(CompressorState) == {"kv": ("batch", "span", "kv"), "gate": ("batch", "span", "kv")}
    held = set()

    def walk(node):
        declared = field_axes(type(node))
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value)
            elif value is not None:
                axes = declared[f.name]
                assert len(axes) == value.ndim and set(axes) <= set(LOGICAL_AXES), f.name
                held.add(f"{type(node).__name__}.{f.name}")

    for layer in init_cache(every_feature(), batch=2, capacity=64, dtype=jnp.float32, kv_cache_dtype=kv_cache_dtype):
        walk(layer)
    rows = ({"LayerCache.window_kv", "LayerCache.compressed_kv"} if kv_cache_dtype == "auto" else
            {f"{kind}.{f}" for kind in ("Fp8Window", "Fp8Entries") for f in ("nope", "rope", "scale")})
    layer = "LayerCache" if kv_cache_dtype == "auto" else "Fp8LayerCache"
    assert held == rows | {f"{layer}.index_keys", "CompressorState.kv", "CompressorState.gate"}


# ----- rules -> specs ---------------------------------------------------------------------------------------

def test_default_rules_split_nothing():
    for var in param_table(abstract_model(every_feature(), jnp.float32, mtp=True)).values():
        assert logical_to_spec(axes_of(var), ShardingRules()) == P(*[None] * var.get_value().ndim)


def test_rules_map_logical_axes_to_mesh_axes():
    rules = ShardingRules(experts=MESH_AXES, embed="rows", mlp="cols")
    assert logical_to_spec(("experts",), rules) == P(("rows", "cols"))
    assert logical_to_spec(("mlp", "embed"), rules) == P("cols", "rows")
    assert logical_to_spec(("vocab", "embed"), rules) == P(None, "rows")
    assert logical_to_spec(("batch", "cache_seq", "kv"), dataclasses.replace(rules, batch="cols")) == \
        P("cols", None, None)


ABSTRACT_MESH = AbstractMesh((2, 2), MESH_AXES)


def _demo_table():
    return param_table(abstract_model(checkpoint_config(DEMO_WEIGHTS), jnp.float32))


@pytest.mark.parametrize("place, message", [
    (lambda: logical_to_spec(("embed", "bogus"), ShardingRules()),
     r"logical axis 'bogus' is not one of ShardingRules' axes: vocab, token_table, embed, .*, cache_seq"),
    (lambda: logical_to_spec(("experts", "mlp", "embed"), ShardingRules(experts=MESH_AXES, mlp="cols")),
     r"ShardingRules put mesh axis 'cols' on two dimensions of logical axes \('experts', 'mlp', 'embed'\) "
     r"\(P\(\('rows', 'cols'\), 'cols', None\)\); a mesh axis can split one dimension only"),
    (lambda: logical_sharding("x", ("embed",), (8,), ABSTRACT_MESH, ShardingRules(embed="tp")),
     r"ShardingRules map 'embed' to mesh axis 'tp', which the mesh \(axes rows, cols\) does not have"),
    (lambda: logical_sharding("x", ("embed",), (9,), ABSTRACT_MESH, ShardingRules(embed="rows")),
     r"x \(9,\): its 'embed' dimension of 9 does not split evenly over mesh axes \('rows',\) \(2 parts\)"),
    (lambda: logical_sharding("x", ("vocab",), (9,), ABSTRACT_MESH, ShardingRules(vocab="rows")),
     r"x \(9,\) would be placed as \(10,\); expected a layout that keeps its shape"),
    (lambda: target_shardings(_demo_table(), mesh=ABSTRACT_MESH, rules={"embed": "rows"}),
     r"rules must be a ShardingRules, got dict"),
    (lambda: target_shardings(_demo_table(), rules=ShardingRules()),
     r"give either sharding, or mesh with optional rules \(a ShardingRules\)"),
])
def test_placement_errors_are_one_line(place, message):
    with pytest.raises(ValueError, match=f"^{message}$") as e:
        place()
    assert "\n" not in str(e.value)


# ----- a sharded load on 4 fake CPU devices -----------------------------------------------------------------

def shard_report(array) -> dict:
    return {"spec": repr(array.sharding.spec), "shards": sorted(list(s.data.shape) for s in array.addressable_shards)}


def sharded_load(out: str):
    """Subprocess body (4 fake CPU devices): load the demo checkpoint onto a 2 x 2 mesh by LOAD_RULES and place
    an empty cache by CACHE_RULES; report shardings, save the loaded arrays."""
    assert len(jax.devices()) == DEVICES, jax.devices()
    mesh = jax.make_mesh((2, 2), MESH_AXES)
    model = dsv4_jax.from_pretrained(DEMO_WEIGHTS, "float32", mesh=mesh, rules=ShardingRules(**LOAD_RULES))
    arrays = {name: var.get_value() for name, var in param_table(model).items()}
    report = {"params": {name: shard_report(a) for name, a in arrays.items()}}
    np.savez(Path(out) / "arrays.npz", **{name: np.asarray(a) for name, a in arrays.items()})
    cache = init_cache(model.config, batch=2, capacity=64, dtype=jnp.float32)
    placed = jax.device_put(cache, cache_shardings(cache, mesh, ShardingRules(**CACHE_RULES)))
    report["cache"] = {jax.tree_util.keystr(path): shard_report(a)
                       for path, a in jax.tree_util.tree_flatten_with_path(placed)[0]}
    (Path(out) / "report.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def sharded_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    run([str(HERE / "test_sharding.py"), "sharded", str(out)], DEVICES)
    return out


def expected_shard(shape, spec: P) -> list[int]:
    parts = [1 if entry is None else 2 if isinstance(entry, str) else DEVICES for entry in spec]
    return [size // n for size, n in zip(shape, parts)]


def test_sharded_load_equals_single_device_load(sharded_out):
    report = json.loads((sharded_out / "report.json").read_text())["params"]
    table = param_table(dsv4_jax.from_pretrained(DEMO_WEIGHTS, "float32"))
    assert sorted(report) == sorted(table)
    split = 0
    with np.load(sharded_out / "arrays.npz") as loaded:
        for name, var in table.items():
            want = np.asarray(var.get_value())
            spec = P(*(LOAD_RULES.get(a) for a in axes_of(var)))
            assert report[name] == {"spec": repr(spec), "shards": [expected_shard(want.shape, spec)] * DEVICES}, name
            got = loaded[name]
            assert (got.dtype, got.shape) == (want.dtype, want.shape) and got.tobytes() == want.tobytes(), name
            split += any(entry is not None for entry in spec)
    assert split > len(table) // 2, f"only {split} of {len(table)} arrays were split"


def test_cache_placed_by_its_field_axes(sharded_out):
    report = json.loads((sharded_out / "report.json").read_text())["cache"]
    cache = init_cache(checkpoint_config(DEMO_WEIGHTS), batch=2, capacity=64, dtype=jnp.float32)
    leaves = jax.tree_util.tree_flatten_with_path(cache)[0]
    assert sorted(report) == sorted(jax.tree_util.keystr(path) for path, _ in leaves)
    for path, a in leaves:
        owner = LayerCache if len(path) == 2 else CompressorState  # (layer, field) or (layer, state, field)
        spec = P(*(CACHE_RULES.get(ax) for ax in field_axes(owner)[path[-1].name]))
        assert report[jax.tree_util.keystr(path)] == {"spec": repr(spec),
                                                      "shards": [expected_shard(a.shape, spec)] * DEVICES}, path


# ----- QuantArray -------------------------------------------------------------------------------------------

def bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a)).view(np.uint8)


def fp8_parts(rng, shape):
    codes = rng.integers(0, 256, shape, np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # e4m3fn's NaN codes
    scale_shape = (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    return codes.view(ml_dtypes.float8_e4m3fn), rng.integers(110, 140, scale_shape, np.uint8).view(
        ml_dtypes.float8_e8m0fnu)


def fp4_parts(rng, shape):
    packed = rng.integers(0, 256, (*shape[:-1], shape[-1] // 2), np.uint8).view(np.int8)
    return packed, rng.integers(110, 140, (*shape[:-1], shape[-1] // 32), np.uint8).view(ml_dtypes.float8_e8m0fnu)


@pytest.mark.parametrize("shape", [(300, 200), (2, 300, 200)])  # ragged 128-blocks; stacked experts
def test_fp8_quant_array_dequantizes_as_quantization_does(shape):
    codes, scales = fp8_parts(np.random.default_rng(0), shape)
    q = QuantArray.fp8(codes, scales)
    assert (q.shape, q.block, q.packed, len(jax.tree.leaves(q))) == (shape, (128, 128), False, 2)
    want = dequantise_fp8(codes, scales)
    np.testing.assert_array_equal(bits(q.dequantize()), bits(want))
    np.testing.assert_array_equal(bits(jax.jit(lambda q: q.dequantize())(q)), bits(want))
    np.testing.assert_array_equal(bits(q.dequantize(jnp.bfloat16)), bits(want.astype(ml_dtypes.bfloat16)))


@pytest.mark.parametrize("shape", [(6, 96), (3, 6, 96)])
def test_fp4_quant_array_dequantizes_as_quantization_does(shape):
    packed, scales = fp4_parts(np.random.default_rng(1), shape)
    q = QuantArray.fp4(packed, scales)
    assert (q.shape, q.block, q.packed, len(jax.tree.leaves(q))) == (shape, (1, 32), True, 2)
    want = dequantise_fp4(packed, scales)
    np.testing.assert_array_equal(bits(q.dequantize()), bits(want))  # bitwise: -0 keeps its sign
    np.testing.assert_array_equal(bits(jax.jit(lambda q: q.dequantize())(q)), bits(want))


def test_quantised_weights_round_trip_through_quant_array():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((300, 200)) * 10.0 ** rng.uniform(-3, 3, (300, 1))).astype(np.float32)
    for make, quantise, dequantise in ((QuantArray.fp8, quantise_fp8_blocks, dequantise_fp8),
                                       (QuantArray.fp4, quantise_fp4, dequantise_fp4)):
        values, scales = quantise(w[:, :192])
        q = make(values, scales)
        np.testing.assert_array_equal(bits(q.values), bits(values))
        np.testing.assert_array_equal(bits(q.scales), bits(scales))
        np.testing.assert_array_equal(bits(q.dequantize()), bits(dequantise(values, scales)))


def test_quant_array_is_a_parameter_value():
    packed, scales = fp4_parts(np.random.default_rng(3), (4, 6, 64))

    class Experts(nnx.Module):
        def __init__(self):
            self.down_proj = nnx.Param(QuantArray.fp4(packed, scales), axes=("experts", "embed", "mlp"), storage=FP4)

    model = Experts()
    graphdef, state = nnx.split(model)
    assert [a.dtype for a in jax.tree.leaves(state)] == [np.int8, ml_dtypes.float8_e8m0fnu]
    restored = nnx.merge(graphdef, state)
    assert (axes_of(restored.down_proj), storage_of(restored.down_proj)) == (("experts", "embed", "mlp"), FP4)
    got = jax.jit(lambda m: m.down_proj.get_value().dequantize())(restored)
    np.testing.assert_array_equal(bits(got), bits(dequantise_fp4(packed, scales)))


@pytest.mark.parametrize("make, message", [
    (lambda: QuantArray.fp8(np.zeros((3, 4), np.int8), np.zeros((1, 1), np.float32)),
     r"FP8 values must be float8_e4m3fn \[\.\.\., out, in\], got int8 \(3, 4\)"),
    (lambda: QuantArray.fp8(np.zeros((300, 200), ml_dtypes.float8_e4m3fn), np.zeros((1, 1), np.float32)),
     r"FP8 scales have shape \(1, 1\) but values \(300, 200\) need \(3, 2\)"),
    (lambda: QuantArray.fp4(np.zeros((6, 48), np.uint8), np.zeros((6, 3), np.float32)),
     r"packed FP4 values must be int8 \[\.\.\., out, in\], got uint8 \(6, 48\)"),
    (lambda: QuantArray.fp4(np.zeros((6, 48), np.int8), np.zeros((6, 2), np.float32)),
     r"FP4 scales have shape \(6, 2\) but values \(6, 48\) need \(6, 3\)"),
])
def test_quant_array_bad_input(make, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        make()


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"sharded": sharded_load}[mode](*rest)
