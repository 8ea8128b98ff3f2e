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
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]*)\"")


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> op_name path, from compiled HLO text."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            out[m.group(1)] = m.group(2)
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
            "top_unattributed_us": dict(sorted(unmapped.items(), key=lambda kv: -kv[1])[:8])}
