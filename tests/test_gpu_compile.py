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
from scripts.compile_for_h100 import compiled_step_hlo

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
    hlo = step_hlo(tiny(), T, "pallas")
    triton_calls = [line for line in hlo.splitlines() if 'custom_call_target="__gpu$xla.gpu.triton"' in line]
    # kernel names without their size suffixes
    kernels = {re.search(r'op_name="[^"]*/(dsv4_[a-z_]+?)_[a-z]?\d', line).group(1) for line in triton_calls}
    want = {f"dsv4_compress_{stage}", "dsv4_hc_pre", f"dsv4_indexer_{stage}", "dsv4_sparse_attn", "dsv4_topk_select"}
    assert kernels == want, sorted(kernels)


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
