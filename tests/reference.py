"""The PyTorch reference: transformers' DeepseekV4ForCausalLM (fp32, eager attention, eager experts).

Builds a reference model for one of our configs with random weights, and re-randomises every
parameter and buffer that transformers initialises to zero or one (position biases, sinks, mHC
base/scale, norm weights, routing bias, tid2eid), so no parity check passes by accident.
"""

from __future__ import annotations

import torch
import transformers

from dsv4_jax.model.config import DeepseekV4Config

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()  # our tiny YaRN configs trip a factor-mismatch warning


def hf_config(cfg: DeepseekV4Config) -> transformers.DeepseekV4Config:
    hf = transformers.DeepseekV4Config(**cfg.to_hf_dict(), initializer_range=0.1)
    hf._attn_implementation = "eager"
    hf._experts_implementation = "eager"
    return hf


@torch.no_grad()
def build_reference(cfg: DeepseekV4Config, seed: int) -> transformers.DeepseekV4ForCausalLM:
    torch.manual_seed(seed)
    model = transformers.DeepseekV4ForCausalLM(hf_config(cfg)).float().eval()
    g = torch.Generator().manual_seed(seed + 1)

    def randn(t, std=1.0, mean=0.0):
        return torch.randn(t.shape, generator=g) * std + mean

    for name, p in model.named_parameters():
        if name.endswith(("position_bias",)):
            p.copy_(randn(p, 0.5))
        elif name.endswith("sinks"):
            p.copy_(randn(p, 1.0))
        elif name.endswith(("hc.base", "hc_base")):
            p.copy_(randn(p, 0.5))
        elif name.endswith(("hc.scale", "hc_scale")):
            p.copy_(randn(p, 0.3, 1.0))
        elif name.endswith(("hc.fn", "hc_fn")):
            p.copy_(randn(p, 0.05))
        elif "norm" in name and name.endswith("weight"):
            p.copy_(randn(p, 0.2, 1.0))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(randn(b, 0.1))
        elif name.endswith("tid2eid"):
            E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
            rows = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(b.shape[0])])
            b.copy_(rows)
    return model


@torch.no_grad()
def reference_logits(model, ids) -> "torch.Tensor":
    return model(input_ids=torch.as_tensor(ids, dtype=torch.long), use_cache=False).logits.float().numpy()


@torch.no_grad()
def topk_boundary_gap(model, ids, cfg) -> float:
    """Smallest gap between the k-th and (k+1)-th visible indexer score over all CSA layers and queries.

    A zero gap is a tie at the selection boundary (typically several scores of exactly 0 after the
    ReLU): the picked set is then implementation-defined, so parity inputs avoid it.
    """
    scores = []
    hooks = [layer.self_attn.compressor.indexer.scorer.register_forward_hook(lambda m, i, o: scores.append(o))
             for layer in model.model.layers
             if layer.self_attn.compressor is not None and hasattr(layer.self_attn.compressor, "indexer")]
    model(input_ids=torch.as_tensor(ids, dtype=torch.long), use_cache=False)
    for h in hooks:
        h.remove()
    gap, k, m = float("inf"), cfg.index_topk, cfg.csa_compress_rate
    for s in scores:
        for t in range(s.shape[1]):
            visible = (t + 1) // m
            if visible > k:
                top = torch.sort(s[:, t, :visible], dim=-1, descending=True).values
                gap = min(gap, float((top[:, k - 1] - top[:, k]).min()))
    return gap
