"""Orbax checkpoints (dsv4_jax.weights.orbax, scripts/convert_checkpoint.py): bitwise round trips,
restored logits, shardings on a multi-device CPU mesh, overwrite rules, the converter and the CLI on
an orbax directory, and the error messages.

The source is the tiny Hugging Face checkpoint of tests/test_checkpoint.py (whose import is proved
there against the PyTorch reference); every claim here is equality with what ``from_pretrained``
loads from that source. Fake CPU devices must be configured before JAX starts, and conftest.py
imports JAX first, so the multi-device restore runs this file as a script in a subprocess
(``python tests/test_orbax.py sharded ORBAX_CKPT HF_CKPT OUT``), which also loads the safetensors
checkpoint onto the mesh with ``from_pretrained(..., mesh=, rules=)``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import jax  # noqa: E402  (conftest.py, or the parent's environment for the subprocess, picks the CPU)
from jax.sharding import PartitionSpec as P  # noqa: E402

import dsv4_jax  # noqa: E402
from dsv4_jax.model.spec import axes_of  # noqa: E402
from dsv4_jax.weights import orbax as checkpoint_orbax  # noqa: E402
from dsv4_jax.weights.errors import CheckpointError  # noqa: E402
from dsv4_jax.weights.params import param_table  # noqa: E402
from dsv4_jax.weights.sharding import ShardingRules  # noqa: E402

DEVICES = 4
MESH_AXES = ("rows", "cols")
PROMPT = "w5 w17 w42 w9 w200 w3 w77 w120 w8 w64 w33"  # longer than the window (8), two HCA windows (8)


# Logical axis -> mesh axes: "embed" on rows, most axes that meet it in a matrix on cols (the rest
# replicated), so matrices split over both mesh axes and vectors over one; heads over both (sinks [4]).
MESH_RULES = dict(embed="rows", vocab="cols", kv="cols", mlp="cols", o_lora="cols", o_in="rows", ratio="rows",
                  index_heads="cols", heads=MESH_AXES, hc_embed="cols")
RULES = ShardingRules(**MESH_RULES)


def mesh_spec(axes: tuple[str, ...]) -> P:
    """What RULES make of a parameter's logical axes, read off MESH_RULES."""
    return P(*(MESH_RULES.get(a) for a in axes))


def values(model) -> dict[str, np.ndarray]:
    return {name: np.asarray(var.get_value()) for name, var in param_table(model).items()}


def assert_bitwise_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]):
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), name
        assert g.tobytes() == w.tobytes(), f"{name} differs"


def one_line_error(err: str) -> str:
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ----- fixtures: the HF source (with a tokenizer.json), its models, and orbax copies -------------

@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The HF directory of test_checkpoint.Saved plus a word-level tokenizer.json; and Saved itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from test_checkpoint import Saved

    root = tmp_path_factory.mktemp("orbax")
    saved = Saved(root)
    hf = root / "hf"
    shutil.copytree(saved.path, hf)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(saved.ref.config.vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(hf / "tokenizer.json"))
    return saved, hf, root


@pytest.fixture(scope="module")
def loaded(source):
    """dtype -> the model from_pretrained loads from the HF source."""
    _, hf, _ = source
    return {dtype: dsv4_jax.from_pretrained(hf, dtype) for dtype in ("float32", "bfloat16")}


@pytest.fixture(scope="module")
def orbax_dirs(source, loaded):
    """dtype -> an orbax checkpoint saved from loaded[dtype]."""
    _, _, root = source
    return {dtype: checkpoint_orbax.save(model, root / f"orbax_{dtype}") for dtype, model in loaded.items()}


