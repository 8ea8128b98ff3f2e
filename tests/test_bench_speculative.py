"""scripts/bench_speculative.py on the demo config (CPU): every measured step and the computed speed-ups."""

from __future__ import annotations

import json
import math

import pytest

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


def test_rounds_are_timed_only_for_the_sizes_asked(capsys):
    """``--rounds 3`` of ``--verify 2 3``: one round row (T = 3), and the computed rows of T = 2 come from the
    pieces alone; the routing statistics of both sizes come from one forward (causal prefixes)."""
    assert bench_speculative.main(["--model", "demo", "--batch", "2", "--context", "64", "--verify", "2", "3",
                                   "--accept", "2", "--steps", "1", "--rounds", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    measured = {(r["step"], r["tokens"]): r for r in rows if not r.get("computed")}
    assert [T for step, T in measured if step == "round"] == [3]
    assert [r["most_experts"] for r in (measured[("decode", 1)], measured[("verify", 2)], measured[("verify", 3)])] \
        == [min(8, 2 * T * 2) for T in (1, 2, 3)]  # demo: 8 experts, 2 a token
    computed = {r["draft_tokens"]: r for r in rows if r.get("computed")}
    assert "speedup_slice_round" not in computed[1] and computed[2]["speedup_slice_round"] > 0
    assert measured[("verify", 2)]["distinct_experts"] <= measured[("verify", 3)]["distinct_experts"]


def test_rounds_must_be_verify_sizes():
    with pytest.raises(SystemExit) as exit_:
        bench_speculative.main(["--model", "demo", "--verify", "2", "--rounds", "4"])
    assert exit_.value.code == 2
