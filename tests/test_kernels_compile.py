"""Every Pallas Triton kernel compiles for sm_90 (an H100 / H200) at the Flash-size shapes it is benchmarked
at, on a CPU: lowered against an abstract H100, then compiled to a cubin by the ``triton`` package
(``kernels_pallas.testing.compile_for_h100``). The lowering checks beside each kernel stop at Triton IR; GPU
run 11 showed that IR can lower and still take the GPU's compiler minutes (an unrolled hc_pre). Bound: 120 s
per kernel on a CI-class CPU; measured 0.3-2.2 s per case here, and 201 s for the unrolled hc_pre at d = 4096."""

from __future__ import annotations

import importlib.util
import sys

import jax
import pytest

from kernels_pallas.testing import compile_for_h100, cuda_plugin_installed, h100_compile_only_sharding
from scripts.kernel_cases import bench_cases

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(jax.default_backend() == "gpu", reason="the GPU tests compile the kernels for real")

# (module, bench case): one case per kernel and distinct static configuration; grouped_matmul is Mosaic GPU.
CASES = [
    ("sparse_attention", "decode_B128_K1024"), ("sparse_attention", "decode_fp8_B128_K1024"),
    ("sparse_attention", "prefill_csa_S8192_C2048"),
    ("sparse_attention", "prefill_hca_S8192_C2048"), ("indexer", "decode_B32_N32768"),
    ("indexer", "prefill_S8192_N2048"), ("topk", "topk512_R32_N32768"), ("compressor", "prefill_csa_m4_d512_S8192"),
    ("compressor", "prefill_hca_m128_d512_S8192"), ("compressor", "prefill_hca_m128_d512_S32768"),
    ("compressor", "decode_csa_m4_d512_B32"),
    ("hc_pre", "hc_pre_T1"), ("hc_pre", "hc_pre_norm_T1"), ("grouped_gemv", "gate_up T=1"),
    ("expert_rows", "gate_up T=1"), ("expert_rows", "down T=1"),
]


@pytest.mark.parametrize("module,case", CASES)
def test_compiles_for_sm90(module, case):
    [c] = [c for c in bench_cases(module) if c["name"] == case]
    try:
        args = jax.eval_shape(c["args"], jax.random.PRNGKey(0))
    except jax.errors.TracerArrayConversionError:  # input builders that use numpy need real arrays
        args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in c["args"](jax.random.PRNGKey(0))]
    seconds = compile_for_h100(lambda *a: c["pallas"](*a, **c.get("kwargs", {})), *args)
    slow = {name: round(s, 1) for name, s in seconds.items() if s > 120}
    assert not slow, f"{module} {case}: Triton compile for sm_90 took {slow} s (bound 120 s)"


def test_cuda_plugin_check_without_any_jax_plugin(monkeypatch):
    """With ``.[test]`` alone no JAX plugin is installed, so the ``jax_plugins`` package is missing and
    ``find_spec`` of its submodule raises: the check says False, and the GPU compile tests skip."""
    for name in [m for m in sys.modules if m == "jax_plugins" or m.startswith("jax_plugins.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "jax_plugins", None)  # import jax_plugins -> ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError):
        importlib.util.find_spec("jax_plugins.xla_cuda13")
    assert not cuda_plugin_installed() and not cuda_plugin_installed((13,))
    assert h100_compile_only_sharding() is None


def test_instruction_mix_counts_the_loops_tensor_core_ops():
    """scripts/kernel_sass.py reads the FP4 expert kernel's inner loop from its sm_90 disassembly: one K step
    of a [16, 256] x [256, 64] tile is (64 / 8) x (256 / 16) m16n8k16 HMMAs over the program's 4 warps."""
    from scripts.kernel_sass import instruction_mix

    [row] = instruction_mix("expert_rows", "fp4 gate_up T=1", {"block_n": 64, "block_k": 256, "num_warps": 4})
    assert row["kernel"].endswith("_n64_k256")
    assert row["by_opcode"]["HMMA"] == (64 // 8) * (256 // 16) // 4
    assert row["per_weight"] == round(row["loop_instructions"] / (64 * 256 / 128), 2)


@pytest.mark.parametrize("module", ["expert_rows", "grouped_gemv"])
def test_fp4_ptx_decode_takes_fewer_instructions_a_weight(module):
    """The inline-PTX FP4 decode (``fp4_ptx``, two weights per 32-bit operation) compiles for sm_90 and its
    inner loop runs at most 0.85 of the bit arithmetic's instructions a weight (the counts: docs/performance.md,
    "FP4 routed experts")."""
    from scripts.kernel_sass import instruction_mix

    [plain] = instruction_mix(module, "fp4 gate_up T=1", {"fp4_ptx": False})
    [ptx] = instruction_mix(module, "fp4 gate_up T=1", {"fp4_ptx": True})
    assert "_ptx_" in ptx["kernel"] and "_ptx_" not in plain["kernel"]
    print(module, plain["per_weight"], ptx["per_weight"])
    assert ptx["per_weight"] <= 0.85 * plain["per_weight"]
