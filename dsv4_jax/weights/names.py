"""Checkpoint tensor names: DeepSeek's official spelling, transformers' and the mixed one, mapped to the
canonical parameter names of ``params.param_table`` (transformers' names), and quantisation scales to the
weights they belong to."""

from __future__ import annotations

import re

# The multi-token-prediction block's tensors: loaded into a model built with it, skipped otherwise.
MTP_PREFIXES = ("mtp.", "model.mtp.")
# Known tensors the model does not use: RoPE frequency buffers some exporters write.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def weight_of_scale(name: str) -> str | None:
    """The weight a quantisation scale belongs to, or None when ``name`` is not one.

    DeepSeek stores ``X.scale`` beside ``X.weight``; transformers appends ``_scale_inv`` to the weight's
    name (``X.weight_scale_inv``, ``experts.gate_up_proj_scale_inv``). mHC scales (``attn_hc.scale``,
    ``hc_attn_scale``) are parameters, not quantisation scales.
    """
    if name.endswith("_scale_inv"):
        return name[: -len("_scale_inv")]
    if name.endswith(".scale") and not name.endswith("_hc.scale"):
        return name[: -len(".scale")] + ".weight"
    return None


# DeepSeek's official names (and the mixed spelling transformers' save_pretrained writes) -> canonical.
# Applied in order to the name without its leading "model."; mirrors transformers' conversion mapping.
_RENAMES = [(re.compile(p), r) for p, r in [
    (r"^embed\.weight$", "embed_tokens.weight"),
    (r"^head\.weight$", "lm_head.weight"),
    (r"(^|\.)hc_head_(fn|base|scale)$", r"\1hc_head.hc_\2"),
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.self_attn\.indexer\.compressor\.", ".self_attn.compressor.indexer."),
    (r"\.self_attn\.indexer\.weights_proj\.", ".self_attn.compressor.indexer.scorer.weights_proj."),
    (r"\.self_attn\.indexer\.wq_b\.", ".self_attn.compressor.indexer.q_b_proj."),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
    (r"\.attn_sink$", ".sinks"),
    (r"^((?:layers|mtp)\.\d+\..+)\.norm\.", r"\1.kv_norm."),
    (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.wq_b\.", ".q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
]]
# One expert's matrix in a per-expert checkpoint -> (stacked parameter, expert, which part).
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.w([123])\.weight$")


def canonical_name(name: str) -> tuple[str, tuple[int, int] | None]:
    """Checkpoint tensor name -> (canonical parameter name, (expert, part) for per-expert tensors).

    part 1/3 are the gate/up halves of ``gate_up_proj[e]``, part 2 is ``down_proj[e]``.
    """
    s = name[len("model."):] if name.startswith("model.") else name
    for pattern, repl in _RENAMES:
        s = pattern.sub(repl, s)
    full = s if s.startswith("lm_head.") else "model." + s
    m = _EXPERT.match(full)
    if m:
        part = int(m.group(3))
        return f"{m.group(1)}.{'down_proj' if part == 2 else 'gate_up_proj'}", (int(m.group(2)), part)
    return full, None
