"""The model's jitted steps compiled by XLA for an H100 on a CPU-only host (a compile-only device; needs the
``aot`` extra's CUDA plugin), to check what XLA's GPU pipeline makes of them: its fusion decisions differ from
the CPU's, and a bad one costs minutes of compile or recomputes work in every element."""

from __future__ import annotations

import json
import re
from unittest import mock

import jax.numpy as jnp
import pytest

from conftest import tiny
from kernels_pallas.testing import cuda_plugin_installed, h100_compile_only_sharding
from scripts.bench_generate import make_config
from scripts.compile_for_h100 import (KERNELS, collectives, compiled_sharded_hlo, compiled_step_hlo, h100_model_mesh,
                                      parse_layout, triton_kernels)

pytestmark = pytest.mark.skipif(not cuda_plugin_installed(), reason="needs JAX's CUDA plugin (pip install -e '.[aot]')")


def fused_computations(hlo: str) -> list[tuple[str, str]]:
    """Optimized HLO text -> (root shape, body) of each fused computation."""
    return [(re.search(r"ROOT \S+ = (\S+)", body).group(1), body)
            for body in re.findall(r"^%[\w.-]+ \([^\n]*\{\n(.*?)^\}", hlo, re.M | re.S)]


def step_hlo(cfg, T: int, kernels: str) -> str:
    """The fp32 chunk step of 2 rows x T tokens, capacity 32, as XLA optimizes it for an H100."""
    return compiled_step_hlo(cfg, jnp.float32, 2, T, 32, kernels, h100_compile_only_sharding())[0]


def test_decode_step_computes_each_sinkhorn_once():
    """Each sub-block's Sinkhorn (2 x iters divides of [..., n, n]) is a fusion of its own that writes the
    [..., n, n] matrix, not part of ``expand``'s elementwise fusion that writes the [..., n, d] streams, which
    recomputed it for every element: there the Flash-width slice's XLA decode step compiled for 162 s (31 s
    with the barrier that ends ``hc_weights``)."""
    cfg = tiny()
    n = cfg.hc_mult
    sinkhorn_divides = re.compile(rf"= f32\[[\d,]*{n},{n}\]\S* divide\(")
    roots = [root for root, body in fused_computations(step_hlo(cfg, 1, "xla"))
             if len(sinkhorn_divides.findall(body)) >= 2 * cfg.hc_sinkhorn_iters - 1]
    assert len(roots) == 2 * cfg.num_hidden_layers, roots  # one per sub-block
    assert all(re.match(rf"f32\[[\d,]*{n},{n}\]", root) for root in roots), roots


@pytest.mark.parametrize("T", [1, 8])
def test_pallas_steps_compile_for_h100(T):
    """The kernels path of a decode step (T=1) and of a prefill chunk compiles whole for an H100, each
    attention-path Pallas kernel in it a Triton custom call (the fp32 model's experts keep the XLA path): the
    kernels lower for Triton inside the model's step, and XLA's GPU pipeline takes the program around them."""
    stage = "decode" if T == 1 else "prefill"
    kernels = triton_kernels(step_hlo(tiny(), T, "pallas"))
    assert kernels == attention_kernels(stage), sorted(kernels)


def attention_kernels(stage: str) -> set[str]:
    """The attention path's Triton kernels of a decode step or a prefill chunk."""
    return {f"dsv4_compress_{stage}", "dsv4_hc_pre", f"dsv4_indexer_{stage}", "dsv4_sparse_attn", "dsv4_topk_select"}


# The 8-layer Flash-width slice (all 256 experts) the sharded steps compile for 8 H100s; 8 rows.
FLASH_LAYERS = "SWA,CSA,HCA,SWA,CSA,HCA,CSA,HCA"