# ----- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_variable_round_trips_bitwise(loaded, orbax_dirs, dtype):
    path = orbax_dirs[dtype]
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "orbax"]
    stored = json.loads((path / "config.json").read_text())
    assert stored["dtype"] == dtype
    assert dsv4_jax.DeepseekV4Config.from_hf_dict(stored) == loaded[dtype].config
    restored = checkpoint_orbax.restore(path)  # dtype: the saved one
    assert restored.dtype == loaded[dtype].dtype and restored.config == loaded[dtype].config
    table = param_table(restored)
    assert "model.layers.0.mlp.gate.tid2eid" in table and "model.layers.1.mlp.gate.e_score_correction_bias" in table
    assert_bitwise_equal(values(restored), values(loaded[dtype]))
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert all(var.get_value().sharding == default for var in table.values())


def test_fp32_checkpoint_restored_as_bf16_equals_bf16_import(loaded, orbax_dirs):
    """from_pretrained(orbax, "bfloat16") on an fp32 checkpoint casts as the HF import does, bit for bit."""
    cast = dsv4_jax.from_pretrained(orbax_dirs["float32"], "bfloat16")
    assert_bitwise_equal(values(cast), values(loaded["bfloat16"]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_restored_logits_equal_original(source, loaded, orbax_dirs, dtype):
    saved, _, _ = source
    original = np.asarray(loaded[dtype](saved.ids))
    restored = np.asarray(dsv4_jax.from_pretrained(orbax_dirs[dtype], dtype)(saved.ids))
    assert original.shape == saved.logits.shape
    np.testing.assert_array_equal(restored, original)


# ----- shardings ----------------------------------------------------------------------------------

def sharded_restores(ckpt: str, hf: str, out: str):
    """Subprocess body (4 fake CPU devices): restore the orbax checkpoint three ways and load the HF one onto
    the mesh; report shardings, save the mesh-placed arrays."""
    assert len(jax.devices()) == DEVICES, jax.devices()
    mesh = jax.make_mesh((2, 2), MESH_AXES)
    report = {}
    for key, model in (("mesh", checkpoint_orbax.restore(ckpt, mesh=mesh, rules=RULES)),
                       ("hf_mesh", dsv4_jax.from_pretrained(hf, "float32", mesh=mesh, rules=RULES))):
        table = param_table(model)
        arrays = {name: var.get_value() for name, var in table.items()}
        report[key] = {name: {"spec": repr(a.sharding.spec), "mesh": dict(a.sharding.mesh.shape),
                              "shards": sorted(list(s.data.shape) for s in a.addressable_shards),
                              "axes": axes_of(table[name])}
                       for name, a in arrays.items()}
        np.savez(Path(out) / f"{key}_arrays.npz", **{name: np.asarray(a) for name, a in arrays.items()})
    per_param = {name: jax.sharding.SingleDeviceSharding(jax.devices()[i % DEVICES])
                 for i, name in enumerate(sorted(arrays))}
    model = checkpoint_orbax.restore(ckpt, sharding=per_param)
    report["per_param"] = {name: sorted(d.id for d in var.get_value().sharding.device_set)
                           for name, var in param_table(model).items()}
    replicated = jax.sharding.NamedSharding(mesh, P())
    model = checkpoint_orbax.restore(ckpt, sharding=replicated)
    report["replicated"] = {name: var.get_value().sharding == replicated for name, var in param_table(model).items()}
    (Path(out) / "report.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def sharded_out(source, orbax_dirs, tmp_path_factory) -> Path:
    """The output folder of sharded_restores, run once in a 4-device subprocess."""
    _, hf, _ = source
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
    proc = subprocess.run([sys.executable, str(HERE / "test_orbax.py"), "sharded", str(orbax_dirs["float32"]),
                           str(hf), str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("placed", ["mesh", "hf_mesh"])  # orbax restore / safetensors import onto the mesh
def test_load_into_mesh_shardings_on_4_devices(loaded, sharded_out, placed):
    report = json.loads((sharded_out / "report.json").read_text())
    want = values(loaded["float32"])
    split = 0
    for name, w in want.items():
        got = report[placed][name]
        spec = mesh_spec(tuple(got["axes"]))
        assert got["spec"] == repr(spec) and got["mesh"] == {"rows": 2, "cols": 2}, (name, got)
        parts = [1 if entry is None else 2 if isinstance(entry, str) else DEVICES for entry in spec]
        shard = [size // n for size, n in zip(w.shape, [*parts, *[1] * (w.ndim - len(parts))])]
        assert got["shards"] == [shard] * DEVICES, (name, got)
        split += any(entry is not None for entry in spec)
    assert split > len(want) // 2, f"only {split} of {len(want)} arrays were split"
    with np.load(sharded_out / f"{placed}_arrays.npz") as restored:
        assert_bitwise_equal(dict(restored), want)


def test_restore_per_parameter_and_replicated_shardings(loaded, sharded_out):
    report = json.loads((sharded_out / "report.json").read_text())
    want = values(loaded["float32"])
    for i, name in enumerate(sorted(want)):
        assert report["per_param"][name] == [i % DEVICES], name
    assert report["replicated"] == {name: True for name in want}


# ----- saving over an existing directory ----------------------------------------------------------

def test_save_refuses_an_existing_checkpoint_and_overwrite_replaces_it(loaded, orbax_dirs, tmp_path):
    path = checkpoint_orbax.save(loaded["float32"], tmp_path / "ckpt")
    before = sorted(str(p.relative_to(path)) for p in path.rglob("*"))
    with pytest.raises(CheckpointError, match=r"checkpoint directory .*ckpt already exists; pass overwrite=True "
                                              r"\(--overwrite\) to replace it"):
        checkpoint_orbax.save(loaded["bfloat16"], path)
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*")) == before
    assert_bitwise_equal(values(checkpoint_orbax.restore(path)), values(loaded["float32"]))

    checkpoint_orbax.save(loaded["bfloat16"], path, overwrite=True)
    restored = checkpoint_orbax.restore(path)
    assert restored.dtype == np.dtype("bfloat16")
    assert_bitwise_equal(values(restored), values(loaded["bfloat16"]))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "temporary directories were left behind"


def test_save_into_an_empty_directory(loaded, tmp_path):
    (tmp_path / "empty").mkdir()
    checkpoint_orbax.save(loaded["float32"], tmp_path / "empty")
    assert_bitwise_equal(values(checkpoint_orbax.restore(tmp_path / "empty")), values(loaded["float32"]))


def test_overwrite_never_deletes_a_directory_that_is_not_a_checkpoint(loaded, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match=r"refusing to overwrite .*: it is not a checkpoint directory "
                                              r"\(no config\.json\)"):
        checkpoint_orbax.save(loaded["float32"], tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match=r"checkpoint destination .*notes\.txt exists and is not a directory"):
        checkpoint_orbax.save(loaded["float32"], tmp_path / "notes.txt", overwrite=True)


# ----- the converter and the CLI ------------------------------------------------------------------

def run_converter(*args):
    proc = subprocess.run([sys.executable, "scripts/convert_checkpoint.py", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def test_convert_script_end_to_end(source, loaded, tmp_path):
    _, hf, _ = source
    dst = tmp_path / "converted"
    rc, _, err = run_converter(hf, dst, "--dtype", "float32")
    assert rc == 0, err
    assert (dst / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    assert checkpoint_orbax.is_orbax_checkpoint(dst)
    assert_bitwise_equal(values(dsv4_jax.from_pretrained(dst, "float32")), values(loaded["float32"]))

    rc, _, err = run_converter(hf, dst)
    assert rc == 2
    assert one_line_error(err) == (f"error: checkpoint directory {dst} already exists; pass overwrite=True "
                                   "(--overwrite) to replace it")
    from scripts.convert_checkpoint import main

    assert main([str(hf), str(dst), "--overwrite"]) == 0  # default dtype bfloat16
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    assert_bitwise_equal(values(dsv4_jax.from_pretrained(dst, "bfloat16")), values(loaded["bfloat16"]))


@pytest.mark.parametrize("args, message", [
    (["{hf}", "{tmp}/out", "--dtype", "float16"],
     r"error: argument --dtype: invalid choice: 'float16' \(choose from '?bfloat16'?, '?float32'?\)"),
    (["{hf}"], r"error: the following arguments are required: dst"),
    (["{tmp}/nope", "{tmp}/out"], r"error: checkpoint directory .*nope does not exist"),
    (["{tmp}", "{tmp}/out"], r"error: checkpoint directory .* has no config\.json"),
    (["{hf}", "{hf}", "--overwrite"], r"error: destination .*hf is the source directory; choose another DST"),
])
def test_convert_script_bad_input_is_one_line_and_exit_2(source, tmp_path, capsys, args, message):
    import re

    from scripts.convert_checkpoint import main

    _, hf, _ = source
    argv = [a.format(hf=hf, tmp=tmp_path) for a in args]
    before = sorted(p.name for p in hf.iterdir())
    capsys.readouterr()
    assert main(argv) == 2
    err = one_line_error(capsys.readouterr().err)
    assert re.fullmatch(message, err), err
    assert sorted(p.name for p in hf.iterdir()) == before


def test_convert_script_usage_error_from_the_shell(source):
    _, hf, _ = source
    rc, out, err = run_converter(hf)
    assert rc == 2 and out == ""
    assert one_line_error(err) == "error: the following arguments are required: dst"


def test_cli_greedy_tokens_from_orbax_equal_hf(source, orbax_dirs, capsys):
    """Same greedy tokens and text from the orbax copy as from the HF directory, and as the PyTorch reference."""
    from dsv4_jax.runtime.cli import main
    from test_generate_cli import reference_greedy

    saved, hf, root = source
    orbax_dir = root / "cli_orbax"
    shutil.copytree(orbax_dirs["float32"], orbax_dir)
    shutil.copy(hf / "tokenizer.json", orbax_dir / "tokenizer.json")
    results = []
    for path in (hf, orbax_dir):
        assert main(["--checkpoint", str(path), "--prompt", PROMPT, "--max-new-tokens", "8", "--greedy",
                     "--dtype", "float32", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[1] == results[0]
    prompt = [int(w[1:]) for w in PROMPT.split()]
    assert results[1]["tokens"] == reference_greedy(saved.ref, prompt, 8)
    assert results[1]["text"] == " ".join(f"w{t}" for t in results[1]["tokens"])


# ----- errors -------------------------------------------------------------------------------------

def _edit_config(**changes):
    def edit(path):
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(changes)
        (path / "config.json").write_text(json.dumps(cfg))
    return edit


def _layers(n):
    """Keep the first n layers of the schedule, repeating the last layer's types to grow it."""
    def edit(path):
        cfg = json.loads((path / "config.json").read_text())
        grow = lambda types: (types + types[-1:] * n)[:n]  # noqa: E731
        cfg.update(num_hidden_layers=n, layer_types=grow(cfg["layer_types"]),
                   mlp_layer_types=grow(cfg["mlp_layer_types"]))
        (path / "config.json").write_text(json.dumps(cfg))
    return edit


def _garble_data(path):
    for f in (path / "orbax").rglob("*"):
        if f.is_file() and f.parent.name == "d" and f.parent.parent.name.startswith("ocdbt.process"):
            f.write_bytes(b"\x00" * 10)


RESTORE_ERRORS = {
    "interrupted-save": (lambda p: (p / "orbax" / "_CHECKPOINT_METADATA").unlink(),
                         r"orbax checkpoint .* is incomplete or corrupt: orbax/_CHECKPOINT_METADATA is missing"),
    "garbage-manifest": (lambda p: (p / "orbax" / "manifest.ocdbt").write_bytes(b"garbage"),
                         r"orbax checkpoint .* is corrupt or unreadable: no readable array metadata in orbax/"),
    "garbage-data": (_garble_data, r"orbax checkpoint .* is corrupt or unreadable: .*(OUT_OF_RANGE|DATA_LOSS|Error)"),
    "config-shapes-differ": (_edit_config(hidden_size=32),
                             r"orbax checkpoint .* holds \S+ with shape \(.*\) but its config expects \(.*\)"),
    "config-has-fewer-layers": (_layers(2), r"orbax checkpoint .* holds model\.layers\.2\.\S+ \(.*\), which its "
                                             r"config has no parameter for"),
    "config-has-more-layers": (_layers(4),
                               r"orbax checkpoint .* is missing model\.layers\.3\.\S+ \(.*\) \(and \d+ more\)"),
    "no-dtype": (_edit_config(dtype=None),
                 r"orbax checkpoint .*: config\.json has no valid 'dtype' \(expected 'bfloat16' or 'float32'\)"),
    "no-config": (lambda p: (p / "config.json").unlink(), r"checkpoint directory .* has no config\.json"),
}


@pytest.mark.parametrize("case", sorted(RESTORE_ERRORS))
def test_restore_error(orbax_dirs, tmp_path, case):
    damage, message = RESTORE_ERRORS[case]
    path = tmp_path / "ckpt"
    shutil.copytree(orbax_dirs["float32"], path)
    damage(path)
    with pytest.raises(CheckpointError, match=message) as e:
        checkpoint_orbax.restore(path)  # no dtype: the saved one is read too
    assert "\n" not in str(e.value)


def test_config_mismatch_names_every_differing_field(orbax_dirs, loaded):
    import dataclasses

    asked = dataclasses.replace(loaded["float32"].config, sliding_window=16, index_topk=8)
    with pytest.raises(CheckpointError, match=r"does not match the requested config: sliding_window is 8 in the "
                                              r"checkpoint but 16 requested, index_topk is 4 in the checkpoint but "
                                              r"8 requested$"):
        checkpoint_orbax.restore(orbax_dirs["float32"], config=asked)
    same = dataclasses.replace(loaded["float32"].config)
    assert checkpoint_orbax.restore(orbax_dirs["float32"], config=same).config == same


def test_neither_orbax_nor_hf_directory(source, tmp_path):
    _, hf, _ = source
    (tmp_path / "junk.bin").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"^checkpoint directory .* has no config\.json$"):
        dsv4_jax.from_pretrained(tmp_path, "float32")
    with pytest.raises(CheckpointError, match=r"^.*hf is not an orbax checkpoint \(no orbax/ folder\); convert it "
                                              r"with scripts/convert_checkpoint\.py or load it with from_pretrained$"):
        checkpoint_orbax.restore(hf)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sharding={"lm_head.weight": None}), r"sharding has no entry for 'model\.\S+' \(\d+ parameter\(s\) missing\)"),
    (dict(sharding={"bogus.weight": None}), r"sharding names 'bogus\.weight', which is not a parameter of this model"),
    (dict(sharding="cpu:0"), r"sharding must be a jax Sharding or a mapping of parameter name to Sharding, got str"),
    (dict(rules=RULES), r"give either sharding, or mesh with optional rules \(a ShardingRules\)"),
    (dict(dtype="float16"), r"dtype 'float16' is not supported; expected 'bfloat16' or 'float32'"),
])
def test_bad_restore_arguments(orbax_dirs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        checkpoint_orbax.restore(orbax_dirs["float32"], **kwargs)


def test_cli_on_a_damaged_orbax_directory_is_one_line_and_exit_2(orbax_dirs, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(orbax_dirs["float32"], path)
    _garble_data(path)
    proc = subprocess.run([sys.executable, "-m", "dsv4_jax.generate", "--checkpoint", str(path), "--prompt-ids",
                           "1,2", "--max-new-tokens", "1"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 2
    assert one_line_error(proc.stderr).startswith(f"error: orbax checkpoint {path} is corrupt or unreadable: ")


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"sharded": sharded_restores}[mode](*rest)
