"""Checkpoint import: every tensor-name spelling, sharding, dtypes, streaming, and the error messages.

One tiny 3-layer reference (SWA + CSA + HCA, hash + learned MoE) is built once; each test rewrites its
tensors into a fresh directory and loads it with ``from_pretrained``. Import correctness is proved by
logits equal to the PyTorch reference's within 1e-5 (relative to the largest logit).
"""

from __future__ import annotations

import json
import re
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import dsv4_jax
from conftest import tiny
from dsv4_jax.weights.errors import CheckpointError
from dsv4_jax.weights.names import canonical_name
from dsv4_jax.weights.params import param_table
from dsv4_jax.weights.safetensors_io import INDEX_FILE
from dsv4_jax.model.config import CSA, HASH_MOE, HCA, MOE, SLIDING

CFG = tiny(num_hidden_layers=3, layer_types=(SLIDING, CSA, HCA), mlp_layer_types=(HASH_MOE, MOE, MOE))
SINGLE = "model.safetensors"


class Saved:
    """The reference model, its save_pretrained directory and tensors, token ids and reference logits."""

    def __init__(self, root):
        from reference import build_reference, reference_logits, topk_boundary_gap

        self.ref = build_reference(CFG, seed=11)
        rng = np.random.RandomState(0)
        for _ in range(20):  # 7 CSA entries > index_topk 4, so the indexer weights matter; no tie at the boundary
            self.ids = rng.randint(0, CFG.vocab_size, (1, 29))
            if topk_boundary_gap(self.ref, self.ids, CFG) > 1e-6:
                break
        self.logits = reference_logits(self.ref, self.ids)
        self.path = root / "save_pretrained"
        self.ref.save_pretrained(self.path)
        self.tensors = read_tensors(self.path / SINGLE)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Saved:
    return Saved(tmp_path_factory.mktemp("checkpoint"))


