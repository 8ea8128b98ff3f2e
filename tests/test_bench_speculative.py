"""scripts/bench_speculative.py on the demo config (CPU): every measured step and the computed speed-ups."""

from __future__ import annotations

import json
import math

from scripts import bench_speculative


def test_rows_time_every_step_and_compute_the_speedups(capsys):
    assert bench_speculative.main(["--model", "demo", "--batch", "1", "--context", "64", "--verify", "2",
                                   "--accept", "2", "--steps", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    measured = {(r["step"], r["tokens"]): r for r in rows if not r.get("computed")}
    assert set(measured) == {("decode", 1), ("draft", 1), ("head", 1), ("verify", 2), ("extend", 2), ("round", 2),
                             ("head", 2)}
    assert all(r["ms"] > 0 and 1 <= r["distinct_experts"] <= r["most_experts"] for r in measured.values())
    (computed,) = [r for r in rows if r.get("computed")]
    assert computed["draft_tokens"] == 1 and computed["accept_length"] == 2.0
    assert all(math.isfinite(computed[k]) and computed[k] > 0 for k in
               ("speedup_slice", "speedup_slice_round", "speedup_flash", "flash_draft_share", "draft_head_share"))
