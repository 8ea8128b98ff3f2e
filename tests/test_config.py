"""DeepseekV4Config: real config.json files in every spelling, the presets, the HF round trip, validation."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import transformers

from conftest import tiny
from dsv4_jax.model.config import CSA, HASH_MOE, HCA, MOE, SLIDING, ConfigError, DeepseekV4Config, YarnScaling


def _ratios(first_two: list[int], n_layers: int) -> list[int]:
    """A released compress_ratios list: two leading layers, CSA/HCA alternating, one extra entry for MTP."""
    return first_two + [4 if i % 2 == 0 else 128 for i in range(2, n_layers)] + [0]


# DeepSeek-V4-Flash config.json as shipped (legacy spelling; FP8 quantisation block and all).
FLASH_JSON = {
    "architectures": ["DeepseekV4ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 1, "expert_dtype": "fp4", "hc_eps": 1e-06, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "head_dim": 512, "hidden_act": "silu", "hidden_size": 4096, "index_head_dim": 128,
    "index_n_heads": 64, "index_topk": 512, "initializer_range": 0.02, "max_position_embeddings": 1048576,
    "model_type": "deepseek_v4", "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 64, "num_experts_per_tok": 6, "num_hidden_layers": 43,
    "num_hash_layers": 3, "num_key_value_heads": 1, "num_nextn_predict_layers": 1, "o_groups": 8,
    "o_lora_rank": 1024, "q_lora_rank": 1024, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 65536,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus", "sliding_window": 128,
    "swiglu_limit": 10.0, "tie_word_embeddings": False, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1", "use_cache": True, "vocab_size": 129280, "compress_rope_theta": 160000,
    "compress_ratios": _ratios([0, 0], 43),
}
PRO_JSON = {
    **FLASH_JSON, "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128, "q_lora_rank": 1536,
    "o_groups": 16, "index_topk": 1024, "n_routed_experts": 384, "moe_intermediate_size": 3072,
    "routed_scaling_factor": 2.5, "compress_ratios": _ratios([128, 128], 61),
}
# DeepSeek's own inference/config.json for Flash (its names; `n_routed_experts_score` is a fork-only extra).
FLASH_INFERENCE_JSON = {
    "vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43, "n_hash_layers": 3, "n_heads": 64,
    "n_routed_experts": 256, "n_routed_experts_score": 128, "n_shared_experts": 1, "n_activated_experts": 6,
    "score_func": "sqrtsoftplus", "route_scale": 1.5, "swiglu_limit": 10.0, "q_lora_rank": 1024, "head_dim": 512,
    "rope_head_dim": 64, "o_groups": 8, "o_lora_rank": 1024, "window_size": 128, "original_seq_len": 65536,
    "rope_theta": 10000, "rope_factor": 16, "beta_fast": 32, "beta_slow": 1, "index_n_heads": 64,
    "index_head_dim": 128, "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20, "dtype": "fp8",
    "scale_fmt": "ue8m0", "expert_dtype": "fp4", "compress_rope_theta": 160000,
    "compress_ratios": _ratios([0, 0], 43),
}


def _write(tmp_path, content, name="config.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _assert_same(parsed: DeepseekV4Config, want: DeepseekV4Config):
    """Equality, but on failure name the fields that differ."""
    diff = {f.name: (getattr(parsed, f.name), getattr(want, f.name)) for f in dataclasses.fields(want)
            if getattr(parsed, f.name) != getattr(want, f.name)}
    assert not diff, f"parsed != expected on {diff}"
    assert parsed == want


# ----- released configs -----------------------------------------------------------------------

@pytest.mark.parametrize("raw, preset", [(FLASH_JSON, DeepseekV4Config.flash), (PRO_JSON, DeepseekV4Config.pro),
                                         (FLASH_INFERENCE_JSON, DeepseekV4Config.flash)],
                         ids=["flash", "pro", "flash-inference-names"])
def test_released_config_json_parses_to_the_preset(tmp_path, raw, preset):
    _assert_same(DeepseekV4Config.from_json(_write(tmp_path, raw)), preset())


@pytest.mark.parametrize("raw, preset", [(FLASH_JSON, DeepseekV4Config.flash), (PRO_JSON, DeepseekV4Config.pro)],
                         ids=["flash", "pro"])
def test_transformers_reading_of_the_legacy_config_agrees(raw, preset):
    """transformers' own legacy conversion (compress_ratios -> layer_types, ...) parses back to the preset.
    transformers edits the nested rope_scaling it is given in place: it gets a copy, so FLASH_JSON stays as
    shipped for the tests that read it after this one."""
    raw = copy.deepcopy(raw)
    _assert_same(DeepseekV4Config.from_hf_dict(transformers.DeepseekV4Config(**raw).to_dict()), preset())


def test_flash_preset_matches_the_spec():
    c = DeepseekV4Config.flash()
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.head_dim, c.qk_rope_head_dim) == (
        43, 4096, 64, 512, 64)
    assert (c.q_lora_rank, c.o_groups, c.o_lora_rank, c.index_topk, c.n_routed_experts) == (1024, 8, 1024, 512, 256)
    assert (c.moe_intermediate_size, c.num_experts_per_tok, c.routed_scaling_factor) == (2048, 6, 1.5)
    assert c.layer_types[:4] == (SLIDING, SLIDING, CSA, HCA)
    assert c.layer_types.count(CSA) == 21 and c.layer_types.count(HCA) == 20 and c.layer_types[42] == CSA
    assert c.compress_rates == (4, 128) and c.layer_compress_rate(2) == 4 and c.layer_compress_rate(3) == 128
    assert c.mlp_layer_types[:4] == (HASH_MOE, HASH_MOE, HASH_MOE, MOE)
    assert c.compress_yarn == YarnScaling(16.0, 65536, 32.0, 1.0)
    assert (c.rope_theta, c.compress_rope_theta, c.vocab_size) == (10000.0, 160000.0, 129280)


def test_pro_preset_matches_the_spec():
    c = DeepseekV4Config.pro()
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.q_lora_rank, c.o_groups) == (
        61, 7168, 128, 1536, 16)
    assert (c.index_topk, c.n_routed_experts, c.moe_intermediate_size, c.routed_scaling_factor) == (
        1024, 384, 3072, 2.5)
    assert c.layer_types[:3] == (HCA, HCA, CSA) and c.layer_types[60] == CSA
    assert c.layer_types.count(CSA) == 30 and c.layer_types.count(HCA) == 31 and SLIDING not in c.layer_types
    assert c.mlp_layer_types.count(HASH_MOE) == 3


def test_config_is_frozen_and_hashable():
    c = tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden_size = 128
    assert hash(c) == hash(tiny()) and c != tiny(hidden_size=128)


# ----- current HF spelling --------------------------------------------------------------------

HF_CASES = {
    "tiny": tiny(),
    "tiny-no-yarn": tiny(compress_yarn=None),
    "tiny-odd-thetas": tiny(rope_theta=50000.0, compress_rope_theta=80000.0, eos_token_ids=(1, 2),
                            bos_token_id=None, routed_scaling_factor=2.5),
    "flash": DeepseekV4Config.flash(),
    "pro": DeepseekV4Config.pro(),
}


@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_to_hf_dict_round_trip(name):
    cfg = HF_CASES[name]
    _assert_same(DeepseekV4Config.from_hf_dict(cfg.to_hf_dict()), cfg)


@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_config_json_written_by_transformers_parses_back(tmp_path, name):
    cfg = HF_CASES[name]
    transformers.DeepseekV4Config(**cfg.to_hf_dict()).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert set(written["rope_parameters"]) == {"main", "compress"}
    assert written["partial_rotary_factor"] == cfg.qk_rope_head_dim / cfg.head_dim
    _assert_same(DeepseekV4Config.from_json(tmp_path / "config.json"), cfg)


def test_nested_rope_parameters_alone_carry_thetas_and_rope_dim():
    """Without the flat rope_theta / compress_rope_theta / qk_rope_head_dim copies, the nesting decides."""
    cfg = HF_CASES["tiny-odd-thetas"]
    d = transformers.DeepseekV4Config(**cfg.to_hf_dict()).to_dict()
    for key in ("rope_theta", "compress_rope_theta", "qk_rope_head_dim", "rope_scaling"):
        d.pop(key, None)
    assert d["rope_parameters"]["main"]["rope_theta"] == 50000.0
    _assert_same(DeepseekV4Config.from_hf_dict(d), cfg)


def test_deepseek_inference_names():
    d = {"dim": 64, "n_layers": 3, "n_heads": 4, "head_dim": 32, "rope_head_dim": 16, "q_lora_rank": 32,
         "o_groups": 2, "o_lora_rank": 16, "window_size": 8, "compress_ratios": [0, 4, 128, 0], "n_hash_layers": 1,
         "vocab_size": 256, "index_n_heads": 8, "index_head_dim": 16, "index_topk": 4, "n_routed_experts": 8,
         "n_activated_experts": 2, "moe_inter_dim": 32, "route_scale": 2.5, "norm_eps": 1e-5, "n_mtp_layers": 0,
         "rope_factor": 4, "original_seq_len": 16, "beta_fast": 16, "beta_slow": 2}
    want = tiny(hidden_size=64, num_hidden_layers=3, layer_types=(SLIDING, CSA, HCA), hca_compress_rate=128,
                mlp_layer_types=(HASH_MOE, MOE, MOE), routed_scaling_factor=2.5, rms_norm_eps=1e-5,
                num_nextn_predict_layers=0, compress_yarn=YarnScaling(4.0, 16, 16.0, 2.0))
    _assert_same(DeepseekV4Config.from_hf_dict(d), want)


# ----- validation -----------------------------------------------------------------------------

def _hf(**changes) -> dict:
    """tiny() in HF spelling with some keys changed (value None: key removed)."""
    d = tiny().to_hf_dict()
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


_TYPES = (SLIDING, SLIDING, CSA, HCA, CSA)
INVALID = {
    "heads-vs-o_groups": (lambda: tiny(o_groups=3), r"num_attention_heads 4 must be divisible by o_groups 3"),
    "unknown-layer-type": (lambda: tiny(layer_types=(SLIDING, "full_attention") + _TYPES[2:]),
                           r"layer_types\[1\] = 'full_attention' is not a known attention type"),
    "unknown-mlp-type": (lambda: tiny(mlp_layer_types=(HASH_MOE,) * 4 + ("dense",)),
                         r"mlp_layer_types\[4\] = 'dense' is not a known MoE type"),
    "odd-rope-dim": (lambda: tiny(qk_rope_head_dim=15), r"qk_rope_head_dim 15 must be even"),
    "rope-dim-above-head-dim": (lambda: tiny(qk_rope_head_dim=34), r"qk_rope_head_dim 34 .*head_dim=32"),
    "fractional-rope-dim": (lambda: DeepseekV4Config.from_hf_dict(_hf(partial_rotary_factor=0.3)),
                            r"partial_rotary_factor 0.3 x head_dim 32"),
    "odd-head-dim": (lambda: tiny(head_dim=33), r"head_dim 33 must be even"),
    "layer-types-length": (lambda: tiny(num_hidden_layers=4, mlp_layer_types=(MOE,) * 4),
                           r"len\(layer_types\) \(5\) must equal num_hidden_layers \(4\)"),
    "mlp-types-length": (lambda: tiny(mlp_layer_types=(MOE,) * 6),
                         r"len\(mlp_layer_types\) \(6\) must equal num_hidden_layers \(5\)"),
    "short-compress-ratios": (lambda: DeepseekV4Config.from_hf_dict(_hf(layer_types=None, compress_ratios=[0, 4])),
                              r"compress_ratios has 2 entries but num_hidden_layers is 5"),
    "too-many-active-experts": (lambda: tiny(num_experts_per_tok=9), r"num_experts_per_tok 9 exceeds n_routed_experts 8"),
    "scoring-func": (lambda: DeepseekV4Config.from_hf_dict(_hf(scoring_func="softmax")), r"scoring_func 'softmax'"),
    "no-schedule": (lambda: DeepseekV4Config.from_hf_dict(_hf(layer_types=None)),
                    r"neither 'layer_types' nor 'compress_ratios'"),
    "unknown-compress-ratio": (lambda: DeepseekV4Config.from_hf_dict(
        _hf(layer_types=None, compress_ratios=[0, 0, 4, 64, 4])), r"compress_ratios entries .*got \[64\]"),
    "yarn-without-factor": (lambda: DeepseekV4Config.from_hf_dict(
        _hf(rope_scaling={"type": "yarn", "original_max_position_embeddings": 16})), r"yarn .*'factor'"),
    "yarn-attention-factor": (lambda: DeepseekV4Config.from_hf_dict(
        _hf(rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 16,
                          "attention_factor": 0.7})), r"attention_factor 0.7"),
    "rope-type": (lambda: DeepseekV4Config.from_hf_dict(_hf(rope_scaling={"type": "linear", "factor": 2})),
                  r"rope type 'linear'"),
    "yarn-factor-below-one": (lambda: tiny(compress_yarn=YarnScaling(0.5, 16)), r"yarn factor 0.5"),
    "eos-outside-vocab": (lambda: tiny(eos_token_ids=(1, 256)), r"eos_token_id 256 is outside the vocabulary \[0, 256\)"),
    "eos-outside-vocab-hf": (lambda: DeepseekV4Config.from_hf_dict(_hf(eos_token_id=300)), r"eos_token_id 300"),
    "non-positive-size": (lambda: tiny(hidden_size=0), r"hidden_size must be a positive integer, got 0"),
    "equal-compress-rates": (lambda: tiny(hca_compress_rate=4), r"compress rates must differ, both are 4"),
    "model-type": (lambda: DeepseekV4Config.from_hf_dict(_hf(model_type="deepseek_v3")), r"model_type 'deepseek_v3'"),
    "kv-heads": (lambda: DeepseekV4Config.from_hf_dict(_hf(num_key_value_heads=4)), r"num_key_value_heads 4"),
    "shared-experts": (lambda: DeepseekV4Config.from_hf_dict(_hf(n_shared_experts=2)), r"n_shared_experts 2"),
    "tied-embeddings": (lambda: DeepseekV4Config.from_hf_dict(_hf(tie_word_embeddings=True)), r"tie_word_embeddings"),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_config_is_rejected_with_a_message_naming_the_value(name):
    build, message = INVALID[name]
    with pytest.raises(ConfigError, match=message):
        build()


def test_deepseek_inference_score_func_is_checked():
    """`score_func` is the inference config's spelling of scoring_func (spec §1.1); a softmax router must not
    be silently accepted as sqrtsoftplus."""
    d = {**FLASH_INFERENCE_JSON, "score_func": "softmax"}
    with pytest.raises(ConfigError, match=r"scoring_func 'softmax'"):
        DeepseekV4Config.from_hf_dict(d)


@pytest.mark.parametrize("content, message", [
    ('{"hidden_size": 64,', r"config file .*config.json is not valid JSON"),
    ("[1, 2]", r"config file .*config.json must hold a JSON object, got list"),
    (None, r"config file not found: .*config.json"),
], ids=["bad-json", "not-an-object", "missing"])
def test_bad_config_file(tmp_path, content, message):
    path = tmp_path / "config.json" if content is None else _write(tmp_path, content)
    with pytest.raises(ConfigError, match=message):
        DeepseekV4Config.from_json(path)


# ----- the table of required keys and published defaults ----------------------------------------------

from dsv4_jax.model.config import CONFIG_KEYS, REQUIRED  # noqa: E402

REQUIRED_KEYS = [k for k, v in CONFIG_KEYS.items() if v == REQUIRED]
DEFAULTED_KEYS = {k: v for k, v in CONFIG_KEYS.items() if v != REQUIRED}


def test_config_keys_table():
    """The sizes and the schedule are required; everything else has DeepSeek-V4's published value, which is
    the Flash preset's."""
    assert set(REQUIRED_KEYS) == {
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
        ("qk_rope_head_dim", "partial_rotary_factor"), "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window",
        ("layer_types", "compress_ratios"), "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts",
        "num_experts_per_tok", "moe_intermediate_size"}
    flash = DeepseekV4Config.flash()
    field = {"compress_rate_csa": "csa_compress_rate", "compress_rate_hca": "hca_compress_rate"}
    for key, value in DEFAULTED_KEYS.items():
        if key == "eos_token_id":
            assert flash.eos_token_ids == (value,)
        elif key == "num_hash_layers":
            assert flash.mlp_layer_types.count(HASH_MOE) == value
        elif hasattr(flash, field.get(key, key)):
            assert getattr(flash, field.get(key, key)) == value, key
    assert FLASH_JSON["scoring_func"] == DEFAULTED_KEYS["scoring_func"]
    assert FLASH_JSON["n_shared_experts"] == DEFAULTED_KEYS["n_shared_experts"]
    assert FLASH_JSON["num_key_value_heads"] == DEFAULTED_KEYS["num_key_value_heads"]


