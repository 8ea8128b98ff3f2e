"""The one source of sizes: a frozen DeepSeek-V4 config.

Reads a Hugging Face ``config.json`` in both spellings real checkpoints use:
the current one (``layer_types`` / ``compress_rates`` / ``mlp_layer_types`` /
``rope_parameters``) and the legacy one (``compress_ratios`` / ``num_hash_layers`` /
``qk_rope_head_dim`` / ``rope_scaling``), as written by DeepSeek's own inference
config and by older transformers releases.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
HASH_MOE = "hash_moe"
MOE = "moe"
MLP_LAYER_TYPES = (HASH_MOE, MOE)
_RATIO_TO_LAYER_TYPE = {0: SLIDING, 4: CSA, 128: HCA}


class ConfigError(ValueError):
    """An inconsistent or unsupported DeepSeek-V4 configuration."""


REQUIRED = "required"
# Every config.json key read below (Hugging Face names; DeepSeek's inference names are mapped onto them first)
# with its published DeepSeek-V4 value, used when the key is absent, or REQUIRED: the sizes and the attention
# schedule, for which no default could fit another model (a missing one is an error naming it, where Flash's
# value would only fail later on a tensor's shape). A tuple: alternative spellings, one of which must be there.
# Not listed: the rope scaling (``rope_parameters`` / ``rope_scaling`` / ``rope_factor``; absent: no YaRN).
CONFIG_KEYS: dict[str | tuple[str, ...], Any] = {
    ("layer_types", "compress_ratios"): REQUIRED, ("qk_rope_head_dim", "partial_rotary_factor"): REQUIRED,
    "vocab_size": REQUIRED, "hidden_size": REQUIRED, "num_hidden_layers": REQUIRED,
    "num_attention_heads": REQUIRED, "head_dim": REQUIRED,
    "q_lora_rank": REQUIRED, "o_groups": REQUIRED, "o_lora_rank": REQUIRED, "sliding_window": REQUIRED,
    "index_n_heads": REQUIRED, "index_head_dim": REQUIRED,
    "index_topk": REQUIRED, "n_routed_experts": REQUIRED, "num_experts_per_tok": REQUIRED,
    "moe_intermediate_size": REQUIRED,
    "model_type": "deepseek_v4", "compress_rate_csa": 4, "compress_rate_hca": 128, "num_hash_layers": 3,
    "rope_theta": 10000.0, "compress_rope_theta": 160000.0, "scoring_func": "sqrtsoftplus", "n_shared_experts": 1,
    "num_key_value_heads": 1, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1,
    "bos_token_id": 0, "eos_token_id": 1,
}


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN frequency bending used by compressed (CSA/HCA) layers; no attention mscale."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclasses.dataclass(frozen=True)
class DeepseekV4Config:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    layer_types: tuple[str, ...] = ()
    mlp_layer_types: tuple[str, ...] = ()
    csa_compress_rate: int = 4
    hca_compress_rate: int = 128
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    compress_yarn: YarnScaling | None = YarnScaling(16.0, 65536)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    bos_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (1,)

    def __post_init__(self):
        _validate(self)

    # ----- derived sizes -------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    def compress_rate(self, layer_type: str) -> int:
        """Compression ratio m of a layer type (0 for sliding-window-only layers)."""
        return {SLIDING: 0, CSA: self.csa_compress_rate, HCA: self.hca_compress_rate}[layer_type]

    def layer_compress_rate(self, layer: int) -> int:
        return self.compress_rate(self.layer_types[layer])

    @property
    def compress_rates(self) -> tuple[int, ...]:
        """The distinct compression ratios used by this model's layers, ascending."""
        return tuple(sorted({self.layer_compress_rate(i) for i in range(self.num_hidden_layers)} - {0}))

    # ----- construction --------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> DeepseekV4Config:
        """Build from a Hugging Face (or DeepSeek inference) ``config.json`` dict."""
        return cls(**_fields_from_hf_dict(d))

    @classmethod
    def from_json(cls, path: str | Path) -> DeepseekV4Config:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file {path} must hold a JSON object, got {type(d).__name__}")
        try:
            return cls.from_hf_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The current Hugging Face spelling, readable by transformers' ``DeepseekV4Config``."""
        d = {
            "model_type": "deepseek_v4",
            "architectures": ["DeepseekV4ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "partial_rotary_factor": self.qk_rope_head_dim / self.head_dim,
            "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "mlp_layer_types": list(self.mlp_layer_types),
            "compress_rates": {CSA: self.csa_compress_rate, HCA: self.hca_compress_rate},
            "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta,
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": 1,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "scoring_func": "sqrtsoftplus",
            "norm_topk_prob": True,
            "routed_scaling_factor": self.routed_scaling_factor,
            "swiglu_limit": self.swiglu_limit,
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
            "rms_norm_eps": self.rms_norm_eps,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "tie_word_embeddings": False,
        }
        if self.compress_yarn is not None:
            y = self.compress_yarn
            d["rope_scaling"] = {
                "type": "yarn",
                "rope_type": "yarn",
                "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position_embeddings,
                "beta_fast": y.beta_fast,
                "beta_slow": y.beta_slow,
            }
        return d

    # ----- presets (the released sizes) ----------------------------------------------------
    @classmethod
    def flash(cls, **overrides) -> DeepseekV4Config:
        """DeepSeek-V4-Flash: 43 layers, 2 SWA then CSA/HCA alternating, 256 experts."""
        return cls._preset(43, first_two_ratio=0, overrides=overrides)

    @classmethod
    def pro(cls, **overrides) -> DeepseekV4Config:
        """DeepSeek-V4-Pro: 61 layers, 2 HCA then CSA/HCA alternating, 384 experts, top-k 1024."""
        sizes = dict(hidden_size=7168, num_attention_heads=128, q_lora_rank=1536, o_groups=16, index_topk=1024,
                     n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5)
        return cls._preset(61, first_two_ratio=128, overrides={**sizes, **overrides})

    @classmethod
    def _preset(cls, layers: int, first_two_ratio: int, overrides: dict) -> DeepseekV4Config:
        """The released schedule: two layers of ``first_two_ratio``, then CSA (even) / HCA (odd) layers;
        the first three MoE layers hash-routed. ``num_hidden_layers`` in overrides truncates it."""
        n = overrides.pop("num_hidden_layers", layers)
        ratios = ([first_two_ratio] * 2 + [4 if i % 2 == 0 else 128 for i in range(2, n)])[:n]
        kw = dict(num_hidden_layers=n, layer_types=tuple(_RATIO_TO_LAYER_TYPE[r] for r in ratios),
                  mlp_layer_types=tuple([HASH_MOE] * min(3, n) + [MOE] * max(0, n - 3)))
        kw.update(overrides)
        return cls(**kw)


def _fields_from_hf_dict(d: dict[str, Any]) -> dict[str, Any]:
    model_type = d.get("model_type", CONFIG_KEYS["model_type"])
    if model_type != "deepseek_v4":
        raise ConfigError(f"model_type {model_type!r} is not supported; expected 'deepseek_v4'")
    # DeepSeek's inference config uses its own names; map them onto the HF ones first.
    aliases = {
        "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
        "moe_inter_dim": "moe_intermediate_size", "n_activated_experts": "num_experts_per_tok",
        "route_scale": "routed_scaling_factor", "norm_eps": "rms_norm_eps", "window_size": "sliding_window",
        "rope_head_dim": "qk_rope_head_dim", "n_hash_layers": "num_hash_layers",
        "n_mtp_layers": "num_nextn_predict_layers", "score_func": "scoring_func",
    }
    d = {aliases.get(k, k): v for k, v in d.items()}

    missing = [key for key, default in CONFIG_KEYS.items() if default == REQUIRED
               and all(d.get(k) is None for k in (key if isinstance(key, tuple) else (key,)))]
    if missing:  # all of them at once, in one line
        either = [f"config has neither {a!r} nor {b!r}" for a, b in (k for k in missing if isinstance(k, tuple))]
        keys = [repr(k) for k in missing if not isinstance(k, tuple)]
        if keys:
            either.append(f"config is missing the required key{'s' if len(keys) > 1 else ''} {', '.join(keys)}")
        raise ConfigError("; ".join(either))

    def get(key):
        v = d.get(key)
        return CONFIG_KEYS[key] if v is None else v

    n = int(get("num_hidden_layers"))
    head_dim = int(get("head_dim"))

    if d.get("partial_rotary_factor") is not None:
        rope_dim = head_dim * float(d["partial_rotary_factor"])
        if abs(rope_dim - round(rope_dim)) > 1e-6:
            raise ConfigError(
                f"partial_rotary_factor {d['partial_rotary_factor']} x head_dim {head_dim} is not a whole number of dims"
            )
        rope_dim = int(round(rope_dim))
    else:
        rope_dim = int(d["qk_rope_head_dim"])

    rates = dict(d.get("compress_rates") or {})
    csa_rate = int(rates.get(CSA, get("compress_rate_csa")))
    hca_rate = int(rates.get(HCA, get("compress_rate_hca")))

    if d.get("layer_types") is None:
        ratio_map = {0: SLIDING, csa_rate: CSA, hca_rate: HCA}
        bad = [r for r in d["compress_ratios"] if r not in ratio_map]
        if bad:
            raise ConfigError(
                f"compress_ratios entries must be one of {sorted(ratio_map)}; got {bad}"
            )
        if len(d["compress_ratios"]) < n:
            raise ConfigError(f"compress_ratios has {len(d['compress_ratios'])} entries but num_hidden_layers "
                              f"is {n}")
        # Real checkpoints list one extra ratio for the MTP block; the main model keeps the first n.
        layer_types = tuple(ratio_map[r] for r in d["compress_ratios"][:n])
    else:
        layer_types = tuple(d["layer_types"])

    if d.get("mlp_layer_types") is not None:
        mlp_layer_types = tuple(d["mlp_layer_types"])
    else:
        n_hash = int(get("num_hash_layers"))
        mlp_layer_types = tuple([HASH_MOE] * min(n, n_hash) + [MOE] * max(0, n - n_hash))

    rope_theta = float(get("rope_theta"))
    compress_theta = float(get("compress_rope_theta"))
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and isinstance(rp.get("compress"), dict):
        scaling = rp["compress"]
        compress_theta = float(scaling.get("rope_theta", compress_theta))
        if isinstance(rp.get("main"), dict):
            rope_theta = float(rp["main"].get("rope_theta", rope_theta))
    elif isinstance(rp, dict) and rp:
        scaling = rp
    else:
        scaling = d.get("rope_scaling") or {}
    if "rope_factor" in d and not scaling:  # DeepSeek inference spelling
        scaling = {"rope_type": "yarn", "factor": d["rope_factor"], "original_max_position_embeddings":
                   d.get("original_seq_len"), "beta_fast": d.get("beta_fast"), "beta_slow": d.get("beta_slow")}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "yarn":
        if scaling.get("original_max_position_embeddings") is None or scaling.get("factor") is None:
            raise ConfigError("yarn rope scaling needs both 'factor' and 'original_max_position_embeddings'")
        if scaling.get("attention_factor") not in (None, 1.0, 1):
            raise ConfigError(
                f"yarn attention_factor {scaling['attention_factor']} is not supported: DeepSeek-V4 uses 1.0"
            )
        yarn = YarnScaling(
            factor=float(scaling["factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            beta_fast=float(scaling.get("beta_fast") or 32.0),
            beta_slow=float(scaling.get("beta_slow") or 1.0),
        )
    elif rope_type == "default":
        yarn = None
    else:
        raise ConfigError(f"rope type {rope_type!r} is not supported; expected 'yarn' or 'default'")

    scoring = get("scoring_func")
    if scoring != "sqrtsoftplus":
        raise ConfigError(f"scoring_func {scoring!r} is not supported; DeepSeek-V4 uses 'sqrtsoftplus'")
    if int(get("n_shared_experts")) != 1:
        raise ConfigError(f"n_shared_experts {d['n_shared_experts']} is not supported; expected 1")
    if int(get("num_key_value_heads")) != 1:
        raise ConfigError(f"num_key_value_heads {d['num_key_value_heads']} is not supported; expected 1 (K=V MQA)")
    if d.get("tie_word_embeddings"):
        raise ConfigError("tie_word_embeddings=true is not supported: DeepSeek-V4 has an untied lm_head")

    eos = d.get("eos_token_id", CONFIG_KEYS["eos_token_id"])  # null: no EOS token
    eos = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))

    fields = dict(
        num_hidden_layers=n, head_dim=head_dim, qk_rope_head_dim=rope_dim, layer_types=layer_types,
        mlp_layer_types=mlp_layer_types, csa_compress_rate=csa_rate, hca_compress_rate=hca_rate,
        rope_theta=rope_theta, compress_rope_theta=compress_theta, compress_yarn=yarn, eos_token_ids=eos,
    )
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "q_lora_rank", "o_groups", "o_lora_rank",
                 "sliding_window", "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts",
                 "num_experts_per_tok", "moe_intermediate_size", "hc_mult", "hc_sinkhorn_iters",
                 "num_nextn_predict_layers"):
        fields[name] = int(get(name))
    for name in ("routed_scaling_factor", "swiglu_limit", "hc_eps", "rms_norm_eps"):
        fields[name] = float(get(name))
    fields["bos_token_id"] = d.get("bos_token_id", CONFIG_KEYS["bos_token_id"])  # null: no BOS token
    return fields


