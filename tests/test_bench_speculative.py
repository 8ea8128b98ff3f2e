"""scripts/bench_speculative.py on the demo config (CPU): every measured step and the computed speed-ups."""

from __future__ import annotations

import json
import math
import sys

import jax
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


@pytest.mark.parametrize("kernels", ["xla", "pallas"])
def test_every_piece_is_traced_under_the_kernels_asked(monkeypatch, kernels):
    """Each timed step's program runs the Pallas kernels exactly when ``--kernels pallas`` (a piece traced
    outside ``ops.use`` ran plain XLA while the round ran the kernels: verify 2 took 6.5 ms against a 4.8 ms
    round of 4). The head's ops have no kernel for bf16 weights, so it runs XLA either way."""
    has_kernels = {}

    def trace_only(fn, args, steps, carry=None):
        has_kernels[sys._getframe(1).f_code.co_name] = "pallas_call" in str(jax.make_jaxpr(fn)(*args))
        return 1e-3

    monkeypatch.setattr(bench_speculative, "timed", trace_only)
    assert bench_speculative.main(["--model", "demo", "--batch", "1", "--context", "64", "--verify", "2",
                                   "--accept", "2", "--steps", "1", "--kernels", kernels]) == 0
    pieces = ("time_decode", "time_verify", "time_extend", "time_draft", "time_round")
    assert has_kernels == {**{p: kernels == "pallas" for p in pieces}, "time_head": False}