def test_defaulted_keys_may_be_left_out():
    _assert_same(DeepseekV4Config.from_hf_dict({k: v for k, v in FLASH_JSON.items() if k not in DEFAULTED_KEYS}),
                 DeepseekV4Config.flash())


@pytest.mark.parametrize("key", REQUIRED_KEYS, ids=str)
def test_missing_required_key_is_one_line_naming_key_and_file(tmp_path, key):
    names = key if isinstance(key, tuple) else (key,)
    path = _write(tmp_path, {k: v for k, v in FLASH_JSON.items() if k not in names})
    with pytest.raises(ConfigError) as e:
        DeepseekV4Config.from_json(path)
    want = (f"config has neither {names[0]!r} nor {names[1]!r}" if len(names) == 2
            else f"config is missing the required key {key!r}")
    assert str(e.value) == f"{path}: {want}"


def test_every_missing_required_key_is_named_at_once():
    with pytest.raises(ConfigError) as e:
        DeepseekV4Config.from_hf_dict({k: v for k, v in FLASH_JSON.items() if k not in ("hidden_size", "head_dim",
                                                                                       "compress_ratios")})
    assert str(e.value) == ("config has neither 'layer_types' nor 'compress_ratios'; config is missing the required "
                            "keys 'hidden_size', 'head_dim'")
