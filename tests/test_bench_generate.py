"""scripts/bench_generate.py's option sets on the demo model (CPU): each decode case compiled once per XLA
option set (later rounds reuse it), its rows labelled with them, the optimized HLO written per case; bad option
lists and round counts are one-line usage errors."""

from __future__ import annotations

import json
import subprocess
import sys

from scripts import bench_generate


def test_option_sets_and_rounds_label_rows_and_write_hlo(tmp_path, capsys):
    opts = [{}, {"xla_backend_optimization_level": 1}]
    assert bench_generate.main(["--model", "demo", "--no-ceilings", "--decode-cases", "1,64", "--decode-steps", "2",
                                "--rounds", "2", "--xla-options", json.dumps(opts), "--hlo-dir",
                                str(tmp_path)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()][1:]
    assert [(r["round"], r["xla_options"]) for r in rows] == [(0, opts[0]), (0, opts[1]), (1, opts[0]), (1, opts[1])]
    assert all(r["decode_ms_per_step"] > 0 and "error" not in r for r in rows)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["decode_B1_C64_xla_options0.txt", "decode_B1_C64_xla_options1.txt"]
    assert "HloModule" in (tmp_path / written[0]).read_text()


def test_rounds_reuse_the_compiled_step():
    """A case's second round runs the program its first compiled (each compile of the Flash-width slice's step
    takes tens of seconds on the GPU machine)."""
    import jax.numpy as jnp

    from dsv4_jax.weights.random_init import random_model

    model = random_model(bench_generate.make_config("demo", None, None), jnp.bfloat16)
    for _ in range(2):
        assert bench_generate.decode_case(model, 1, 64, 1, "xla")["decode_ms_per_step"] > 0
    (program,) = bench_generate._COMPILED[model].values()
    assert program is not None


def test_unknown_xla_option_is_recorded_as_the_case_error(capsys):
    assert bench_generate.main(["--model", "demo", "--no-ceilings", "--decode-cases", "1,64", "--decode-steps", "1",
                                "--xla-options", '[{"xla_no_such_option": true}]']) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert "No such compile option" in row["error"] and "xla_no_such_option" in row["error"]


def test_paths_time_the_sharded_step_beside_the_plain_one(capsys):
    """``--paths plain mesh``: each case timed on today's one-device step and on the sharded step of a 1-device
    mesh (issue 25's no-slower check), rows labelled by path."""
    assert bench_generate.main(["--model", "demo", "--no-ceilings", "--decode-cases", "1,64", "--decode-steps", "1",
                                "--paths", "plain", "mesh"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()][1:]
    assert [r["path"] for r in rows] == ["plain", "mesh"]
    assert all(r["decode_ms_per_step"] > 0 and "error" not in r for r in rows)


def test_mesh_path_shares_the_plain_weights():
    """The mesh path's weights are the plain path's buffers (``mesh_weights``: placing them would otherwise copy
    them, and the full slice does not fit twice on one card)."""
    import jax.numpy as jnp

    from dsv4_jax.weights.random_init import random_model

    model = random_model(bench_generate.make_config("demo", None, None), jnp.bfloat16)
    plain, mesh = (bench_generate.device_steps(model, 64, path)[1] for path in ("plain", "mesh"))
    assert [w.unsafe_buffer_pointer() for w in plain] == [w.addressable_shards[0].data.unsafe_buffer_pointer()
                                                           for w in mesh]


def test_precision_times_bf16_and_released_weights(capsys):
    """``--precision bf16 released``: each case on the model in --dtype and on the same sizes in released FP8 / FP4,
    whose roofline counts the codes' and scales' bytes."""
    assert bench_generate.main(["--model", "demo", "--no-ceilings", "--decode-cases", "1,64", "--decode-steps", "1",
                                "--precision", "bf16", "released"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()][1:]
    assert [r["precision"] for r in rows] == ["bf16", "released"]
    assert all(r["decode_ms_per_step"] > 0 and "error" not in r for r in rows)
    assert rows[1]["bytes_per_step_gb"] < rows[0]["bytes_per_step_gb"]
    # the roofline counts the experts the step's routers picked: one token picks k distinct ones per layer
    cfg = bench_generate.make_config("demo", None, None)
    assert all(r["distinct_experts_per_layer"] == [cfg.num_experts_per_tok] * cfg.num_hidden_layers for r in rows)


def test_bad_option_lists_and_rounds_are_usage_errors():
    for args, said in ((["--xla-options", '{"a": 1}'], "expected a JSON list of objects"),
                       (["--xla-options", "[1]"], "expected a JSON list of objects"),
                       (["--rounds", "0"], "--rounds 0: expected at least 1")):
        run = subprocess.run([sys.executable, "-m", "scripts.bench_generate", "--model", "demo", "--no-ceilings",
                              *args], capture_output=True, text=True)
        assert run.returncode == 2 and said in run.stderr and "Traceback" not in run.stderr
