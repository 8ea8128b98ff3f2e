"""DeepSeek's released checkpoint formats (spec §11.1) and the MTP block (spec §10).

Quantisers: dequantisation against torch's float8 conversion and the spec's formulas written out
element by element; on-grid values round-trip bitwise; random values stay within the format's rounding
bound. Checkpoints: a tiny reference model (transformers' DeepseekV4ForCausalLM) and an MTP block
composed from transformers' own decoder layer are snapped to the released formats' values, written in
DeepSeek's names and dtypes (FP8 linears with ue8m0 scales, FP4 packed experts, bf16 / fp32 / int64 for
the rest, the ``mtp.0.*`` tensors), single-file and sharded with scales in other shards; the loaded
parameters (kept as released by default, dequantised at load with ``dequantize=True``) must equal the
dequantised values exactly, and the main and MTP logits must match the PyTorch reference within 1e-5 (fp32,
relative to the largest logit).
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import dsv4_jax
from conftest import tiny
from dsv4_jax.weights.errors import CheckpointError
from dsv4_jax.weights.names import canonical_name
from dsv4_jax.model.spec import Storage, storage_of
from dsv4_jax.weights.params import abstract_model, param_table
from dsv4_jax.weights.quant_array import QuantArray
from dsv4_jax.weights.safetensors_io import INDEX_FILE, catalog
from dsv4_jax.model.config import CSA, HASH_MOE, HCA, MOE, SLIDING
from dsv4_jax.model.mtp import DeepseekV4WithMTP, mtp_config, mtp_logits
from dsv4_jax.weights.quantization import (
    E2M1_MAX, E4M3_MAX, dequantise_fp4, dequantise_fp8)
from released_format import quantise_fp4, quantise_fp8_blocks
from test_checkpoint import official_name, read_tensors

E4M3 = ml_dtypes.float8_e4m3fn
E8M0 = ml_dtypes.float8_e8m0fnu


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def block_index(scale: np.ndarray, rows: int, cols: int, block_rows: int, block_cols: int) -> np.ndarray:
    """scale [R, C] -> [rows, cols]: each element's block scale, by explicit indexing."""
    return scale[np.arange(rows)[:, None] // block_rows, np.arange(cols)[None, :] // block_cols]


def ue8m0_value(scale_bytes: np.ndarray) -> np.ndarray:
    """The ue8m0 definition: byte b means 2^(b - 127)."""
    return np.ldexp(1.0, scale_bytes.astype(np.int64) - 127)


# ----- the quantisers -------------------------------------------------------------------------

def test_fp8_dequantise_matches_torch_and_the_spec():
    rng = np.random.default_rng(0)
    w = rng.integers(0, 256, (300, 200), np.uint8)
    w[(w & 0x7F) == 0x7F] = 0  # e4m3fn's NaN codes
    s = rng.integers(110, 140, (3, 2), np.uint8)
    ours = dequantise_fp8(w.view(E4M3), s.view(E8M0))
    torch_w = torch.from_numpy(w).view(torch.float8_e4m3fn).float().numpy()
    torch_s = torch.from_numpy(s).view(torch.float8_e8m0fnu).float().numpy()
    np.testing.assert_array_equal(torch_s, ue8m0_value(s))
    np.testing.assert_array_equal(ours, torch_w * block_index(torch_s, 300, 200, 128, 128))
    # transformers' fp32 ``weight_scale_inv`` multiplies too; leading axes (stacked experts) are batch axes
    np.testing.assert_array_equal(dequantise_fp8(w.view(E4M3), torch_s), ours)
    stacked = dequantise_fp8(np.stack([w, w[::-1]]).view(E4M3), np.stack([s, s[::-1]]).view(E8M0))
    np.testing.assert_array_equal(stacked[0], ours)
    np.testing.assert_array_equal(stacked[1], dequantise_fp8(w[::-1].view(E4M3), s[::-1].view(E8M0)))


def test_fp4_dequantise_matches_the_spec_element_by_element():
    rng = np.random.default_rng(1)
    packed = rng.integers(0, 256, (3, 32), np.uint8)  # [out 3, in 64 / 2]
    s = rng.integers(120, 135, (3, 2), np.uint8)  # [out, in / 32]
    lut = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    want = np.zeros((3, 64), np.float32)
    for o in range(3):
        for c in range(64):
            byte = int(packed[o, c // 2])
            code = byte & 0xF if c % 2 == 0 else byte >> 4  # low nibble = even column
            want[o, c] = lut[code] * 2.0 ** (int(s[o, c // 32]) - 127)
    got = dequantise_fp4(packed.view(np.int8), s.view(E8M0))
    np.testing.assert_array_equal(bits(got), bits(want))  # bitwise: the sign of -0 too


def fp8_on_grid(rng, shape):
    """(e4m3 codes, ue8m0 scales) as the quantiser would choose them: every block's largest magnitude in
    (224, 448], so the block's power-of-two scale is the smallest that fits it."""
    codes = rng.integers(0, 256, shape, np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0
    rows, cols = -(-shape[0] // 128), -(-shape[1] // 128)
    big = np.array([240, 256, 288, 320, 352, 384, 416, 448], np.float32)
    for i in range(rows):
        for j in range(cols):
            value = rng.choice(big) * rng.choice([-1, 1])
            codes[i * 128 + rng.integers(0, min(128, shape[0] - i * 128)),
                  j * 128 + rng.integers(0, min(128, shape[1] - j * 128))] = bits(np.array([value]).astype(E4M3))[0]
    scales = rng.integers(100, 150, (rows, cols), np.uint8)
    return codes.view(E4M3), scales.view(E8M0)


def test_fp8_values_on_the_grid_round_trip_bitwise():
    rng = np.random.default_rng(2)
    codes, scales = fp8_on_grid(rng, (300, 200))
    w = dequantise_fp8(codes, scales)
    q, s = quantise_fp8_blocks(w)
    np.testing.assert_array_equal(bits(q), bits(codes))
    np.testing.assert_array_equal(bits(s), bits(scales))
    np.testing.assert_array_equal(bits(dequantise_fp8(q, s)), bits(w))


def test_fp8_random_values_within_the_format_error():
    """e4m3 keeps 3 mantissa bits: rounding to nearest moves a normal value by at most half a step,
    2^-4 of its magnitude; below the smallest normal (2^-6 * scale) the steps are 2^-9 * scale, so the
    error is at most 2^-10 * scale. The scale is the smallest power of two with block max <= 448 * scale."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((300, 200)) * 10.0 ** rng.uniform(-3, 3, (300, 1))).astype(np.float32)
    w[:128, 128:] = 0  # an empty block
    q, s = quantise_fp8_blocks(w)
    assert q.dtype == E4M3 and s.dtype == E8M0 and s.shape == (3, 2)
    scale = block_index(s.astype(np.float32), 300, 200, 128, 128)
    err = np.abs(dequantise_fp8(q, s) - w)
    assert (err <= np.maximum(2.0**-4 * np.abs(w), 2.0**-10 * scale)).all()
    amax = np.abs(np.pad(w, ((0, 84), (0, 56)))).reshape(3, 128, 2, 128).max(axis=(1, 3))
    sv = s.astype(np.float32)
    filled = amax > 0
    assert (amax <= E4M3_MAX * sv).all() and (amax[filled] > E4M3_MAX / 2 * sv[filled]).all()
    assert sv[0, 1] == 1.0 and not dequantise_fp8(q, s)[:128, 128:].any()


def test_fp4_values_on_the_grid_round_trip_bitwise():
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 16, (6, 96), np.uint8)
    for o in range(6):
        for b in range(3):  # each 32-block holds a 4 or a 6, so its scale is the smallest that fits
            codes[o, b * 32 + rng.integers(0, 32)] = rng.choice([6, 7, 14, 15])
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(np.int8)
    scales = rng.integers(110, 140, (6, 3), np.uint8).view(E8M0)
    w = dequantise_fp4(packed, scales)
    p, s = quantise_fp4(w)
    np.testing.assert_array_equal(p, packed)
    np.testing.assert_array_equal(bits(s), bits(scales))
    np.testing.assert_array_equal(bits(dequantise_fp4(p, s)), bits(w))


def test_fp4_random_values_within_the_format_error():
    """e2m1 keeps 1 mantissa bit: a value of magnitude >= 1 * scale moves by at most half a step, 1/4 of its
    magnitude; below that the grid steps are 0.5 * scale, so the error is at most 0.25 * scale. The scale
    is the smallest power of two with block max <= 6 * scale."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((7, 128)) * 10.0 ** rng.uniform(-3, 3, (7, 1))).astype(np.float32)
    p, s = quantise_fp4(w)
    assert p.dtype == np.int8 and p.shape == (7, 64) and s.dtype == E8M0 and s.shape == (7, 4)
    scale = block_index(s.astype(np.float32), 7, 128, 1, 32)
    err = np.abs(dequantise_fp4(p, s) - w)
    assert (err <= np.maximum(np.abs(w) / 4, scale / 4)).all()
    amax = np.abs(w).reshape(7, 4, 32).max(-1)
    sv = s.astype(np.float32)
    assert (amax <= E2M1_MAX * sv).all() and (amax > E2M1_MAX / 2 * sv).all()


def test_fp4_ties_round_to_the_even_code():
    """Midpoints between e2m1 neighbours go to the code with mantissa bit 0 (IEEE round half to even)."""
    mid = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0], np.float32)
    want = np.array([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0], np.float32)
    w = np.zeros((1, 32), np.float32)
    w[0, : len(mid)], w[0, -1] = mid, 6.0  # the 6 pins the block's scale to 1
    got = dequantise_fp4(*quantise_fp4(w))[0]
    np.testing.assert_array_equal(bits(got[: len(mid)]), bits(want))


# ----- released-format checkpoints ------------------------------------------------------------

# hidden 160: FP8 blocks of 128 with a ragged edge (scales [1, 2], [2, 1]); FP4 blocks of 32 fit exactly.
CFG = tiny(hidden_size=160, num_hidden_layers=3, layer_types=(SLIDING, CSA, HCA),
           mlp_layer_types=(HASH_MOE, MOE, MOE))
N = CFG.num_hidden_layers
ABSTRACT_WITH_MTP = abstract_model(CFG, np.float32, mtp=True)
FP8_SUFFIXES = tuple(f"{p}.weight" for p in (
    "self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_proj", "self_attn.o_a_proj", "self_attn.o_b_proj",
    "indexer.q_b_proj", "shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj",
    "mtp.0.e_proj", "mtp.0.h_proj"))
FP32_SUFFIXES = ("sinks", "position_bias", "e_score_correction_bias", "_hc.fn", "_hc.base", "_hc.scale", "hc_fn",
                 "hc_base", "hc_scale")


def release_kind(canonical: str) -> str:
    """How spec §11.1 stores a parameter (by its canonical name)."""
    if canonical.endswith(FP8_SUFFIXES):
        return "fp8"
    if canonical.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return "fp4"
    if canonical.endswith("tid2eid"):
        return "int64"
    return "fp32" if canonical.endswith(FP32_SUFFIXES) else "bf16"


def snapped(canonical: str, a: np.ndarray) -> np.ndarray:
    """The value the released format can hold (what loading it must give back), fp32."""
    kind = release_kind(canonical)
    if kind == "fp8":
        return dequantise_fp8(*quantise_fp8_blocks(a))
    if kind == "fp4":
        return np.stack([dequantise_fp4(*quantise_fp4(e)) for e in a])
    if kind == "bf16":
        return a.astype(ml_dtypes.bfloat16).astype(np.float32)
    return a


def released(official: str, a: np.ndarray) -> dict[str, np.ndarray]:
    """One tensor in the released dtype, with its ``.scale`` when quantised."""
    key, slot = canonical_name(official)
    kind = "fp4" if slot else release_kind(key)
    if kind in ("fp8", "fp4"):
        q, s = (quantise_fp8_blocks if kind == "fp8" else quantise_fp4)(a)
        return {official: q, official.removesuffix(".weight") + ".scale": s}
    dtype = {"bf16": ml_dtypes.bfloat16, "fp32": np.float32, "int64": np.int64}[kind]
    return {official: a.astype(dtype)}


class MTPReference(torch.nn.Module):
    """The MTP block of spec §10 from transformers' parts: its RMSNorm, plain linears, and the decoder
    layer, hc_head and norm of a reference model built with the block as its last (sliding) layer."""

    def __init__(self, host, seed: int):
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RMSNorm

        super().__init__()
        d, eps = CFG.hidden_size, CFG.rms_norm_eps
        g = torch.Generator().manual_seed(seed)
        self.enorm, self.hnorm = DeepseekV4RMSNorm(d, eps), DeepseekV4RMSNorm(d, eps)
        self.e_proj, self.h_proj = torch.nn.Linear(d, d, bias=False), torch.nn.Linear(d, d, bias=False)
        with torch.no_grad():
            for p in (self.enorm.weight, self.hnorm.weight):
                p.copy_(1 + 0.2 * torch.randn(d, generator=g))
            for p in (self.e_proj.weight, self.h_proj.weight):
                p.copy_(torch.randn(d, d, generator=g) / d**0.5)
        self.layer, self.hc_head, self.norm = host.model.layers[N], host.model.hc_head, host.model.norm

    def state(self) -> dict[str, np.ndarray]:
        """Canonical (model.mtp.0.*) name -> value."""
        out = {f"model.mtp.0.{k}": v.detach().numpy() for k, v in self.state_dict().items()}
        return {k.replace(".layer.", "."): v for k, v in out.items()}

    @torch.no_grad()
    def forward(self, ref, ids, next_ids):
        """(main logits, MTP logits) [B, S, V]; the MTP block reads the main streams before hc_head and
        the main layers' own positions, RoPE and sliding-window mask."""
        seen = {}

        def keep_streams(module, args):
            seen["streams"] = args[0]

        def keep_layer_kwargs(module, args, kwargs):
            seen["kw"] = kwargs

        hooks = [ref.model.hc_head.register_forward_pre_hook(keep_streams),
                 ref.model.layers[0].register_forward_pre_hook(keep_layer_kwargs, with_kwargs=True)]
        logits = ref(input_ids=ids, use_cache=False).logits
        for h in hooks:
            h.remove()
        kw = {k: seen["kw"][k] for k in ("position_embeddings", "position_ids", "attention_mask")}
        e = self.enorm(ref.model.embed_tokens(next_ids))
        x = self.e_proj(e).unsqueeze(2) + self.h_proj(self.hnorm(seen["streams"]))
        x = self.layer(x, input_ids=next_ids, **kw)
        return logits.numpy(), ref.lm_head(self.norm(self.hc_head(x))).numpy()


class Released:
    """The snapped reference (main model + MTP), its released-format tensors, expected values, logits."""

    def __init__(self, root):
        from reference import build_reference, topk_boundary_gap

        self.ref = build_reference(CFG, seed=21)
        host = build_reference(mtp_config(CFG), seed=22)
        self.mtp = MTPReference(host, seed=23)
        with torch.no_grad():
            for module in (self.ref, self.mtp):
                for name, p in module.state_dict().items():
                    canonical = name if module is self.ref else "model.mtp.0." + name
                    p.copy_(torch.from_numpy(snapped(canonical, p.numpy())))
        self.expected = {k: v.numpy() for k, v in self.ref.state_dict().items()} | self.mtp.state()
        rng = np.random.RandomState(3)
        for _ in range(20):  # 7 CSA entries > index_topk 4; no tie at the top-k boundary
            self.ids = rng.randint(0, CFG.vocab_size, (2, 29))
            if topk_boundary_gap(self.ref, self.ids, CFG) > 1e-6:
                break
        self.next_ids = np.concatenate([self.ids[:, 1:], rng.randint(0, CFG.vocab_size, (2, 1))], axis=1)
        self.logits, self.mtp_logits = self.mtp(self.ref, torch.as_tensor(self.ids), torch.as_tensor(self.next_ids))

        self.dequantised = root / "dequantised"  # the snapped values as a plain fp32 HF checkpoint
        self.ref.save_pretrained(self.dequantised)
        self.config = json.loads((self.dequantised / "config.json").read_text())
        tensors = {official_name(k): v for k, v in read_tensors(self.dequantised / "model.safetensors").items()}
        tensors |= self.mtp_official()
        self.tensors = {}
        for name, value in tensors.items():
            self.tensors |= released(name, value)

    def mtp_official(self) -> dict[str, np.ndarray]:
        """The MTP block's tensors in DeepSeek's names (mtp.0.attn.wq_a.weight, mtp.0.ffn.experts.3.w1.weight, ...)."""
        out = {}
        for k, v in self.mtp.state_dict().items():
            v = v.numpy()
            if k.endswith("experts.gate_up_proj"):
                F = CFG.moe_intermediate_size
                for e in range(CFG.n_routed_experts):
                    out[f"ffn.experts.{e}.w1.weight"], out[f"ffn.experts.{e}.w3.weight"] = v[e, :F], v[e, F:]
            elif k.endswith("experts.down_proj"):
                out |= {f"ffn.experts.{e}.w2.weight": v[e] for e in range(CFG.n_routed_experts)}
            else:
                out[self.official_layer_name(k)] = v
        return {"mtp.0." + k: v for k, v in out.items()}

    @staticmethod
    def official_layer_name(hf: str) -> str:
        """transformers' name inside one layer (or the MTP's own parts) -> DeepSeek's, per spec §11.2."""
        s = hf.removeprefix("layer.")
        for a, b in [("self_attn.", "attn."), ("mlp.", "ffn."), ("input_layernorm", "attn_norm"),
                     ("post_attention_layernorm", "ffn_norm"), ("q_a_proj", "wq_a"), ("q_b_proj", "wq_b"),
                     ("q_a_norm", "q_norm"), ("kv_proj", "wkv"), ("o_a_proj", "wo_a"), ("o_b_proj", "wo_b"),
                     ("attn.sinks", "attn.attn_sink"), ("gate.e_score_correction_bias", "gate.bias"),
                     ("shared_experts.gate_proj", "shared_experts.w1"), ("shared_experts.up_proj", "shared_experts.w3"),
                     ("shared_experts.down_proj", "shared_experts.w2")]:
            s = s.replace(a, b)
        for part in ("attn", "ffn"):
            for p in ("fn", "base", "scale"):
                s = s.replace(f"{part}_hc.{p}", f"hc_{part}_{p}")
        return s.replace("hc_head.hc_", "hc_head_")


@pytest.fixture(scope="module")
def rel(tmp_path_factory) -> Released:
    return Released(tmp_path_factory.mktemp("released"))


def write(path, config: dict, *shards: dict[str, np.ndarray]):
    """config.json plus one safetensors file per shard; an index when there are several shards."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                            for i in range(len(shards))]
    for name, tensors in zip(names, shards):
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path / name))
    if len(shards) > 1:
        weight_map = {k: name for name, tensors in zip(names, shards) for k in tensors}
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def scales_in_other_shards(tensors: dict[str, np.ndarray], n: int = 3) -> list[dict[str, np.ndarray]]:
    """Weights dealt round-robin over n shards; every scale one shard after its weight's."""
    shards = [{} for _ in range(n)]
    weights = sorted(k for k in tensors if not k.endswith(".scale"))
    for i, name in enumerate(weights):
        shards[i % n][name] = tensors[name]
        scale = name.removesuffix(".weight") + ".scale"
        if scale in tensors:
            shards[(i + 1) % n][scale] = tensors[scale]
    return shards


def assert_values(model, expected: dict[str, np.ndarray], released: bool = True):
    """Every parameter equals ``expected``; with ``released`` the FP8 / FP4 ones are held as QuantArrays
    (compared dequantised), else as plain arrays."""
    table = param_table(model)
    assert sorted(table) == sorted(expected)
    for name, var in table.items():
        got = var.get_value()
        quantised = storage_of(var) in (Storage.FP8, Storage.FP4)
        assert isinstance(got, QuantArray) == (released and quantised), name
        got = np.asarray(got.dequantize(model.dtype) if isinstance(got, QuantArray) else got)
        np.testing.assert_array_equal(got, expected[name].astype(got.dtype), err_msg=name)


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name, canonical", [
    ("mtp.0.e_proj.weight", ("model.mtp.0.e_proj.weight", None)),
    ("mtp.0.enorm.weight", ("model.mtp.0.enorm.weight", None)),
    ("mtp.0.norm.weight", ("model.mtp.0.norm.weight", None)),
    ("mtp.0.hc_head_fn", ("model.mtp.0.hc_head.hc_fn", None)),
    ("mtp.0.hc_ffn_scale", ("model.mtp.0.ffn_hc.scale", None)),
    ("mtp.0.attn_norm.weight", ("model.mtp.0.input_layernorm.weight", None)),
    ("mtp.0.attn.kv_norm.weight", ("model.mtp.0.self_attn.kv_norm.weight", None)),
    ("model.mtp.0.attn.norm.weight", ("model.mtp.0.self_attn.kv_norm.weight", None)),
    ("mtp.0.attn.attn_sink", ("model.mtp.0.self_attn.sinks", None)),
    ("mtp.0.ffn.gate.bias", ("model.mtp.0.mlp.gate.e_score_correction_bias", None)),
    ("mtp.0.ffn.experts.3.w3.weight", ("model.mtp.0.mlp.experts.gate_up_proj", (3, 3))),
    ("model.mtp.0.mlp.shared_experts.down_proj.weight", ("model.mtp.0.mlp.shared_experts.down_proj.weight", None)),
])
def test_canonical_mtp_names(name, canonical):
    """Spec §11.2's MTP keys land on the block's parameters (model.mtp.0.*, the decoder layer's names)."""
    assert canonical_name(name) == canonical
    assert canonical[0] in param_table(ABSTRACT_WITH_MTP)


def test_the_fixture_is_in_the_released_format(rel, tmp_path):
    """Names, dtypes and shapes as spec §11 lists them (read back from the file headers)."""
    stored = catalog([write(tmp_path, rel.config, rel.tensors) / "model.safetensors"])
    d, F = CFG.hidden_size, CFG.moe_intermediate_size
    want = {
        "layers.1.attn.wq_a.weight": ("F8_E4M3", (CFG.q_lora_rank, d)),
        "layers.1.attn.wq_a.scale": ("F8_E8M0", (1, 2)),
        "layers.1.attn.wo_b.scale": ("F8_E8M0", (2, 1)),
        "layers.1.attn.indexer.wq_b.scale": ("F8_E8M0", (1, 1)),
        "layers.2.ffn.shared_experts.w2.weight": ("F8_E4M3", (d, F)),
        "layers.1.ffn.experts.3.w1.weight": ("I8", (F, d // 2)),
        "layers.1.ffn.experts.3.w1.scale": ("F8_E8M0", (F, d // 32)),
        "layers.1.ffn.experts.3.w2.weight": ("I8", (d, F // 2)),
        "layers.1.ffn.experts.3.w2.scale": ("F8_E8M0", (d, 1)),
        "embed.weight": ("BF16", (CFG.vocab_size, d)),
        "head.weight": ("BF16", (CFG.vocab_size, d)),
        "layers.1.ffn.gate.weight": ("BF16", (CFG.n_routed_experts, d)),
        "layers.1.attn.compressor.wkv.weight": ("BF16", (64, d)),
        "layers.1.attn.indexer.weights_proj.weight": ("BF16", (CFG.index_n_heads, d)),
        "norm.weight": ("BF16", (d,)),
        "layers.1.attn.attn_sink": ("F32", (CFG.num_attention_heads,)),
        "layers.1.attn.compressor.ape": ("F32", (4, 64)),
        "layers.1.ffn.gate.bias": ("F32", (CFG.n_routed_experts,)),
        "layers.0.hc_attn_fn": ("F32", (24, 4 * d)),
        "hc_head_scale": ("F32", (1,)),
        "layers.0.ffn.gate.tid2eid": ("I64", (CFG.vocab_size, CFG.num_experts_per_tok)),
        "mtp.0.e_proj.weight": ("F8_E4M3", (d, d)),
        "mtp.0.h_proj.scale": ("F8_E8M0", (2, 2)),
        "mtp.0.enorm.weight": ("BF16", (d,)),
        "mtp.0.hc_head_fn": ("F32", (4, 4 * d)),
        "mtp.0.attn.wq_a.weight": ("F8_E4M3", (CFG.q_lora_rank, d)),
        "mtp.0.ffn.experts.7.w3.weight": ("I8", (F, d // 2)),
        "mtp.0.ffn.gate.bias": ("F32", (CFG.n_routed_experts,)),
        "mtp.0.attn.kv_norm.weight": ("BF16", (CFG.head_dim,)),
    }
    for name, (dtype, shape) in want.items():
        assert (stored[name].dtype, stored[name].shape) == (dtype, shape), name
    assert {t.dtype for t in stored.values()} == {"F8_E4M3", "F8_E8M0", "I8", "BF16", "F32", "I64"}
    assert not any("compressor" in k for k in stored if k.startswith("mtp.")), "the MTP block is sliding-window only"
    assert not any(k.startswith("model.") for k in stored)


def test_released_checkpoint_loads_exactly_and_matches_the_reference(rel, tmp_path):
    model = dsv4_jax.from_pretrained(write(tmp_path, rel.config, rel.tensors), "float32", mtp=True)
    assert isinstance(model, DeepseekV4WithMTP)
    assert_values(model, rel.expected)
    logits, mtp = (np.asarray(a) for a in mtp_logits(model, rel.ids, rel.next_ids))
    assert rel_err(logits, rel.logits) < 1e-5
    assert rel_err(mtp, rel.mtp_logits) < 1e-5, "MTP logits differ from the composed PyTorch reference"
    np.testing.assert_array_equal(mtp.argmax(-1), rel.mtp_logits.argmax(-1))
    # The main forward is unchanged by the MTP block and equals a model built from the dequantised weights.
    plain = dsv4_jax.from_pretrained(rel.dequantised, "float32")
    np.testing.assert_array_equal(np.asarray(model(rel.ids)), np.asarray(plain(rel.ids)))
    np.testing.assert_array_equal(logits, np.asarray(plain(rel.ids)))


def test_sharded_with_scales_in_other_shards(rel, tmp_path, host_tensors_alive):
    shards = scales_in_other_shards(rel.tensors)
    shard_of = {k: i for i, shard in enumerate(shards) for k in shard}
    scales = [k for k in shard_of if k.endswith(".scale")]
    assert len(scales) > 100 and all(shard_of[k] != shard_of[k.removesuffix(".scale") + ".weight"] for k in scales)
    path = write(tmp_path, rel.config, *shards)
    # bf16: on the CPU backend an fp32 parameter may use the fresh numpy array it was made from as its own
    # storage (zero-copy), which would keep that array alive without any host copy piling up.
    assert_values(dsv4_jax.from_pretrained(path, "bfloat16", mtp=True), rel.expected)
    assert host_tensors_alive["most_alive"] <= 1, f"{host_tensors_alive['most_alive']} host tensors were alive at once"
    # Without mtp=True the block's tensors (and their scales) are skipped.
    main = {k: v for k, v in rel.expected.items() if not k.startswith("model.mtp.")}
    assert_values(dsv4_jax.from_pretrained(path, "float32"), main)


def test_bf16_model_holds_the_fp8_and_fp4_values_exactly(rel, tmp_path):
    path = write(tmp_path, rel.config, rel.tensors)
    model = dsv4_jax.from_pretrained(path, "bfloat16", mtp=True, dequantize=True)
    table = param_table(model)
    assert table["model.layers.1.self_attn.q_a_proj.weight"].get_value().dtype == ml_dtypes.bfloat16
    assert table["model.mtp.0.mlp.experts.gate_up_proj"].get_value().dtype == ml_dtypes.bfloat16
    assert_values(model, rel.expected, released=False)
    # As released: the stored codes and ue8m0 scales themselves, bit for bit.
    table = param_table(dsv4_jax.from_pretrained(path, "bfloat16", mtp=True))
    for stored, canonical, part in (("layers.1.attn.wq_a", "model.layers.1.self_attn.q_a_proj.weight", None),
                                    ("mtp.0.ffn.experts.2.w3", "model.mtp.0.mlp.experts.gate_up_proj", 1)):
        q = table[canonical].get_value()
        values, scales = (q.values[2, CFG.moe_intermediate_size:], q.scales[2, CFG.moe_intermediate_size:]) \
            if part else (q.values, q.scales)
        np.testing.assert_array_equal(bits(np.asarray(values)), bits(rel.tensors[stored + ".weight"]))
        np.testing.assert_array_equal(bits(np.asarray(scales)), bits(rel.tensors[stored + ".scale"]))


def test_transformers_quantizer_spelling(rel, tmp_path):
    """transformers' FP8 names: ``<weight>_scale_inv`` (fp32 scales, still multiplied), stacked experts
    ``gate_up_proj`` [E, 2F, d] with ``gate_up_proj_scale_inv`` [E, ceil(2F/128), ceil(d/128)]."""
    tensors, want = {}, dict(rel.expected)
    for name, value in rel.ref.state_dict().items():
        value = value.numpy()
        if release_kind(name) in ("fp8", "fp4"):
            pairs = [quantise_fp8_blocks(v) for v in value] if value.ndim == 3 else [quantise_fp8_blocks(value)]
            q, s = (np.stack(x) if value.ndim == 3 else x[0] for x in zip(*pairs))
            tensors[name], tensors[name + "_scale_inv"] = q, s.astype(np.float32)
            want[name] = dequantise_fp8(q, s)
        else:
            tensors[name] = value
    assert tensors["model.layers.1.mlp.experts.gate_up_proj_scale_inv"].shape == (CFG.n_routed_experts, 1, 2)
    main = {k: v for k, v in want.items() if not k.startswith("model.mtp.")}
    assert_values(dsv4_jax.from_pretrained(write(tmp_path, rel.config, tensors), "float32"), main)


def test_torch_float4_and_float8_tensors(rel, tmp_path):
    """Files torch writes: float8_e4m3fn / float8_e8m0fnu, and FP4 experts as float4_e2m1fn_x2 (safetensors
    tag F4, logical shape [out, in]) holding the same bytes as the released int8 [out, in/2]."""
    from safetensors.torch import save_file as save_torch

    def to_torch(name, a):
        if name.endswith(".weight") and a.dtype == np.int8 and "experts.0." in name:
            return torch.from_numpy(a).view(torch.float4_e2m1fn_x2)
        by_dtype = {np.dtype(ml_dtypes.bfloat16): (np.int16, torch.bfloat16),
                    np.dtype(E4M3): (np.uint8, torch.float8_e4m3fn), np.dtype(E8M0): (np.uint8, torch.float8_e8m0fnu)}
        raw, dtype = by_dtype.get(a.dtype, (None, None))
        return torch.from_numpy(a.view(raw)).view(dtype) if raw else torch.from_numpy(a)

    path = write(tmp_path, rel.config, {})
    torch_tensors = {k: to_torch(k, np.ascontiguousarray(v)) for k, v in rel.tensors.items()}
    save_torch(torch_tensors, str(path / "model.safetensors"))
    stored = catalog([path / "model.safetensors"])
    assert stored["layers.1.ffn.experts.0.w1.weight"].dtype == "F4"
    assert stored["layers.1.ffn.experts.0.w1.weight"].shape == (CFG.moe_intermediate_size, CFG.hidden_size)
    assert_values(dsv4_jax.from_pretrained(path, "float32", mtp=True), rel.expected)


# ----- errors ---------------------------------------------------------------------------------

def _drop(*names):
    return lambda t: {k: v for k, v in t.items() if k not in names}


def _put(name, make):
    return lambda t: {**t, name: make(t)}


WQ_A = "layers.1.attn.wq_a"
NAN_E8M0 = np.full((1, 2), 0xFF, np.uint8).view(E8M0)
ERRORS = {
    "fp8-weight-without-scale": (_drop(f"{WQ_A}.scale"), r"quantised weight layers\.1\.attn\.wq_a\.weight \(F8_E4M3\) "
                                 r"in model\.safetensors has no scale \(layers\.1\.attn\.wq_a\.scale or "),
    "fp4-weight-without-scale": (_drop("layers.2.ffn.experts.5.w2.scale"),
                                 r"quantised weight layers\.2\.ffn\.experts\.5\.w2\.weight \(I8\) .* has no scale"),
    "scale-without-weight": (_drop("layers.1.attn.wq_b.weight"), r"quantisation scale layers\.1\.attn\.wq_b\.scale in "
                             r"model\.safetensors has no weight layers\.1\.attn\.wq_b\.weight in the checkpoint"),
    "fp8-scale-wrong-shape": (_put(f"{WQ_A}.scale", lambda t: np.ones((2, 2), E8M0)),
                              r"scale layers\.1\.attn\.wq_a\.scale in model\.safetensors has shape \(2, 2\) but its "
                              r"F8_E4M3 weight layers\.1\.attn\.wq_a\.weight \(32, 160\) needs \(1, 2\)"),
    "fp4-scale-wrong-shape": (_put("layers.1.ffn.experts.0.w1.scale", lambda t: np.ones((32, 10), E8M0)),
                              r"experts\.0\.w1\.scale .* has shape \(32, 10\) but its I8 weight .*w1\.weight "
                              r"\(32, 80\) needs \(32, 5\)"),
    "scale-wrong-dtype": (_put(f"{WQ_A}.scale", lambda t: np.ones((1, 2), np.int8)),
                          r"scale layers\.1\.attn\.wq_a\.scale in model\.safetensors has dtype I8; expected one of "
                          r"F8_E8M0, F32, BF16"),
    "unknown-weight-dtype": (_put(f"{WQ_A}.weight", lambda t: t[f"{WQ_A}.weight"].astype(ml_dtypes.float8_e5m2)),
                             r"tensor layers\.1\.attn\.wq_a\.weight in model\.safetensors has dtype F8_E5M2, which a "
                             r"DeepSeek-V4 checkpoint does not use"),
    "scale-of-bf16-weight": (_put("embed.scale", lambda t: np.ones((2, 2), E8M0)),
                             r"scale embed\.scale in model\.safetensors belongs to embed\.weight, which is stored as "
                             r"BF16, not quantised"),
    "two-scales": (_put(f"{WQ_A}.weight_scale_inv", lambda t: np.ones((1, 2), np.float32)),
                   r"weight layers\.1\.attn\.wq_a\.weight has two quantisation scales"),
    "nan-scale": (_put(f"{WQ_A}.scale", lambda t: NAN_E8M0),
                  r"tensor layers\.1\.attn\.wq_a\.weight in model\.safetensors holds NaN or infinite values"),
    "e8m0-weight": (_put("norm.weight", lambda t: np.ones(CFG.hidden_size, E8M0)),
                    r"tensor norm\.weight in model\.safetensors has the scale dtype F8_E8M0 but is not named"),
    "mtp-tensor-missing": (_drop("mtp.0.h_proj.weight", "mtp.0.h_proj.scale"),
                           r"checkpoint is missing 1 tensor\(s\): model\.mtp\.0\.h_proj\.weight \(160, 160\)"),
    "mtp-tensor-unexpected": (_put("mtp.0.bogus.weight", lambda t: np.zeros(3, np.float32)),
                              r"unexpected tensor mtp\.0\.bogus\.weight \(3,\) in model\.safetensors"),
    "mtp-expert-wrong-shape": (lambda t: {**t, "mtp.0.ffn.experts.2.w2.weight": t["mtp.0.ffn.experts.2.w1.weight"],
                                          "mtp.0.ffn.experts.2.w2.scale": t["mtp.0.ffn.experts.2.w1.scale"]},
                               r"tensor mtp\.0\.ffn\.experts\.2\.w2\.weight has shape \(32, 160\) in "
                               r"model\.safetensors but the config expects \(160, 32\)"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error(rel, tmp_path, case):
    edit, message = ERRORS[case]
    path = write(tmp_path, rel.config, edit(rel.tensors))
    with pytest.raises(CheckpointError, match=message) as err:
        dsv4_jax.from_pretrained(path, "float32", mtp=True)
    assert "\n" not in str(err.value)


def test_error_mtp_without_an_mtp_layer_in_the_config(rel, tmp_path):
    path = write(tmp_path, {**rel.config, "num_nextn_predict_layers": 0}, rel.tensors)
    with pytest.raises(CheckpointError, match=r"config\.json has num_nextn_predict_layers 0; mtp=True needs 1"):
        dsv4_jax.from_pretrained(path, "float32", mtp=True)
