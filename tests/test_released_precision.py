"""Weights kept in released precision (FP8 linears, FP4 routed experts as QuantArrays, dequantised inside the
step) against the same weights dequantised at load (weights/params.py ``dequantized``).

A model with every layer type (sliding, CSA, HCA; hash and learned routing), its FP8 blocks ragged (width 160:
128 + 32 columns), built in released precision by ``random_init.released_model`` (the values make_checkpoint.py
writes). The XLA path dequantises exactly (a 3- or 1-bit mantissa times a power of two), so in fp32 and in bf16
every layer's residual streams and the logits equal the dequantised model's bit for bit, and the engine's greedy
tokens too. The Pallas path (interpret mode on the CPU) streams the FP8 bytes through
kernels_pallas/fp8_linear.py, accumulating in another order: its bf16 decode logits agree with the
dequantised model's (same kernels otherwise) within BF16_BOUND. On a mesh of fake CPU devices (tp 2; dp 2 x tp 2 with expert
parallelism; 2 pipeline stages x tp 2) the released model's fp32 prefill logits equal one device's within
1e-5 and its greedy tokens are equal; run as a subprocess (``python tests/test_released_precision.py mesh
OUT``), since the fake device count is fixed when JAX starts.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import jax  # noqa: E402  (conftest.py, or the parent's environment for the subprocess, picks the CPU)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import tiny  # noqa: E402
from workers import run  # noqa: E402
from dsv4_jax import Engine  # noqa: E402
from dsv4_jax.model.config import CSA, HASH_MOE, HCA, MOE, SLIDING  # noqa: E402
from dsv4_jax.model.introspect import trace_forward  # noqa: E402
from dsv4_jax.model.spec import Storage, storage_of  # noqa: E402
from dsv4_jax.weights.params import dequantized, is_released, param_table  # noqa: E402
from dsv4_jax.weights.quant_array import QuantArray  # noqa: E402
from dsv4_jax.weights.random_init import released_model  # noqa: E402

CFG = tiny(hidden_size=160, num_hidden_layers=4, layer_types=(SLIDING, CSA, HCA, CSA),
           mlp_layer_types=(HASH_MOE, MOE, MOE, MOE))
# Widths that split into whole quantisation blocks over tp 2 (128-row FP8 blocks per head shard, output-group
# shard, indexer-head shard and shared-expert shard; 32-column FP4 blocks per routed-expert shard) and that the
# Pallas expert kernels take (multiples of their blocks).
MESH_CFG = tiny(hidden_size=256, head_dim=64, o_lora_rank=128, index_head_dim=32, moe_intermediate_size=256,
                num_hidden_layers=4, layer_types=(SLIDING, CSA, HCA, CSA), mlp_layer_types=(HASH_MOE, MOE, MOE, MOE))
MESHES = {"tp2": dict(tp=2), "dp2_tp2_ep": dict(dp=2, tp=2, ep=True), "pp2_tp2": dict(pp=2, tp=2)}
PROMPTS = ([3, 17, 42, 9, 120, 8, 1, 2, 77, 5, 6, 200, 31, 4, 99, 13, 249, 64, 12, 7, 8, 9, 10, 11, 30],
           [5, 9, 2], [100, 101, 7, 45, 23, 11, 150, 3, 3, 4, 5, 66, 7, 8, 9, 90, 80])
NEW_TOKENS = 5
# bf16 decode, the FP8 kernel against XLA's dot on the dequantised weights: both round every linear's fp32 sum
# to bf16, in different summation orders, so an output may differ by a bf16 ulp (2^-8 relative) per linear,
# compounding over the layers; measured 0.19% of the largest logit here (docs/testing.md: 10 x the measured).
BF16_BOUND = 2e-2


@functools.cache
def released_and_dequantised(dtype: str):
    model = released_model(CFG, jnp.dtype(dtype), seed=3)
    return model, dequantized(model)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def pair(request):
    return released_and_dequantised(request.param)


def test_the_model_holds_the_released_formats(pair):
    released, plain = pair
    assert is_released(released) and not is_released(plain)
    for name, var in param_table(released).items():
        value = var.get_value()
        assert isinstance(value, QuantArray) == (storage_of(var) in (Storage.FP8, Storage.FP4)), name
        if isinstance(value, QuantArray):
            assert value.values.dtype == (jnp.int8 if storage_of(var) is Storage.FP4 else jnp.float8_e4m3fn), name
            assert value.scales.dtype == jnp.float8_e8m0fnu, name
            assert param_table(plain)[name].get_value().dtype == released.dtype, name


def test_every_layer_and_the_logits_equal_the_dequantised_model(pair):
    released, plain = pair
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 29))
    got, want = trace_forward(released, ids), trace_forward(plain, ids)
    for i, (g, w) in enumerate(zip(got.layers, want.layers, strict=True)):
        np.testing.assert_array_equal(g.streams, w.streams, err_msg=f"layer {i}")
    np.testing.assert_array_equal(got.logits, want.logits)


def test_engine_greedy_tokens_equal_the_dequantised_model():
    released, plain = released_and_dequantised("float32")  # bf16: every layer is compared above
    tokens = [[r.tokens for r in Engine(m, capacity=48, kernels="xla").generate(PROMPTS, NEW_TOKENS)]
              for m in (released, plain)]
    assert tokens[0] == tokens[1]


def test_pallas_fp8_and_fp4_kernels_decode_within_the_bf16_bound(monkeypatch):
    """bf16, kernels="pallas": the decode steps' FP8 linears go through kernels_pallas/fp8_linear.py and the
    routed experts through the FP4 path of grouped_gemv, the dequantised model's through XLA's dot and the
    bf16 path of the same kernel; every other kernel is the same on both sides."""
    from dsv4_jax.ops import dense, moe
    from test_kernels_in_model import decode_logits

    calls, fp4_calls = [], []
    real, real_gemv = dense.fp8_linear, moe.grouped_gemv
    monkeypatch.setattr(dense, "fp8_linear", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    monkeypatch.setattr(moe, "grouped_gemv", lambda *a, **k: (k.get("w_scales") is not None and fp4_calls.append(1))
                        or real_gemv(*a, **k))
    released = released_model(MESH_CFG, jnp.bfloat16, seed=3)  # widths the expert kernels take
    rng = np.random.RandomState(4)
    prompt, steps = rng.randint(0, MESH_CFG.vocab_size, (2, 21)), rng.randint(0, MESH_CFG.vocab_size, (2, 3))
    got = decode_logits(released, prompt, steps, 32, "pallas")
    want = decode_logits(dequantized(released), prompt, steps, 32, "pallas")  # the same kernels but FP8's
    o_a = (MESH_CFG.o_groups * MESH_CFG.o_lora_rank,
           MESH_CFG.num_attention_heads * MESH_CFG.head_dim // MESH_CFG.o_groups)
    assert calls and o_a in calls, f"the FP8 kernel did not run on every linear, the grouped o_a included: {calls}"
    assert fp4_calls, "the FP4 expert kernel did not run"
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= BF16_BOUND * np.abs(want).max()


def test_orbax_save_and_training_ask_for_plain_weights(tmp_path):
    from dsv4_jax.train.trainer import TrainConfig, init_state, make_optimizer
    from dsv4_jax.weights import orbax

    released, _ = released_and_dequantised("float32")
    with pytest.raises(ValueError, match=r"^an orbax checkpoint holds plain arrays, not released FP8 / FP4 weights"):
        orbax.save(released, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(ValueError, match=r"^training needs plain weights, not released FP8 / FP4 ones"):
        init_state(released, make_optimizer(TrainConfig(steps=1)))


def mesh(out: str):
    """Subprocess body (8 fake CPU devices): the released model on every layout of MESHES against one device."""
    from dsv4_jax.runtime.mesh import make_mesh

    jax.config.update("jax_default_matmul_precision", "highest")
    model = released_model(MESH_CFG, jnp.float32, seed=7)

    def run_layout(mesh=None):
        engine = Engine(model, capacity=32, kernels="xla", mesh=mesh)
        last_logits = np.asarray(engine.prefill(PROMPTS)[0])[:len(PROMPTS)]
        return [r.tokens for r in engine.generate(PROMPTS, NEW_TOKENS)], last_logits

    tokens, logits = run_layout()
    report = {}
    for name, kw in MESHES.items():
        got_tokens, got_logits = run_layout(make_mesh(cfg=MESH_CFG, **kw))
        report[name] = {"tokens_equal": got_tokens == tokens,
                        "logits_rel": float(np.abs(got_logits - logits).max() / np.abs(logits).max())}
    (Path(out) / "report.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def mesh_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("released_mesh")
    run([str(HERE / "test_released_precision.py"), "mesh", str(out)], 8)
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("layout", MESHES)
def test_sharded_released_model_equals_one_device(mesh_report, layout):
    assert mesh_report[layout]["tokens_equal"]
    assert mesh_report[layout]["logits_rel"] <= 1e-5


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"mesh": mesh}[mode](*rest)