def read_tensors(path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def write_checkpoint(path, saved: Saved, *shards: dict[str, np.ndarray], index: bool = False):
    """config.json plus one safetensors file per shard (HF shard names), optionally with an index."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(saved.path / "config.json", path / "config.json")
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    for name, tensors in zip(names, shards):
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path / name))
    if index:
        weight_map = {k: name for name, tensors in zip(names, shards) for k in tensors}
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def assert_matches_reference(path, saved: Saved):
    logits = np.asarray(dsv4_jax.from_pretrained(path, "float32")(saved.ids))
    assert logits.shape == saved.logits.shape
    err = np.abs(logits.astype(np.float64) - saved.logits).max() / np.abs(saved.logits).max()
    assert err < 1e-5, f"logits differ from the reference: max rel err {err:.2e}"


def official_name(name: str) -> str:
    """save_pretrained's mixed spelling -> DeepSeek's inference spelling (no ``model.`` prefix)."""
    s = name.removeprefix("model.")
    s = re.sub(r"^embed_tokens\.", "embed.", s)
    s = re.sub(r"^hc_head\.hc_", "hc_head_", s)
    return re.sub(r"\.attn\.norm\.", ".attn.kv_norm.", s)


# ----- loading every spelling -----------------------------------------------------------------

def test_save_pretrained_single_file(saved):
    assert [p.name for p in saved.path.glob("*.safetensors")] == [SINGLE]
    assert "model.layers.1.attn.wq_a.weight" in saved.tensors and "head.weight" in saved.tensors
    assert "model.layers.1.ffn.experts.3.w1.weight" in saved.tensors
    assert_matches_reference(saved.path, saved)


@pytest.mark.parametrize("keep_index", [True, False], ids=["with-index", "without-index"])
def test_save_pretrained_sharded(saved, tmp_path, keep_index):
    saved.ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    index = tmp_path / INDEX_FILE
    assert index.exists()
    if not keep_index:
        index.unlink()
    assert_matches_reference(tmp_path, saved)


def test_hf_internal_names_with_stacked_experts(saved, tmp_path):
    tensors = {k: v.numpy() for k, v in saved.ref.state_dict().items()}
    E, F, d = CFG.n_routed_experts, CFG.moe_intermediate_size, CFG.hidden_size
    assert tensors["model.layers.1.self_attn.q_a_proj.weight"].shape == (CFG.q_lora_rank, d)
    assert tensors["model.layers.1.mlp.experts.gate_up_proj"].shape == (E, 2 * F, d)
    assert tensors["model.layers.1.mlp.experts.down_proj"].shape == (E, d, F)
    tensors["model.rotary_emb.inv_freq"] = np.ones(CFG.qk_rope_head_dim // 2, np.float32)  # some exporters write it
    assert_matches_reference(write_checkpoint(tmp_path, saved, tensors), saved)


def test_deepseek_official_names(saved, tmp_path):
    tensors = {official_name(k): v for k, v in saved.tensors.items()}
    for name in ("layers.0.attn.wq_a.weight", "layers.2.attn.kv_norm.weight", "embed.weight", "norm.weight",
                 "hc_head_fn", "head.weight", "layers.1.attn.indexer.compressor.norm.weight"):
        assert name in tensors
    assert not any(k.startswith("model.") for k in tensors)
    # Released checkpoints also hold the MTP block, which a model loaded without mtp=True skips.
    tensors["mtp.0.e_proj.weight"] = np.zeros((CFG.hidden_size, CFG.hidden_size), np.float32)
    tensors["mtp.0.hc_head_fn"] = np.zeros((4, 4 * CFG.hidden_size), np.float32)
    assert_matches_reference(write_checkpoint(tmp_path, saved, tensors), saved)


@pytest.mark.parametrize("order", ["stored", "shuffled"])
def test_expert_matrices_go_to_the_devices_in_blocks(saved, tmp_path, monkeypatch, order):
    """Per-expert matrices are staged into blocks of consecutive experts and written a block at a time; in any
    stored order (shuffled over three files here) the load is exact, and no stack keeps more than
    _OPEN_BLOCKS blocks on the host."""
    from dsv4_jax.weights import checkpoint, placing

    tensors = {official_name(k): v for k, v in saved.tensors.items()}
    names = list(tensors)
    if order == "shuffled":
        names = [names[i] for i in np.random.RandomState(3).permutation(len(names))]
    shards = [{k: tensors[k] for k in part} for part in np.array_split(names, 3)]
    writes, most_open, real_write, real_add = [0], [0], placing.ShardedBuffer.write, checkpoint.ExpertStack.add

    def add(self, *args):
        real_add(self, *args)
        most_open[0] = max(most_open[0], len(self.blocks))

    monkeypatch.setattr(placing.ShardedBuffer, "write", lambda self, *a: writes.__setitem__(0, writes[0] + 1)
                        or real_write(self, *a))
    monkeypatch.setattr(checkpoint.ExpertStack, "add", add)
    assert_matches_reference(write_checkpoint(tmp_path, saved, *shards, index=True), saved)
    moe_layers, matrices = 3, 3 * CFG.n_routed_experts  # hash-routed layers hold routed experts too
    assert most_open[0] <= checkpoint._OPEN_BLOCKS
    if order == "shuffled":  # blocks were written part-filled to stay within the bound
        assert most_open[0] == checkpoint._OPEN_BLOCKS
    if order == "stored":  # blocks of E / 4 experts: 4 writes per matrix kind and layer
        assert writes[0] == moe_layers * 3 * 4 < moe_layers * matrices


def test_bf16_checkpoint(saved, tmp_path):
    """bf16 tensors load bit-exactly: projections stay bf16, fp32 parameters (norms, mHC, sinks) widen."""
    bf16 = {k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v for k, v in saved.tensors.items()}
    path = write_checkpoint(tmp_path, saved, bf16)
    with safe_open(str(path / SINGLE), framework="numpy") as f:
        assert f.get_slice("model.layers.0.attn.wq_a.weight").get_dtype() == "BF16"
    ours = param_table(dsv4_jax.from_pretrained(path, "bfloat16"))
    wide = param_table(dsv4_jax.from_pretrained(path, "float32"))
    assert ours["model.layers.0.self_attn.q_a_proj.weight"].get_value().dtype == np.dtype(ml_dtypes.bfloat16)
    assert ours["model.norm.weight"].get_value().dtype == np.float32
    for name, var in ours.items():
        np.testing.assert_array_equal(np.asarray(var.get_value()).astype(np.float32),
                                      np.asarray(wide[name].get_value()).astype(np.float32), err_msg=name)
    np.testing.assert_array_equal(np.asarray(wide["model.embed_tokens.weight"].get_value()),
                                  bf16["model.embed_tokens.weight"].astype(np.float32))


def test_tensors_are_streamed_not_loaded_all_at_once(saved, host_tensors_alive):
    """Every host array is released before the next one is read (at most the one in hand stays alive)."""
    dsv4_jax.from_pretrained(saved.path, "float32")
    assert host_tensors_alive["read"] == len(saved.tensors)
    assert host_tensors_alive["most_alive"] <= 1, f"{host_tensors_alive['most_alive']} host tensors were alive at once"


@pytest.mark.parametrize("name, canonical", [
    ("embed.weight", "model.embed_tokens.weight"),
    ("model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("head.weight", "lm_head.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("norm.weight", "model.norm.weight"),
    ("hc_head_scale", "model.hc_head.hc_scale"),
    ("model.hc_head.hc_fn", "model.hc_head.hc_fn"),
    ("layers.7.attn_norm.weight", "model.layers.7.input_layernorm.weight"),
    ("layers.7.ffn_norm.weight", "model.layers.7.post_attention_layernorm.weight"),
    ("layers.7.hc_attn_fn", "model.layers.7.attn_hc.fn"),
    ("layers.7.hc_ffn_base", "model.layers.7.ffn_hc.base"),
    ("model.layers.7.ffn_hc.scale", "model.layers.7.ffn_hc.scale"),
    ("layers.7.attn.wq_a.weight", "model.layers.7.self_attn.q_a_proj.weight"),
    ("layers.7.attn.q_norm.weight", "model.layers.7.self_attn.q_a_norm.weight"),
    ("layers.7.attn.wq_b.weight", "model.layers.7.self_attn.q_b_proj.weight"),
    ("layers.7.attn.wkv.weight", "model.layers.7.self_attn.kv_proj.weight"),
    ("layers.7.attn.kv_norm.weight", "model.layers.7.self_attn.kv_norm.weight"),
    ("model.layers.7.attn.norm.weight", "model.layers.7.self_attn.kv_norm.weight"),
    ("layers.7.attn.wo_a.weight", "model.layers.7.self_attn.o_a_proj.weight"),
    ("layers.7.attn.wo_b.weight", "model.layers.7.self_attn.o_b_proj.weight"),
    ("layers.7.attn.attn_sink", "model.layers.7.self_attn.sinks"),
    ("layers.7.attn.compressor.wkv.weight", "model.layers.7.self_attn.compressor.kv_proj.weight"),
    ("layers.7.attn.compressor.wgate.weight", "model.layers.7.self_attn.compressor.gate_proj.weight"),
    ("layers.7.attn.compressor.ape", "model.layers.7.self_attn.compressor.position_bias"),
    ("layers.7.attn.compressor.norm.weight", "model.layers.7.self_attn.compressor.kv_norm.weight"),
    ("layers.7.attn.indexer.wq_b.weight", "model.layers.7.self_attn.compressor.indexer.q_b_proj.weight"),
    ("layers.7.attn.indexer.weights_proj.weight",
     "model.layers.7.self_attn.compressor.indexer.scorer.weights_proj.weight"),
    ("layers.7.attn.indexer.compressor.wkv.weight", "model.layers.7.self_attn.compressor.indexer.kv_proj.weight"),
    ("layers.7.attn.indexer.compressor.wgate.weight",
     "model.layers.7.self_attn.compressor.indexer.gate_proj.weight"),
    ("layers.7.attn.indexer.compressor.ape", "model.layers.7.self_attn.compressor.indexer.position_bias"),
    ("layers.7.attn.indexer.compressor.norm.weight", "model.layers.7.self_attn.compressor.indexer.kv_norm.weight"),
    ("layers.7.ffn.gate.weight", "model.layers.7.mlp.gate.weight"),
    ("layers.7.ffn.gate.bias", "model.layers.7.mlp.gate.e_score_correction_bias"),
    ("layers.7.ffn.gate.tid2eid", "model.layers.7.mlp.gate.tid2eid"),
    ("layers.7.ffn.shared_experts.w1.weight", "model.layers.7.mlp.shared_experts.gate_proj.weight"),
    ("layers.7.ffn.shared_experts.w2.weight", "model.layers.7.mlp.shared_experts.down_proj.weight"),
    ("layers.7.ffn.shared_experts.w3.weight", "model.layers.7.mlp.shared_experts.up_proj.weight"),
    ("model.layers.7.mlp.experts.gate_up_proj", "model.layers.7.mlp.experts.gate_up_proj"),
])
def test_canonical_name(name, canonical):
    """Spec §11.2 official names, save_pretrained's mixed names and HF names all land on the HF name."""
    assert canonical_name(name) == (canonical, None)


@pytest.mark.parametrize("name, slot", [
    ("layers.7.ffn.experts.12.w1.weight", ("model.layers.7.mlp.experts.gate_up_proj", (12, 1))),
    ("model.layers.7.ffn.experts.0.w3.weight", ("model.layers.7.mlp.experts.gate_up_proj", (0, 3))),
    ("layers.7.ffn.experts.255.w2.weight", ("model.layers.7.mlp.experts.down_proj", (255, 2))),
])
def test_canonical_name_of_one_expert(name, slot):
    assert canonical_name(name) == slot


def test_hf_names_are_fixed_points(saved):
    for name in saved.ref.state_dict():
        assert canonical_name(name) == (name, None)


# ----- tensor-level errors --------------------------------------------------------------------

Q_A = "model.layers.1.attn.wq_a.weight"  # (q_lora_rank 32, hidden 64)
W2 = "model.layers.1.ffn.experts.3.w2.weight"  # (hidden 64, F 32)
TID2EID = "model.layers.0.ffn.gate.tid2eid"
SINK = "model.layers.2.attn.attn_sink"


def _without(*names):
    return lambda t: [{k: v for k, v in t.items() if k not in names}]


def _poison(name, value, at=(0,)):
    def edit(t):
        array = t[name].copy()
        array[at] = value
        return [{**t, name: array}]
    return edit


def _set(name, make):
    return lambda t: [{**t, name: make(t)}]


def _second_shard(*names):
    return lambda t: [t, {k: t[k] for k in names}]


TENSOR_ERRORS = {
    "missing": (_without(Q_A), r"missing 1 tensor\(s\): model\.layers\.1\.self_attn\.q_a_proj\.weight \(32, 64\)"),
    "missing-many": (_without("model.norm.weight", Q_A, SINK, TID2EID, "head.weight",
                                      "model.layers.0.attn.wkv.weight"),
                     r"missing 6 tensor\(s\): .* \(and 1 more\)"),
    "unexpected": (_set("model.layers.0.attn.bogus.weight", lambda t: np.zeros(3, np.float32)),
                   r"unexpected tensor model\.layers\.0\.attn\.bogus\.weight \(3,\) in model\.safetensors"),
    "wrong-shape": (_set(Q_A, lambda t: t[Q_A].T),
                    r"tensor model\.layers\.1\.attn\.wq_a\.weight has shape \(64, 32\) in model\.safetensors "
                    r"but the config expects \(32, 64\)"),
    "wrong-shape-expert": (_set(W2, lambda t: t[W2].T),
                           r"tensor .*experts\.3\.w2\.weight has shape \(32, 64\) .* expects \(64, 32\)"),
    "duplicate-across-shards": (_second_shard("model.norm.weight"),
                                r"tensor model\.norm\.weight appears twice \(again in model-00002-of-00002"),
    "duplicate-expert-across-shards": (_second_shard(W2), r"experts\.3\.w2\.weight appears twice"),
    "duplicate-in-two-spellings": (_set("model.layers.1.self_attn.q_a_proj.weight", lambda t: t[Q_A]),
                                   r"q_a_proj\.weight appears twice"),
    "missing-expert-matrix": (_without("model.layers.2.ffn.experts.5.w3.weight"),
                              r"missing tensor model\.layers\.2\.(ffn|mlp)\.experts\.5\.w3\.weight"),
    "expert-out-of-range": (_set("model.layers.1.ffn.experts.8.w1.weight",
                                 lambda t: t["model.layers.1.ffn.experts.0.w1.weight"]),
                            r"experts\.8\.w1\.weight .*expert 8 is outside \[0, 8\)"),
    "scale-of-unquantised-weight": (_set("model.layers.1.attn.wq_a.scale", lambda t: np.ones((1, 1), np.float32)),
                                    r"quantisation scale model\.layers\.1\.attn\.wq_a\.scale in model\.safetensors "
                                    r"belongs to model\.layers\.1\.attn\.wq_a\.weight, which is stored as F32"),
    "scale-without-weight": (_set("model.layers.1.attn.wq_a.weight.scale", lambda t: np.ones((1, 1), np.float32)),
                             r"scale model\.layers\.1\.attn\.wq_a\.weight\.scale in model\.safetensors has no "
                             r"weight model\.layers\.1\.attn\.wq_a\.weight\.weight"),
    "scale-inv-without-weight": (_set("model.layers.1.self_attn.q_a_proj.weight_scale_inv",
                                      lambda t: np.ones((1, 1), np.float32)),
                                 r"q_a_proj\.weight_scale_inv in model\.safetensors has no weight "
                                 r"model\.layers\.1\.self_attn\.q_a_proj\.weight"),
    "nan": (_poison(SINK, np.nan), r"tensor model\.layers\.2\.attn\.attn_sink in model\.safetensors holds NaN"),
    "inf-in-expert": (_poison(W2, np.inf, (0, 0)), r"experts\.3\.w2\.weight in model\.safetensors holds NaN or inf"),
    "tid2eid-too-large": (_poison(TID2EID, 8, (5, 1)), r"gate\.tid2eid in model\.safetensors routes to expert 8"),
    "tid2eid-negative": (_poison(TID2EID, -1, (5, 1)), r"gate\.tid2eid .* -1, outside \[0, 8\)"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_ERRORS))
def test_tensor_error(saved, tmp_path, case):
    edit, message = TENSOR_ERRORS[case]
    path = write_checkpoint(tmp_path, saved, *edit(saved.tensors))
    with pytest.raises(CheckpointError, match=message):
        dsv4_jax.from_pretrained(path, "float32")


def test_experts_given_both_stacked_and_per_expert_are_a_duplicate(saved, tmp_path):
    """The same parameter in two spellings is an error, for experts too (stacked and per-expert)."""
    stacked = saved.ref.state_dict()["model.layers.1.mlp.experts.gate_up_proj"].numpy()
    path = write_checkpoint(tmp_path, saved, {**saved.tensors, "model.layers.1.mlp.experts.gate_up_proj": stacked})
    with pytest.raises(CheckpointError, match=r"experts\.gate_up_proj is given both stacked and as per-expert matrices"):
        dsv4_jax.from_pretrained(path, "float32")


def test_torch_written_fp8_checkpoint_loads(saved, tmp_path):
    """A released FP8 checkpoint stores float8_e4m3fn weights with float8_e8m0fnu scales (spec §11.1), which
    safetensors' numpy reader cannot return; written by torch here, they load as torch's own fp8 -> fp32
    conversion times the scale (more cases in test_quantized_checkpoint.py)."""
    import torch
    from safetensors.torch import save_file as save_torch

    tensors = {k: torch.from_numpy(v) for k, v in saved.tensors.items()}
    fp8 = tensors[Q_A].to(torch.float8_e4m3fn)
    tensors[Q_A] = fp8
    tensors["model.layers.1.attn.wq_a.scale"] = torch.full((1, 1), 0.25).to(torch.float8_e8m0fnu)
    path = write_checkpoint(tmp_path, saved, {})
    save_torch(tensors, str(path / SINGLE))
    for dequantize in (False, True):  # kept as released (a QuantArray), or dequantised at load
        value = param_table(dsv4_jax.from_pretrained(path, "float32", dequantize=dequantize))[
            "model.layers.1.self_attn.q_a_proj.weight"].get_value()
        assert hasattr(value, "dequantize") != dequantize
        np.testing.assert_array_equal(np.asarray(value if dequantize else value.dequantize()),
                                      fp8.float().numpy() * 0.25)


# ----- file-level errors ----------------------------------------------------------------------

def _corrupt(path):
    (path / SINGLE).write_bytes(b"\x00garbage, not a safetensors header" * 10)


def _truncate(path):
    data = (path / SINGLE).read_bytes()
    (path / SINGLE).write_bytes(data[: len(data) // 2])


def _index_names_missing_shard(path):
    (path / INDEX_FILE).write_text(json.dumps(
        {"weight_map": {"head.weight": SINGLE, "model.norm.weight": "model-00002-of-00002.safetensors"}}))


FILE_ERRORS = {
    "garbage-file": (_corrupt, CheckpointError, r"checkpoint file .*model\.safetensors is corrupt or unreadable"),
    "truncated-file": (_truncate, CheckpointError, r"checkpoint file .*model\.safetensors is corrupt or unreadable"),
    "index-names-missing-shard": (_index_names_missing_shard, CheckpointError,
                                  r"index .*model\.safetensors\.index\.json names model-00002-of-00002\.safetensors, "
                                  r"which does not exist"),
    "corrupt-index": (lambda p: (p / INDEX_FILE).write_text("{not json"), CheckpointError,
                      r"checkpoint index .*index\.json is corrupt"),
    "no-config": (lambda p: (p / "config.json").unlink(), CheckpointError, r"checkpoint directory .* has no config\.json"),
    "bad-config": (lambda p: (p / "config.json").write_text('{"model_type": "deepseek_v4"}'), CheckpointError,
                   r"config\.json: config has neither 'layer_types' nor 'compress_ratios'"),
    "no-directory": (shutil.rmtree, CheckpointError, r"checkpoint directory .*ckpt does not exist"),
    "no-safetensors": (lambda p: (p / SINGLE).unlink(), CheckpointError,
                       r"no \*\.safetensors files in checkpoint directory .*ckpt"),
}


@pytest.mark.parametrize("case", sorted(FILE_ERRORS))
def test_file_error(saved, tmp_path, case):
    damage, error, message = FILE_ERRORS[case]
    path = write_checkpoint(tmp_path / "ckpt", saved, saved.tensors)
    damage(path)
    with pytest.raises(error, match=message):
        dsv4_jax.from_pretrained(path, "float32")


def test_bad_dtype_string(saved):
    with pytest.raises(ValueError, match=r"dtype 'float16' is not supported; expected 'bfloat16' or 'float32'"):
        dsv4_jax.from_pretrained(saved.path, "float16")


def test_load_progress_line():
    """The report is one line rewritten in place, then the totals; nothing below its size threshold."""
    import io

    from dsv4_jax.weights.progress import ByteProgress

    times = iter([0.0, 1.0, 1.2, 2.0, 4.0])
    out = io.StringIO()
    p = ByteProgress(4 * 10**9, "loading weights", stream=out, clock=lambda: next(times))
    p.update(10**9)  # t 1.0: shown
    p.update(10**9)  # t 1.2: within the interval, not shown
    p.update(10**9)  # t 2.0: shown
    p.close()  # t 4.0
    assert out.getvalue() == ("\rloading weights: 1.0 / 4.0 GB, 1.00 GB/s (25%, 3 s left)"
                              "\rloading weights: 3.0 / 4.0 GB, 1.50 GB/s (75%, 1 s left)"
                              "\rloading weights: 3.0 / 4.0 GB, 0.75 GB/s, 4.0 s\n")
    quiet = io.StringIO()
    for p in (ByteProgress(10**6, "x", stream=quiet), ByteProgress(4 * 10**9, "x", enabled=False, stream=quiet)):
        p.update(10**6)
        p.close()
    assert quiet.getvalue() == ""