def _validate(c: DeepseekV4Config) -> None:
    def need(cond: bool, msg: str):
        if not cond:
            raise ConfigError(msg)

    positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "q_lora_rank",
                "o_groups", "o_lora_rank", "sliding_window", "index_n_heads", "index_head_dim", "index_topk",
                "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "hc_mult", "hc_sinkhorn_iters",
                "csa_compress_rate", "hca_compress_rate")
    for name in positive:
        v = getattr(c, name)
        need(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
    need(len(c.layer_types) == c.num_hidden_layers,
         f"len(layer_types) ({len(c.layer_types)}) must equal num_hidden_layers ({c.num_hidden_layers})")
    need(len(c.mlp_layer_types) == c.num_hidden_layers,
         f"len(mlp_layer_types) ({len(c.mlp_layer_types)}) must equal num_hidden_layers ({c.num_hidden_layers})")
    for i, t in enumerate(c.layer_types):
        need(t in LAYER_TYPES, f"layer_types[{i}] = {t!r} is not a known attention type; expected one of {LAYER_TYPES}")
    for i, t in enumerate(c.mlp_layer_types):
        need(t in MLP_LAYER_TYPES, f"mlp_layer_types[{i}] = {t!r} is not a known MoE type; expected one of {MLP_LAYER_TYPES}")
    need(c.head_dim % 2 == 0, f"head_dim {c.head_dim} must be even")
    need(c.qk_rope_head_dim % 2 == 0 and 0 < c.qk_rope_head_dim <= c.head_dim,
         f"qk_rope_head_dim {c.qk_rope_head_dim} must be even and in (0, head_dim={c.head_dim}]")
    need(c.qk_rope_head_dim <= c.index_head_dim,
         f"qk_rope_head_dim {c.qk_rope_head_dim} must not exceed index_head_dim {c.index_head_dim}")
    need(c.num_attention_heads % c.o_groups == 0,
         f"num_attention_heads {c.num_attention_heads} must be divisible by o_groups {c.o_groups}")
    need(c.num_experts_per_tok <= c.n_routed_experts,
         f"num_experts_per_tok {c.num_experts_per_tok} exceeds n_routed_experts {c.n_routed_experts}")
    need(c.csa_compress_rate != c.hca_compress_rate,
         f"CSA and HCA compress rates must differ, both are {c.csa_compress_rate}")
    need(c.rope_theta > 0 and c.compress_rope_theta > 0, "rope thetas must be positive")
    need(c.rms_norm_eps > 0 and c.hc_eps > 0, "rms_norm_eps and hc_eps must be positive")
    if c.compress_yarn is not None:
        y = c.compress_yarn
        need(y.factor >= 1.0, f"yarn factor {y.factor} must be >= 1")
        need(y.original_max_position_embeddings > 0 and math.isfinite(y.beta_fast) and math.isfinite(y.beta_slow),
             "yarn original_max_position_embeddings must be positive and betas finite")
    for e in c.eos_token_ids:
        need(0 <= e < c.vocab_size, f"eos_token_id {e} is outside the vocabulary [0, {c.vocab_size})")
