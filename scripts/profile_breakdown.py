"""Where a jitted step's device time goes: a profiler trace, attributed by the model's named scopes.

Each device event in the trace names the HLO instruction it ran (``hlo_op``); the compiled HLO maps every
instruction to its JAX ``op_name`` path (``.../layer_3/attention/indexer/...``). The model's scopes
(model.py, attention.py) give the categories: forward_metadata, per layer attention (with its
compressor / indexer / top-k parts), moe, mhc; the rest is embedding, head and sampling.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile

import jax

# First match wins, most specific first.
CATEGORIES = ("forward_metadata", "topk", "indexer", "compressor", "attention", "moe", "mhc")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
_OP_NAME = re.compile(r'metadata=\{[^}]*op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> op_name path, from compiled HLO text. A fusion the compiler built without
    metadata of its own (e.g. a GEMM fusion) takes the op_name of the first instruction in the
    computation it calls that has one."""
    out, calls, first_in = {}, {}, {}
    computation = None
    for line in hlo_text.splitlines():
        c = _COMPUTATION.match(line)
        if c and "=" not in line.split("{")[0]:
            computation = c.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name = m.group(1)
        if (op := _OP_NAME.search(line)):
            out[name] = op.group(1)
            first_in.setdefault(computation, op.group(1))
        elif (called := _CALLS.search(line)):
            calls[name] = called.group(1)
    for name, comp in calls.items():
        if comp in first_in:
            out[name] = first_in[comp]
    return out


def category(op_name: str, layer_types) -> tuple[str, str]:
    """(category, layer type or '') of one op_name path."""
    m = re.search(r"layer_(\d+)/", op_name)
    layer_type = layer_types[int(m.group(1))] if m else ""
    for c in CATEGORIES:
        if f"/{c}/" in f"/{op_name}/" or f"{c}/" in op_name:
            return c, layer_type
    return ("other_in_layer" if m else "head_embed_sampling"), layer_type


def device_op_times(trace_dir: str) -> tuple[dict[str, float], int]:
    """(hlo_op -> total device nanoseconds, number of kernel events) over every GPU kernel event in the trace."""
    from jax.profiler import ProfileData

    totals: dict[str, float] = collections.defaultdict(float)
    launches = 0
    for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if not line.name.startswith("Stream"):
                    continue
                for ev in line.events:
                    stats = dict(ev.stats)
                    if "hlo_op" in stats:
                        totals[stats["hlo_op"]] += ev.duration_ns
                        launches += 1
    return totals, launches


def breakdown(run_steps, compiled_hlo: str, layer_types, steps: int) -> dict:
    """Trace ``run_steps()`` (which runs ``steps`` steps and blocks) and return microseconds per step
    by category and by (layer type, category)."""
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        run_steps()
        jax.profiler.stop_trace()
        times, launches = device_op_times(d)
    names = op_names(compiled_hlo)
    by_cat: dict[str, float] = collections.defaultdict(float)
    by_type: dict[str, float] = collections.defaultdict(float)
    unmapped: dict[str, float] = {}
    for op, ns in times.items():
        if op not in names:
            unmapped[op] = ns / steps / 1e3
            continue
        cat, lt = category(names[op], layer_types)
        by_cat[cat] += ns / steps / 1e3
        if lt:
            by_type[f"{lt}/{cat}"] += ns / steps / 1e3
    total = sum(times.values()) / steps / 1e3
    return {"device_us_per_step": total, "kernels_per_step": launches / steps, "by_category_us": dict(sorted(by_cat.items())),
            "by_layer_type_us": dict(sorted(by_type.items())), "unattributed_us": sum(unmapped.values()),
            "top_unattributed_us": dict(sorted(unmapped.items(), key=lambda kv: -kv[1])[:8]),
            "by_op_us": by_op(times, names, steps)}


def by_op(times: dict[str, float], names: dict[str, str], steps: int, top: int = 60) -> dict[str, list]:
    """The ``top`` JAX operations by device time per step, summed over layers (``layer_*``):
    op_name path -> [microseconds per step, number of HLO kernels]."""
    acc: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for op, ns in times.items():
        path = re.sub(r"^jit\([^)]*\)/", "", names.get(op, f"<unattributed {op}>"))
        key = re.sub(r"layer_\d+/", "layer_*/", path)
        acc[key][0] += ns / steps / 1e3
        acc[key][1] += 1
    return {k: [round(v[0], 2), v[1]] for k, v in sorted(acc.items(), key=lambda kv: -kv[1][0])[:top]}
