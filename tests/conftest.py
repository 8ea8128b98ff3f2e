"""Shared fixtures: tiny random configs and their PyTorch reference models (built once per session)."""

from __future__ import annotations

import os
import weakref

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache (dsv4_jax.runtime.compile_cache) in tests, CLI subprocesses included: tests
# that time compilation must compile, and tests must not share state through a cache directory.
os.environ["DSV4_JAX_COMPILE_CACHE"] = "0"

import jax
import numpy as np
import pytest

# True fp32 matmuls on every backend (on GPU JAX's default precision uses TF32-class products).
jax.config.update("jax_default_matmul_precision", "highest")

from dsv4_jax.model.config import CSA, HASH_MOE, HCA, MOE, SLIDING, DeepseekV4Config, YarnScaling


def tiny(**overrides) -> DeepseekV4Config:
    """A small config with every feature switched on; override what a case needs."""
    base = dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, head_dim=32,
        qk_rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=8,
        layer_types=(SLIDING, SLIDING, CSA, HCA, CSA), mlp_layer_types=(HASH_MOE,) * 3 + (MOE,) * 2,
        hca_compress_rate=8, compress_yarn=YarnScaling(4.0, 16),
        # 8 indexer heads: with few heads many scores are exactly 0 after the ReLU and top-k ties
        # would make the selected set implementation-defined.
        index_n_heads=8, index_head_dim=16, index_topk=4,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    )
    base.update(overrides)
    return DeepseekV4Config(**base)


# name -> (config, batch, seq_len). Together they cover: all three attention types, hash and learned
# MoE, lengths that are not multiples of 4 or of the HCA rate, compressed entries above and below
# index_topk, batch > 1, YaRN bending the compressed-layer frequencies, Flash- and Pro-like schedules,
# hyper-connection widths 2, 3 and 4, and exactly index_topk entries (every entry picked).
PARITY_CASES = {
    "mixed": (tiny(), 2, 67),
    "flash_like": (tiny(num_hidden_layers=6, layer_types=(SLIDING, SLIDING, CSA, HCA, CSA, HCA),
                        mlp_layer_types=(HASH_MOE,) * 3 + (MOE,) * 3, hca_compress_rate=16, index_topk=32,
                        compress_yarn=YarnScaling(8.0, 32)), 1, 53),
    "pro_like": (tiny(layer_types=(HCA, HCA, CSA, HCA, CSA), num_attention_heads=8, o_groups=4, index_topk=8,
                      routed_scaling_factor=2.5), 3, 45),
    "wide": (tiny(hidden_size=96, num_attention_heads=6, o_groups=3, head_dim=64, qk_rope_head_dim=16,
                  sliding_window=16, index_topk=6, hca_compress_rate=32, index_head_dim=32,
                  num_hidden_layers=4, layer_types=(SLIDING, CSA, HCA, CSA),
                  mlp_layer_types=(HASH_MOE, MOE, MOE, MOE), n_routed_experts=6, num_experts_per_tok=3,
                  compress_yarn=YarnScaling(16.0, 64)), 2, 101),
    "hc2_exact_k": (tiny(hc_mult=2, index_topk=10, num_hidden_layers=3, layer_types=(SLIDING, CSA, HCA),
                         mlp_layer_types=(HASH_MOE, MOE, MOE)), 1, 40),
    "hc3": (tiny(hc_mult=3, num_hidden_layers=3, layer_types=(CSA, HCA, SLIDING),
                 mlp_layer_types=(HASH_MOE, MOE, MOE)), 2, 29),
}


class ReferenceCase:
    """One config with its reference model, a saved HF checkpoint, token ids and reference logits."""

    def __init__(self, name: str, tmp_root):
        from reference import build_reference, reference_logits, topk_boundary_gap

        self.name = name
        self.cfg, batch, seq = PARITY_CASES[name]
        self.ref = build_reference(self.cfg, seed=sum(map(ord, name)))
        rng = np.random.RandomState(len(name))
        for _ in range(20):  # inputs whose top-k selection is well defined (no tie at the boundary)
            self.ids = rng.randint(0, self.cfg.vocab_size, (batch, seq))
            if topk_boundary_gap(self.ref, self.ids, self.cfg) > 1e-6:
                break
        else:
            raise RuntimeError(f"no tie-free inputs found for parity case {name}")
        self.ref_logits = reference_logits(self.ref, self.ids)
        self.path = tmp_root / name
        self.ref.save_pretrained(self.path)


@pytest.fixture(scope="session")
def reference_case(tmp_path_factory):
    """reference_case(name) -> ReferenceCase, cached for the session."""
    cache = {}
    root = tmp_path_factory.mktemp("reference")

    def get(name: str) -> ReferenceCase:
        if name not in cache:
            cache[name] = ReferenceCase(name, root)
        return cache[name]

    return get


@pytest.fixture
def host_tensors_alive(monkeypatch):
    """Watches checkpoint.iter_tensors: returns a dict whose "read" counts the host arrays read and whose
    "most_alive" is the largest number of earlier ones still alive when the next was read (streaming: <= 1)."""
    from dsv4_jax.weights import checkpoint

    seen = {"read": 0, "most_alive": 0}
    live = []
    real_iter = checkpoint.iter_tensors

    def spy(files, *args, **kwargs):
        for name, value, f in real_iter(files, *args, **kwargs):
            seen["most_alive"] = max(seen["most_alive"], sum(r() is not None for r in live))
            live.append(weakref.ref(value))  # a QuantArray's codes and scales live and die with it
            seen["read"] += 1
            yield name, value, f

    monkeypatch.setattr(checkpoint, "iter_tensors", spy)
    return seen
