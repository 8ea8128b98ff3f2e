"""scripts/make_checkpoint.py (a random checkpoint in the released format) and random_init.released_params
(the same released-format values built on the device, without a file).

A tiny config (FP8 blocks with ragged edges, FP4 experts, hash and learned routers, CSA / HCA compressors, the
MTP block) is written through the command line from a config.json, truncated by --layers and widened by
--experts, in shards of at most 200 KB. The files must be valid safetensors (the safetensors library reads
every tensor, byte for byte what our reader reads), the index must list every tensor exactly once, the
loaded model must equal, tensor by tensor, quantization.py's dequantisation of the same draws, the writer
must hold one piece's tensors at a time, and the on-device generator must give the file's bits.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

import dsv4_jax
from conftest import tiny
from dsv4_jax.model.config import CSA, HASH_MOE, HCA, MOE, SLIDING, DeepseekV4Config
from dsv4_jax.model.spec import storage_of
from dsv4_jax.weights import quantization, random_init
import released_format
from dsv4_jax.weights.names import canonical_name
from dsv4_jax.weights.params import abstract_model, param_table
from dsv4_jax.weights.quant_array import QuantArray
from dsv4_jax.weights.safetensors_io import INDEX_FILE, catalog, read_header, read_tensor
from scripts import make_checkpoint as mk
from test_config import FLASH_JSON

# hidden 160: FP8 scales [1, 2] / [2, 1] (ragged 128-blocks); written from 4 layers and 6 experts.
BASE = tiny(hidden_size=160, num_hidden_layers=4, layer_types=(SLIDING, CSA, HCA, CSA),
            mlp_layer_types=(HASH_MOE, MOE, MOE, MOE), n_routed_experts=6)
CFG = dataclasses.replace(BASE, num_hidden_layers=3, layer_types=BASE.layer_types[:3],
                          mlp_layer_types=BASE.mlp_layer_types[:3], n_routed_experts=8)
SEED, SHARD = 5, 200_000


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a)).reshape(-1).view(np.uint8)


class Written:
    """The checkpoint the command line writes, and how many earlier pieces' arrays were alive at each draw."""

    def __init__(self, root):
        self.config = root / "base.json"
        self.config.write_text(json.dumps(BASE.to_hf_dict()))
        self.path = root / "ckpt"
        self.argv = [str(self.path), "--config", str(self.config), "--layers", "3", "--experts", "8",
                     "--shard-size", "200KB", "--seed", str(SEED), "--mtp"]
        live, self.most_alive = [], 0
        real = mk.generate

        def spy(*args):
            self.most_alive = max(self.most_alive, sum(r() is not None for r in live))
            arrays = real(*args)
            live.extend(weakref.ref(a) for a in arrays)
            return arrays

        with pytest.MonkeyPatch.context() as m:
            m.setattr(mk, "generate", spy)
            assert mk.main(self.argv) == 0
        self.files = sorted(self.path.glob("*.safetensors"))
        self.stored = catalog(self.files)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Written:
    return Written(tmp_path_factory.mktemp("make_checkpoint"))


def expected_values(cfg: DeepseekV4Config, seed: int) -> dict[str, np.ndarray]:
    """Canonical name -> quantization.py's dequantisation of the parameter's draws (stacked experts: drawn
    expert by expert, each [2F, d] or [d, F] matrix quantised whole), fp32 (int32 for the hash table)."""
    out = {}
    for name, var in param_table(abstract_model(cfg, jnp.float32, mtp=True)).items():
        shape, kind = tuple(var.get_value().shape), random_init.released_kind(name, storage_of(var))
        key = random_init.param_key(seed, name)
        draw = [random_init.released_draw(jax.random.fold_in(key, e), name, shape[1:], cfg.n_routed_experts)
                for e in range(shape[0])] if len(shape) == 3 else [random_init.released_draw(key, name, shape,
                                                                                            cfg.n_routed_experts)]
        draw = [np.asarray(d) for d in draw]
        if kind == random_init.FP8:
            draw = [quantization.dequantise_fp8(*released_format.quantise_fp8_blocks(d)) for d in draw]
        elif kind == random_init.FP4:
            draw = [quantization.dequantise_fp4(*released_format.quantise_fp4(d)) for d in draw]
        elif kind == random_init.BF16:
            draw = [d.astype(ml_dtypes.bfloat16).astype(np.float32) for d in draw]
        out[name] = np.stack(draw) if len(shape) == 3 else draw[0]
    return out


