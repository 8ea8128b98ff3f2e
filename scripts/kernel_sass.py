"""The instruction mix of a Pallas Triton kernel's inner loop for sm_90, on a host without a GPU: the benchmark
case's kernel compiled to a cubin (kernels_pallas.testing.compile_for_h100), disassembled, and each loop's
instructions counted by opcode, per loop iteration and per weight element. A measurement to take before GPU
time: a decode bound by its instructions (the FP4 experts, docs/performance.md) shows it here.

    python -m scripts.kernel_sass expert_rows "fp4 gate_up T=1" --config '{"block_k": 512, "num_warps": 8}'

One JSON object per kernel: its name, the loop's instructions per iteration by opcode (the opcode's first
part: IMAD.SHL counts as IMAD), and ``per_weight``: those per weight element a thread handles in an iteration
(block_n x block_k weights over 32 x num_warps threads).
"""

from __future__ import annotations

import argparse
import collections
import json
import re

import jax

from kernels_pallas.testing import compile_for_h100
from scripts.bench_kernels import tuning_kwargs
from scripts.kernel_cases import bench_cases


def loops(sass: str) -> list[list[str]]:
    """The opcodes of each loop in a disassembly: the instructions from a label to a branch back to it."""
    lines = sass.splitlines()
    out = []
    for end, line in enumerate(lines):
        back = re.search(r"\bBRA\s+(\w+);", line)
        if back is None:
            continue
        start = next((i for i in range(end, -1, -1) if lines[i].startswith(back.group(1) + ":")), None)
        if start is not None:
            out.append([re.sub(r"^@!?U?P\w+\s+", "", l.split("\t", 1)[1].strip()).split()[0].split(".")[0].rstrip(";")
                        for l in lines[start + 1:end + 1] if "\t" in l])
    return out


def instruction_mix(module: str, case: str, config: dict | None = None) -> list[dict]:
    """Per kernel of ``bench_cases(module)``'s ``case`` (with TuningConfig fields ``config``): its longest
    loop's opcode counts, and per weight element when the kernel's name gives its block (``_n64_k256``)."""
    [c] = [c for c in bench_cases(module) if c["name"] == case]
    args = jax.eval_shape(c["args"], jax.random.PRNGKey(0))
    kwargs = {**c.get("kwargs", {}), **tuning_kwargs(module, c, config or {})}
    asm: dict = {}
    compile_for_h100(lambda *a: c["pallas"](*a, **kwargs), *args, asm=asm)
    rows = []
    for name, forms in asm.items():
        loop = max(loops(forms["sass"]), key=len, default=[])
        warps = int(re.search(r'"ttg.num-warps" = (\d+)', forms["ttgir"]).group(1))
        row = {"kernel": name, "loop_instructions": len(loop),
               "by_opcode": dict(collections.Counter(loop).most_common())}
        block = re.search(r"_n(\d+)_k(\d+)", name)
        if block:
            per_thread = int(block.group(1)) * int(block.group(2)) / (32 * warps)
            row["per_weight"] = round(len(loop) / per_thread, 2)
            row["per_weight_by_opcode"] = {k: round(v / per_thread, 2) for k, v in row["by_opcode"].items()}
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="a kernels_pallas module with benchmark cases (scripts/kernel_cases.py)")
    parser.add_argument("case", help="a case name of that module, e.g. 'fp4 gate_up T=1'")
    parser.add_argument("--config", type=json.loads, default=None, help="TuningConfig fields as JSON")
    args = parser.parse_args(argv)
    for row in instruction_mix(args.module, args.case, args.config):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
