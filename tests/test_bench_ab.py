"""scripts/bench_ab.py on the demo config (CPU): this tree against a copy of itself, in released precision."""

from __future__ import annotations

import json
from pathlib import Path

from scripts import bench_ab

ROOT = Path(__file__).resolve().parents[1]


def test_released_precision_runs_both_trees_on_the_same_codes(capsys):
    """The other tree (here a copy of this one, imported as dsv4_jax_old) holds the shared FP8 / FP4 codes in
    its own QuantArray class, and both trees' decode steps and prefill run: one row per tree and case."""
    assert bench_ab.main(["--old", str(ROOT), "--model", "demo", "--precision", "released", "--decode-cases",
                          "2,64", "--decode-steps", "1", "--prefill", "32", "--prefill-chunk", "16", "--rounds", "1",
                          "--no-ceilings"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()][1:]
    assert [(r["tree"], r["phase"], r["precision"]) for r in rows] == [
        ("old", "decode", "released"), ("new", "decode", "released"),
        ("old", "prefill", "released"), ("new", "prefill", "released")]
    assert all(r.get("ms_per_step", 1) > 0 and r.get("tokens_per_s", 1) > 0 for r in rows)