@pytest.mark.parametrize("layout, T, kernels", [
    ("tp=8", 1, "pallas"),
    ("tp=8", 16, "pallas"),
    ("dp=8,ep", 1, "pallas"),
    # 16 x 8 rows x 6 picks over 8 devices: 96 expected a device, 3 per expert, the Triton grouped_gemv
    ("dp=8,ep", 16, "pallas"),
    ("pp=8", 1, "pallas"),
    ("pp=8", 16, "pallas"),
    ("pp=4,tp=2,ep", 1, "pallas"),
    ("pp=4,tp=2,ep", 16, "pallas"),
])
def test_sharded_steps_compile_for_8_h100s(layout, T, kernels):
    """The sharded engine's decode step (T=1) and a 16-token prefill chunk of an 8-layer Flash-width slice
    compile for 8 compile-only H100s, every Pallas kernel inside the shard_map a Triton custom call, with the
    collectives of the layout: tensor parallel sums its partial results (all-reduce) and gathers the
    vocabulary's logits; expert parallel gathers every data-parallel shard's tokens and reduce-scatters each MoE
    layer's experts' outputs back (one per layer), with nothing to all-reduce. Prints the compile seconds (the
    issue asks for under 2 minutes each on the CI machine; docs/performance.md has them)."""
    cfg = make_config("flash-slice", FLASH_LAYERS, None)
    mesh = h100_model_mesh(cfg, parse_layout(layout))
    hlo, seconds = compiled_sharded_hlo(cfg, jnp.bfloat16, mesh, 8, T, 4096, KERNELS[kernels])
    found = collectives(hlo)
    print(json.dumps({"mesh": layout, "tokens": T, "kernels": kernels, "compile_s": round(seconds, 1),
                      "collectives": found}))
    moe_layers = len(cfg.mlp_layer_types)  # every layer's MLP is a MoE (hash-routed or learned)
    if mesh.tp > 1:
        assert found.get("all-reduce", 0) > 0 and found.get("all-gather", 0) > 0, found
    if mesh.ep and mesh.dp > 1:
        assert found.get("reduce-scatter") == moe_layers and found.get("all-gather", 0) >= moe_layers, found
    if mesh.tp == 1 and mesh.pp == 1:
        assert "all-reduce" not in found, found
    if mesh.pp > 1:  # streams hop stage to stage; the last stage's reach every stage (an all-reduce over pp)
        assert found.get("collective-permute", 0) > 0 and found.get("all-reduce", 0) > 0, found
    # A pipeline splits a device's 8 / dp rows into min(pp, rows) microbatches: a decode microbatch of one token
    # takes the one-token experts kernel, unless the experts are spread (each device sees others' tokens too).
    rows = 8 // mesh.dp
    tokens_at_once = T * rows // (min(mesh.pp, rows) if mesh.pp > 1 else 1)
    one_token = tokens_at_once == 1 and not (mesh.ep and mesh.dp * mesh.tp > 1)
    experts = (set() if kernels == "pallas-xla-experts" else
               {"dsv4_expert_rows"} if one_token else {"dsv4_grouped_gemv"})
    kernels_found = triton_kernels(hlo)
    assert kernels_found == attention_kernels("decode" if T == 1 else "prefill") | experts, sorted(kernels_found)


def test_compile_for_h100_cli(tmp_path, capsys):
    """The script's one JSON line per step, with the step's optimized HLO written where asked (its Pallas
    kernels as Triton custom calls); without a CUDA plugin, a one-line error and exit code 2."""
    from scripts import compile_for_h100

    assert compile_for_h100.main(["--model", "demo", "--tokens", "1", "--kernels", "pallas",
                                  "--hlo-dir", str(tmp_path)]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["step"] == "demo_pallas_b1_t1" and row["compile_s"] > 0 and row["fusions"] > 0
    hlo = (tmp_path / "demo_pallas_b1_t1.hlo").read_text()
    assert hlo.count("\n") == row["hlo_lines"] and 'custom_call_target="__gpu$xla.gpu.triton"' in hlo
    # every Triton kernel is a launch; the entry computation launches no more than the HLO's fusions and calls
    triton = hlo.count('custom_call_target="__gpu$xla.gpu.triton"')
    assert triton < row["entry_kernels"] <= row["fusions"] + hlo.count(" custom-call(")

    with mock.patch.object(compile_for_h100, "h100_compile_only_sharding", lambda: None):
        assert compile_for_h100.main(["--model", "demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA plugin" in err[0] and ".[aot]" in err[0]


def test_compile_for_h100_mesh_cli(capsys):
    """``--mesh``: a layout that is not tp=N, dp=N, pp=N and ep, or that does not fit the model, is a one-line
    error and exit code 2; a step with the Mosaic GPU
    grouped matmul, which lowers on a mesh of compile-only devices but crashes XLA's compile, is an error line
    and the process goes on."""
    from scripts import compile_for_h100

    for layout, message in (("tp=8x", "expected tp=N"), ("pp=16", "larger than the number of layers"),
                            ("tp=3", "does not divide the model's 64 query heads")):
        assert compile_for_h100.main(["--mesh", layout]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err

    # 8 x 32 tokens x 6 picks over 8 devices: 192 rows expected a device, > 3 per expert (32): the grouped matmul
    assert compile_for_h100.main(["--layers", "SWA,CSA", "--batch", "8", "--tokens", "32", "--kernels", "pallas",
                                  "--mesh", "dp=8,ep"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["step"] == "flash-slice_pallas_b8_t32_dp8_ep" and row["mesh"] == "dp=8,ep"
    assert "Mosaic GPU" in row["error"]