def test_shards_index_and_config(written):
    sizes = [f.stat().st_size for f in written.files]
    assert len(sizes) >= 3 and max(sizes) <= SHARD, sizes
    assert [f.name for f in written.files] == mk.shard_names(len(sizes))
    index = json.loads((written.path / INDEX_FILE).read_text())
    headers = {f.name: read_header(f) for f in written.files}
    held = [(name, f) for f, header in headers.items() for name in header]
    assert sorted(index["weight_map"].items()) == sorted(held)  # every tensor once, in the file it is in
    assert index["metadata"]["total_size"] == sum(t.end - t.start for t in written.stored.values())
    assert DeepseekV4Config.from_json(written.path / "config.json") == CFG
    # official names and released dtypes (tests/test_quantized_checkpoint.py's fixture spells them so)
    d, F = CFG.hidden_size, CFG.moe_intermediate_size
    for name, (dtype, shape) in {
        "embed.weight": ("BF16", (CFG.vocab_size, d)), "head.weight": ("BF16", (CFG.vocab_size, d)),
        "norm.weight": ("BF16", (d,)), "hc_head_scale": ("F32", (1,)),
        "layers.1.attn.wq_a.weight": ("F8_E4M3", (CFG.q_lora_rank, d)), "layers.1.attn.wq_a.scale": ("F8_E8M0", (1, 2)),
        "layers.1.attn.wo_b.scale": ("F8_E8M0", (2, 1)), "layers.1.attn.kv_norm.weight": ("BF16", (CFG.head_dim,)),
        "layers.1.attn.indexer.wq_b.scale": ("F8_E8M0", (1, 1)), "layers.1.attn.compressor.ape": ("F32", (4, 64)),
        "layers.1.attn.indexer.compressor.norm.weight": ("BF16", (CFG.index_head_dim,)),
        "layers.1.ffn.experts.7.w1.weight": ("I8", (F, d // 2)), "layers.1.ffn.experts.7.w1.scale": ("F8_E8M0", (F, 5)),
        "layers.2.ffn.experts.0.w2.weight": ("I8", (d, F // 2)),
        "layers.2.ffn.shared_experts.w2.weight": ("F8_E4M3", (d, F)),
        "layers.0.ffn.gate.tid2eid": ("I64", (CFG.vocab_size, CFG.num_experts_per_tok)),
        "layers.1.ffn.gate.bias": ("F32", (8,)), "layers.0.hc_attn_fn": ("F32", (24, 4 * d)),
        "mtp.0.e_proj.weight": ("F8_E4M3", (d, d)), "mtp.0.hc_head_fn": ("F32", (4, 4 * d)),
        "mtp.0.ffn.experts.7.w3.weight": ("I8", (F, d // 2)), "mtp.0.enorm.weight": ("BF16", (d,)),
    }.items():
        assert (written.stored[name].dtype, written.stored[name].shape) == (dtype, shape), name
    assert {canonical_name(n)[0] for n in written.stored if not n.endswith(".scale")} == set(
        param_table(abstract_model(CFG, jnp.float32, mtp=True)))


def test_the_safetensors_library_reads_every_tensor(written):
    import torch

    for f in written.files:
        with safe_open(f, "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            assert sorted(handle.keys()) == sorted(read_header(f))
            for name in handle.keys():
                raw = handle.get_tensor(name).view(torch.uint8).numpy().reshape(-1)
                np.testing.assert_array_equal(raw, bits(read_tensor(written.stored[name])), name)


@pytest.mark.parametrize("dequantize", [False, True])
def test_loads_as_the_dequantised_draws(written, dequantize):
    """Kept as released (FP8 / FP4 as QuantArrays) or dequantised at load: the same values either way."""
    model = dsv4_jax.from_pretrained(written.path, "float32", mtp=True, dequantize=dequantize)
    want = expected_values(CFG, SEED)
    table = param_table(model)
    assert sorted(table) == sorted(want)
    for name, var in table.items():
        value = var.get_value()
        kind = random_init.released_kind(name, storage_of(var))
        assert isinstance(value, QuantArray) == (not dequantize and kind in (random_init.FP8, random_init.FP4)), name
        got = value.dequantize() if isinstance(value, QuantArray) else value
        np.testing.assert_array_equal(np.asarray(got), want[name], err_msg=name)


def test_released_model_is_the_loaded_checkpoint(written):
    """random_init.released_model (no file) holds the loaded checkpoint's arrays bit for bit."""
    loaded = param_table(dsv4_jax.from_pretrained(written.path, "bfloat16", mtp=True))
    built = param_table(random_init.released_model(CFG, jnp.bfloat16, SEED, mtp=True))
    assert sorted(loaded) == sorted(built)
    for name, var in loaded.items():
        got, want = jax.tree.leaves(var.get_value()), jax.tree.leaves(built[name].get_value())
        assert [a.dtype for a in got] == [a.dtype for a in want], name
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(bits(a), bits(b), err_msg=name)


def test_device_memory_within_5_percent_of_the_files(written):
    """Kept as released, the weights take about the checkpoint's bytes on the device (norms are held in fp32
    where the files store bf16, the hash table in int32 where they store int64)."""
    model = dsv4_jax.from_pretrained(written.path, "bfloat16", mtp=True)
    held = sum(a.nbytes for var in param_table(model).values() for a in jax.tree.leaves(var.get_value()))
    stored = sum(t.end - t.start for t in written.stored.values())
    assert abs(held / stored - 1) < 0.05, (held, stored)


def test_cli_generates_the_same_tokens_released_or_dequantised(written):
    """The CLI with the checkpoint as released and with --dequantize (two processes at once: each mostly
    compiles) gives the tokens of the dequantised model's engine."""
    ids = [5, 17, 3, 99, 42, 7, 1, 250, 8]
    procs = {flag: subprocess.Popen([sys.executable, "-m", "dsv4_jax.generate", "--checkpoint", str(written.path),
                                     "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "4", "--dtype",
                                     "float32", "--json", *flag], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, cwd=Path(mk.__file__).parents[1])
             for flag in ((), ("--dequantize",))}
    engine = dsv4_jax.Engine(dsv4_jax.from_pretrained(written.path, "float32", dequantize=True), capacity=16)
    want = engine.generate([ids], 4)[0].tokens
    for flag, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (flag, err[-2000:])
        assert json.loads(out.strip().splitlines()[-1])["tokens"] == want, flag


def test_one_piece_at_a_time(written):
    assert written.most_alive <= 1, f"{written.most_alive} arrays of earlier pieces were alive at a draw"


def test_on_device_generator_gives_the_files_bits(written):
    params = random_init.released_params(CFG, SEED, mtp=True)
    assert sorted(params) == sorted(param_table(abstract_model(CFG, jnp.float32, mtp=True)))
    checked = set()
    for piece in mk.pieces(CFG, mtp=True):
        value = params[piece.canonical]
        assert isinstance(value, QuantArray) == (piece.kind in (random_init.FP8, random_init.FP4)), piece.canonical
        arrays = (value.values, value.scales) if isinstance(value, QuantArray) else (value,)
        if piece.expert is not None:
            arrays = tuple(a[piece.expert] for a in arrays)
        got = [a[rows] for _, rows in piece.parts for a in arrays]
        for t, device in zip(mk.stored_tensors(piece), got, strict=True):
            stored = read_tensor(written.stored[t.name])
            if t.tag == "I64":
                assert device.dtype == jnp.int32
                np.testing.assert_array_equal(np.asarray(device), stored, t.name)
            else:
                assert np.asarray(device).dtype == stored.dtype, t.name
                np.testing.assert_array_equal(bits(device), bits(stored), t.name)
            checked.add(t.name)
    assert checked == set(written.stored)


def test_device_quantisers_give_quantization_py_bits():
    """Magnitudes over 60 decades, empty blocks, FP4 ties in both signs, ragged FP8 blocks."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((300, 224)) * 10.0 ** rng.uniform(-30, 30, (300, 1))).astype(np.float32)
    w[:5, :40] = 0
    w[5, :32] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0] + [0.0] * 22 + [6.0]
    w[6, 64:96] = -w[5, :32]
    for host, device in ((released_format.quantise_fp8_blocks, quantization.quantise_fp8_blocks),
                         (released_format.quantise_fp4, quantization.quantise_fp4)):
        for a, b in zip(host(w), jax.jit(device)(w), strict=True):
            assert np.asarray(b).dtype == a.dtype and b.shape == a.shape
            np.testing.assert_array_equal(bits(b), bits(a))


def test_released_config_spelling():
    """Flash's config.json as shipped holds every key we write, with the same value; ours parses back."""
    ours = mk.released_config(DeepseekV4Config.flash(), mtp=True)
    assert ours == {k: FLASH_JSON[k] for k in ours}
    for cfg, mtp in ((DeepseekV4Config.flash(), True), (DeepseekV4Config.pro(num_hidden_layers=5), False), (CFG, True),
                     (dataclasses.replace(CFG, mlp_layer_types=(MOE, HASH_MOE, MOE)), False)):
        want = dataclasses.replace(cfg, num_nextn_predict_layers=int(mtp))
        assert DeepseekV4Config.from_hf_dict(mk.released_config(cfg, mtp)) == want


def test_overwrite_replaces_only_the_checkpoint_files(written, tmp_path, capsys):
    out = tmp_path / "again"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00009-of-00009.safetensors").write_bytes(b"stale")
    argv = [str(out), "--config", str(written.config), "--layers", "1", "--experts", "8", "--shard-size", "200KB"]
    assert mk.main(argv) == 2
    assert mk.main(argv + ["--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and not (out / "model-00009-of-00009.safetensors").exists()
    assert "bytes" in capsys.readouterr().out
    model = dsv4_jax.from_pretrained(out, "float32")
    assert model.config == dataclasses.replace(CFG, num_hidden_layers=1, layer_types=CFG.layer_types[:1],
                                               mlp_layer_types=CFG.mlp_layer_types[:1], num_nextn_predict_layers=0)


ERRORS = {
    "layers": (["--layers", "5"], r"--layers 5 must be in \[1, 4\], the layers of --config "),
    "experts": (["--experts", "1"], r"num_experts_per_tok 2 exceeds n_routed_experts 1"),
    "shard-size": (["--shard-size", "10KB"], r"--shard-size 10\.00 KB is smaller than the file of tensor "
                                             r"head\.weight alone \(82\.\d\d KB\)"),
    "shard-size-text": (["--shard-size", "big"], r"--shard-size 'big' must be a positive size"),
    "config": (["--config", "nope"], r"--config 'nope' is not flash, pro, a config\.json or a checkpoint directory"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error(written, tmp_path, capsys, case):
    args, message = ERRORS[case]
    argv = [str(tmp_path / "out"), "--config", str(written.config), *args]
    assert mk.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_error_model_larger_than_the_free_disk(written, tmp_path, capsys, monkeypatch):
    """Refused before anything is written, naming both sizes; the size planned is the size written."""
    need = sum(f.stat().st_size for f in written.path.iterdir())
    monkeypatch.setattr(mk.shutil, "disk_usage", lambda path: type("Usage", (), {"free": need - 1})())
    assert mk.main([str(tmp_path / "out"), *written.argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"the checkpoint needs {need} bytes" in err and f"{tmp_path} has {need - 1} bytes" in err, err
    assert not (tmp_path / "out").exists()


def test_error_non_empty_out_from_the_command_line(written):
    run = subprocess.run([sys.executable, "-m", "scripts.make_checkpoint", *written.argv], capture_output=True,
                         text=True, cwd=Path(mk.__file__).parents[1])
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"error: OUT {written.path} exists and is not empty; pass --overwrite to replace its " \
                         "checkpoint files\n"
