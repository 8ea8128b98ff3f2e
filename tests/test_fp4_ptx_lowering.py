"""The inline-PTX FP4 decode (``fp4_ptx``) as the Triton inside jaxlib lowers it, on a host without a GPU: the
FP4 kernels compiled by XLA for a compile-only H100 (the ``aot`` extra's CUDA plugin), their LLVM dialect right
after Triton's TritonGPU -> LLVM conversion read back, and each bf16 pair the tensor cores multiply traced to the
inline asm output and the weight byte it came from.

The ``triton`` package's compiler (``compile_for_h100``) lowered the kernels right while jaxlib's did not: its
``tt.join`` of two bf16 asm results took them two elements at a time, so a (k, k + 1) pair of the dot was the
low (or high) nibbles of two adjacent bytes (kernels_pallas/common.py, ``_FP4_PTX``)."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import pytest

from kernels_pallas.testing import abstract_h100, cuda_plugin_installed, h100_compile_only_sharding
from scripts import kernel_cases

pytestmark = pytest.mark.skipif(not cuda_plugin_installed(), reason="needs JAX's CUDA plugin (pip install -e '.[aot]')")

LOW_NIBBLE = "shl.b32 a, t0, 9;"  # _FP4_PTX with the low nibble's shifts; the high nibble's shifts by 5


def xla_triton_llvm(fn, args, dump_dir, monkeypatch) -> str:
    """``fn(*args)`` (one Pallas Triton kernel) compiled by XLA for a compile-only H100 -> the kernel's LLVM
    dialect as jaxlib's Triton leaves its TritonGPU -> LLVM conversion (generic form, one op a line)."""
    monkeypatch.setenv("MLIR_ENABLE_DUMP", "1")  # Triton's IR before each pass, into XLA's dump
    h100 = h100_compile_only_sharding()
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=h100) for a in args]
    with abstract_h100():
        lowered = jax.jit(fn).lower(*args)
    lowered.compile(compiler_options={"xla_dump_to": str(dump_dir), "xla_dump_emitter_re": "triton-to-llvm"})
    [dump] = dump_dir.glob("*triton-to-llvm.txt")
    return next(p for p in dump.read_text().split("// -----// IR Dump") if '"llvm.func"' in p)


def dot_weight_pairs(llvm: str) -> list[list[tuple]]:
    """The B registers (bf16x2) of every mma.sync in ``llvm`` -> per register its two bf16 as (weight byte,
    nibble): the byte a canonical name of the value fed to the FP4 asm, the nibble "low" or "high"."""
    ops = {m.group(1): (m.group(2), [a.strip() for a in m.group(3).split(",") if a.strip()], m.group(4))
           for m in re.finditer(r'^\s+(%\d+) = "([\w.]+)"\((.*?)\)(.*)$', llvm, re.M)}
    consts = {v: int(m.group(1)) for v, (op, _, rest) in ops.items()
              if op == "llvm.mlir.constant" and (m := re.search(r"value = (-?\d+) :", rest))}

    def index(op, args, at, rest) -> int:
        """The element an insert / extract names: a vector's by its index operand args[at], a struct's by
        position."""
        if op.endswith("element"):
            return consts[args[at]]
        return int(re.search(r"position = array<i64: (\d+)>", rest).group(1))

    @functools.cache  # a struct's elements are read once each: cached, the walk is linear
    def value(v):
        """What ``v`` holds: a list of its elements (struct or vector), ("asm", op) (an asm's results),
        ("result", op, k) (its k-th result), ("element", op, e) (element e of its outputs), or an opaque name
        ("part", of, k) / SSA name, the same for every extraction of one element."""
        op, args, rest = ops.get(v, ("?", [], ""))
        if op == "llvm.inline_asm":
            return ("asm", v)
        if op in ("llvm.mlir.undef", "llvm.mlir.poison"):
            return []
        if op in ("llvm.bitcast", "llvm.fptrunc"):  # bf16x2 <-> i32, fp32 -> bf16: the same elements
            return value(args[0])
        if op in ("llvm.insertvalue", "llvm.insertelement"):
            k = index(op, args, 2, rest)
            elements = list(value(args[0]))
            elements += [None] * (k + 1 - len(elements))
            elements[k] = value(args[1])
            return elements
        if op in ("llvm.extractvalue", "llvm.extractelement"):
            k = index(op, args, 1, rest)
            src = value(args[0])
            if isinstance(src, list) and k < len(src) and src[k] is not None:
                return src[k]
            if src[0] == "asm":
                return ("result", src[1], k)
            if src[0] == "result":  # a bf16x2 result register: elements 2k, 2k + 1 of the asm's outputs
                return ("element", src[1], 2 * src[2] + k)
            return ("part", src, k)
        return v

    def weight(src) -> tuple:
        if not (isinstance(src, tuple) and src[0] in ("result", "element")):
            raise AssertionError(f"a dot operand element not from an inline asm output: {src}")
        _, asm, e = src  # an fp32 result is element k itself
        _, args, rest = ops[asm]
        return (value(args[0])[e], "low" if LOW_NIBBLE in rest else "high")

    return [[weight(s) for s in value(b)] for op, args, rest in ops.values()
            if op == "llvm.inline_asm" and "mma.sync" in rest for b in args[8:10]]


@pytest.mark.parametrize("module", ["expert_rows", "grouped_gemv"])
def test_fp4_ptx_dot_pairs_are_one_bytes_two_nibbles(module, tmp_path, monkeypatch):
    """Every bf16 pair of the FP4 kernel's tensor-core B operand under ``fp4_ptx`` is one weight byte's low then
    high nibble (columns k, k + 1 of the tile), as jaxlib's Triton lowers the kernel."""
    [c] = [c for c in kernel_cases.bench_cases(module) if c["name"] == "fp4 gate_up T=1"]
    tuning = dataclasses.replace(c["tuning"], fp4_ptx=True)
    llvm = xla_triton_llvm(lambda *a: c["pallas"](*a, tuning=tuning), jax.eval_shape(c["args"], jax.random.PRNGKey(0)),
                           tmp_path, monkeypatch)
    pairs = dot_weight_pairs(llvm)
    assert pairs and len(pairs) % 2 == 0
    bad = [p for p in pairs if [n for _, n in p] != ["low", "high"] or p[0][0] != p[1][0]]
    assert not bad, f"{len(bad)} of {len(pairs)} B registers pair other weights, e.g. {bad[0]}"
