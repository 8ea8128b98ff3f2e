"""The memory planner (dsv4_jax/runtime/plan.py, ``python -m dsv4_jax.plan``).

Its weight and cache bytes per device equal, key for key, what a real placement puts on each of 8 fake CPU
devices: a bf16 model with every layer type and the MTP block, placed by ``runtime.mesh.place_weights``, and
its caches made in place by ``init_cache`` under ``cache_shardings``; the same model in released precision
(FP8 / FP4 codes and scales) where the layout splits no quantisation block (dp 8 with ep), and a layout that
would is an error. Fake devices must be configured before
JAX starts and conftest.py imports JAX first, so that part runs this file as a script in a subprocess
(``python tests/test_plan.py placed OUT``), as tests/test_sharding.py does. The released-precision weights of
the whole of Flash match the released checkpoint's size; the command line prints a table or one error line.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from workers import run  # noqa: E402
import jax  # noqa: E402  (conftest.py, or the parent's environment for the subprocess, picks the CPU)
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from dsv4_jax.model.cache import init_cache  # noqa: E402
from dsv4_jax.model.config import CSA, HASH_MOE, HCA, MOE, SLIDING, DeepseekV4Config  # noqa: E402
from dsv4_jax.model.kv_rows import KV_CACHE_DTYPES  # noqa: E402
from dsv4_jax.model.mtp import DeepseekV4WithMTP, mtp_config  # noqa: E402
from dsv4_jax.plan import main  # noqa: E402
from dsv4_jax.runtime.mesh import make_mesh, place_weights  # noqa: E402
from dsv4_jax.model.transformer import InputError  # noqa: E402
from dsv4_jax.runtime.plan import (  # noqa: E402
    ACTIVATIONS, CACHES, RELEASED_LABELS, WEIGHTS, cache_bytes_per_token, plan, weight_kind)
from dsv4_jax.weights.params import param_table  # noqa: E402
from dsv4_jax.weights.quant_array import QuantArray  # noqa: E402
from dsv4_jax.weights.random_init import released_model  # noqa: E402
from dsv4_jax.weights.sharding import cache_shardings  # noqa: E402

DEVICES = 8
# (tp, dp, ep) as the layouts name them
LAYOUTS = {"tp2": (2, 1, False), "tp2_dp2_ep": (2, 2, True), "dp8_ep": (1, 8, True)}
BATCH, CAPACITY = 3, 64  # 3 rows: padded to 4 under dp 2, to 8 under dp 8
# DeepSeek-V4-Flash as released: 159.6 GB in 46 safetensors shards, the MTP block included (the official
# repository's file sizes; the project's reference notes on scaling, section 1).
FLASH_RELEASED_BYTES = 159.6e9


def every_layer_type() -> DeepseekV4Config:
    """Sliding, CSA and HCA attention, hash and learned routing; a vocabulary tp 2 pads (259 rows)."""
    from conftest import tiny

    return tiny(num_hidden_layers=4, layer_types=(SLIDING, CSA, HCA, CSA), mlp_layer_types=(HASH_MOE, MOE, MOE, MOE),
                vocab_size=259)


def device_bytes(keyed_arrays) -> dict[str, dict[str, int]]:
    """[(key, array)] -> {device id: {key: the bytes of that device's shards}} (JSON keys: strings)."""
    out = {}
    for key, array in keyed_arrays:
        for shard in array.addressable_shards:
            held = out.setdefault(str(shard.device.id), {})
            held[key] = held.get(key, 0) + shard.data.nbytes
    return out


def dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def placed(out: str):
    """Subprocess body (8 fake CPU devices): place a bf16 model and its caches for every layout; write each
    device's bytes by (weight kind, dtype) and by (cache field, dtype)."""
    assert len(jax.devices()) == DEVICES, jax.devices()
    cfg = every_layer_type()
    model = DeepseekV4WithMTP(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    names = [dotted(path) for path, _ in jax.tree_util.tree_flatten_with_path(
        nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]]
    assert sorted(names) == sorted(param_table(model))
    report = {}
    for name, (tp, dp, ep) in LAYOUTS.items():
        mesh = make_mesh(tp=tp, dp=dp, ep=ep, cfg=cfg)
        _, _, weights = place_weights(model, mesh)
        report[name] = {WEIGHTS: device_bytes((f"{weight_kind(n)}|{w.dtype.name}", w) for n, w in zip(names, weights))}
        for kv in KV_CACHE_DTYPES:
            init = functools.partial(init_cache, mtp_config(cfg), mesh.rows(BATCH), CAPACITY, jnp.bfloat16, kv)
            cache = jax.jit(init, out_shardings=cache_shardings(jax.eval_shape(init), mesh.mesh, mesh.rules))()
            report[name][f"{CACHES}|{kv}"] = device_bytes((f"{dotted(path[1:])}|{a.dtype.name}", a)
                                                          for path, a in jax.tree_util.tree_flatten_with_path(cache)[0])
    # released precision: the experts whole over 8 devices, every quantised weight otherwise replicated
    released = released_model(cfg, jnp.bfloat16, mtp=True)
    leaf_keys = [f"{weight_kind(n)}|{RELEASED_LABELS[v.block] if isinstance(v, QuantArray) else v.dtype.name}"
                 for n, var in param_table(released).items() for v in [var.get_value()] for _ in jax.tree.leaves(v)]
    _, _, weights = place_weights(released, make_mesh(dp=8, ep=True, cfg=cfg))
    report["released_dp8_ep"] = {WEIGHTS: device_bytes(zip(leaf_keys, weights, strict=True))}
    (Path(out) / "report.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def placed_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("placed")
    run([str(HERE / "test_plan.py"), "placed", str(out)], DEVICES)
    return json.loads((out / "report.json").read_text())


DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32", "int32": "int32", "fp8 e4m3": "float8_e4m3fn", "ue8m0": "uint8"}


@pytest.mark.parametrize("layout, kv_cache_dtype", [(layout, kv) for layout in LAYOUTS for kv in KV_CACHE_DTYPES]
                         + [("released_dp8_ep", "auto")])
def test_plan_equals_the_bytes_placed_on_each_device(placed_report, layout, kv_cache_dtype):
    precision = "released" if layout.startswith("released") else "bf16"
    tp, dp, ep = LAYOUTS[layout.removeprefix("released_")]
    p = plan(every_layer_type(), tp, dp, ep=ep, capacity=CAPACITY, batch=BATCH, precision=precision, mtp=True,
             kv_cache_dtype=kv_cache_dtype)
    for section, placed_as in ((WEIGHTS, WEIGHTS), (CACHES, f"{CACHES}|{kv_cache_dtype}")):
        if placed_as not in placed_report[layout]:  # the released model's placement: its weights only
            continue
        want = {f"{r.name}|{DTYPE_NAMES.get(r.held_as, r.held_as)}": r.nbytes for r in p.rows if r.section == section}
        got = placed_report[layout][placed_as]
        assert sorted(got) == [str(d) for d in range(tp * dp)], section  # the first tp x dp devices, no others
        for device, held in got.items():
            assert held == want, (section, device)


def test_released_flash_weights_match_the_released_checkpoint():
    p = plan(DeepseekV4Config.flash(), capacity=1, batch=1, precision="released", mtp=True)
    weights = p.total(WEIGHTS)
    assert abs(weights / FLASH_RELEASED_BYTES - 1) < 0.05, weights
    held = {r.held_as for r in p.rows if r.section == WEIGHTS}
    assert held == {"bf16", "fp32", "int32", "fp8 e4m3 + scales", "fp4 e2m1 + scales"}


def test_released_split_through_a_quantisation_block_is_an_error():
    # tp 2 splits a routed expert's 32 columns (one 32-wide FP4 block) in two
    with pytest.raises(InputError, match=r"experts\.down_proj \(8, 64, 32\): its 'expert_mlp' dimension of 32 "
                                         r"split into 2 parts cuts its 32-wide quantisation blocks"):
        plan(every_layer_type(), 2, 1, capacity=CAPACITY, batch=BATCH, precision="released")


def test_pipeline_stage_holds_its_layers():
    cfg = DeepseekV4Config.flash()
    whole, staged = (plan(cfg, pp=pp, capacity=4096, batch=2) for pp in (1, 2))

    def of(p, section, name):
        return sum(r.nbytes for r in p.rows if (r.section, r.name) == (section, name))

    # stages of 22 and 21 layers: the first holds 22 of the 43 layers' experts, whole embedding and head
    assert (staged.stage, staged.layers) == (0, range(0, 22))
    assert of(staged, WEIGHTS, "routed experts") * 43 == of(whole, WEIGHTS, "routed experts") * 22
    assert of(staged, WEIGHTS, "embedding + head") == of(whole, WEIGHTS, "embedding + head")
    assert of(staged, CACHES, "window_kv") * 43 == of(whole, CACHES, "window_kv") * 22
    assert staged.total(ACTIVATIONS) == whole.total(ACTIVATIONS)
    # the MTP block and its cache (speculative decoding) sit whole on every stage, as the head does
    whole_mtp, staged_mtp = (plan(cfg, pp=pp, capacity=4096, batch=2, mtp=True) for pp in (1, 2))
    assert of(staged_mtp, WEIGHTS, "MTP block") == of(whole_mtp, WEIGHTS, "MTP block") > 0
    assert (of(staged_mtp, CACHES, "window_kv") - of(staged, CACHES, "window_kv")
            == of(whole_mtp, CACHES, "window_kv") - of(whole, CACHES, "window_kv") > 0)


def test_cache_bytes_per_token_of_flash():
    """A Flash sequence's caches grow per token by the compressed entries of its 21 CSA layers (m 4, with 128
    indexer channels) and 20 HCA layers (m 128), and the MTP block's none (sliding window only): 512 bf16
    channels an entry, or the FP8 record's 448 e4m3 + 64 bf16 + 7 scale bytes."""
    cfg = DeepseekV4Config.flash()
    csa, hca = cfg.layer_types.count(CSA), cfg.layer_types.count(HCA)
    assert (csa, hca) == (21, 20)
    for entry in (512 * 2, 448 + 64 * 2 + 7):
        want = csa * (entry + 128 * 2) / 4 + hca * entry / 128
        kv = "auto" if entry == 1024 else "fp8"
        assert cache_bytes_per_token(cfg, kv) == cache_bytes_per_token(cfg, kv, mtp=True) == want
    assert cache_bytes_per_token(cfg, "fp8") == 4495.84375 and cache_bytes_per_token(cfg) == 6880


def test_cli_prints_the_table(capsys):
    assert main(["--config", "flash", "--tp", "8", "--ep", "--capacity", "131072", "--batch", "32"]) == 0
    out = capsys.readouterr().out
    for line in ("weights", "  routed experts", "  shared expert", "  embedding + head", "caches", "  compressed_kv",
                 "activations (estimate)", "total", "fits in 141.00 GB: ",
                 "caches per token of a sequence (all layers, before sharding): 6,880.0 bytes"):
        assert f"\n{line}" in out, line
    assert main(["--config", "flash", "--capacity", "4096", "--batch", "1", "--kv-cache-dtype", "fp8"]) == 0
    out = capsys.readouterr().out
    for line in ("  window_kv.nope                fp8 e4m3", "  compressed_kv.scale           ue8m0",
                 "caches per token of a sequence (all layers, before sharding): 4,495.8 bytes"):
        assert f"\n{line}" in out, line


@pytest.mark.parametrize("args, message", [
    (["--tp", "3"], r"--tp 3 does not divide the model's 64 query heads"),
    (["--dp", "3", "--ep"], r"the expert-parallel size --dp x --tp = 3 does not divide the model's 256 routed "
                            r"experts"),
    (["--pp", "44"], r"--pp 44 is larger than the number of layers \(43\); every stage needs a layer"),
    (["--capacity", "0"], r"--capacity 0 must be a positive integer"),
    (["--gpu-memory", "12XB"], r"--gpu-memory '12XB' must be a positive size such as 141GB, 139GiB or 80e9 \(bytes\)"),
    (["--precision", "fp8"], r"argument --precision: invalid choice: 'fp8'"),
    (["--kv-cache-dtype", "fp16"], r"argument --kv-cache-dtype: invalid choice: 'fp16'"),
    (["--config", "nowhere"], r"--config 'nowhere' is not flash, pro, a config.json or a checkpoint directory"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    base = {"--config": "flash", "--capacity": "4096", "--batch": "1"}
    for flag in args[::2]:
        base.pop(flag, None)
    assert main([*args, *(x for kv in base.items() for x in kv)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert __import__("re").search(message, err), err


def test_bad_layout_exit_code_from_the_shell():
    proc = subprocess.run([sys.executable, "-m", "dsv4_jax.plan", "--config", "flash", "--tp", "3", "--capacity",
                           "4096", "--batch", "1"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr == "error: --tp 3 does not divide the model's 64 query heads\n"


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"placed": placed}[mode](*rest)
