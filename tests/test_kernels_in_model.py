"""The model's "pallas" switch against its "xla" reference path (decode steps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny
from dsv4_jax.cache import init_cache
from dsv4_jax.config import CSA, HASH_MOE, HCA, MOE, SLIDING, DeepseekV4Config
from dsv4_jax.engine import Engine, _chunk_step
from dsv4_jax.model import DeepseekV4ForCausalLM
from dsv4_jax.random_weights import random_model


def decode_logits(model, prompt: np.ndarray, steps: np.ndarray, capacity: int, kernels: str) -> np.ndarray:
    """Prefill ``prompt`` [B, P] (reference path), then one decode step per column of ``steps`` [B, T]."""
    graphdef, state = nnx.split(model)
    B, P = prompt.shape
    cache = init_cache(model.config, B, capacity, model.dtype)
    _, cache = _chunk_step(graphdef, state, cache, jnp.asarray(prompt), jnp.zeros(B, jnp.int32),
                           jnp.full(B, P, jnp.int32), capacity=capacity, last_only=True)
    out = []
    for t in range(steps.shape[1]):
        logits, cache = _chunk_step(graphdef, state, cache, jnp.asarray(steps[:, t:t + 1]),
                                    jnp.full(B, P + t, jnp.int32), jnp.ones(B, jnp.int32), capacity=capacity,
                                    last_only=True, kernels=kernels)
        out.append(np.asarray(logits, np.float32))
    return np.stack(out, 1)


def test_pallas_decode_matches_xla_on_cpu_interpret():
    """Kernels run in Pallas interpret mode on the CPU; prompt long enough that the CSA indexer selects
    (entries > top-k) and HCA entries exist; the steps cross a CSA and an HCA window boundary."""
    model = DeepseekV4ForCausalLM(tiny(), rngs=nnx.Rngs(11))
    rng = np.random.RandomState(4)
    prompt, steps = rng.randint(0, 256, (2, 29)), rng.randint(0, 256, (2, 4))
    ref = decode_logits(model, prompt, steps, 40, "xla")
    got = decode_logits(model, prompt, steps, 40, "pallas")
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_engine_rejects_unknown_kernels():
    from dsv4_jax.model import InputError

    with pytest.raises(InputError, match="kernels 'cuda' is not one of"):
        Engine(DeepseekV4ForCausalLM(tiny(), rngs=nnx.Rngs(0)), kernels="cuda")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_pallas_decode_matches_xla_on_flash_width_slice():
    """Flash-width attention (hidden 4096, 64 x 512 heads, indexer 64 x 128, top-k 512) in bf16; experts
    reduced to 16 (the kernels do not touch the MoE). Bound: bf16 tolerance on the logits."""
    cfg = DeepseekV4Config.flash(num_hidden_layers=3, layer_types=(SLIDING, CSA, HCA),
                                 mlp_layer_types=(HASH_MOE, MOE, MOE), n_routed_experts=16)
    model = random_model(cfg, jnp.bfloat16)
    rng = np.random.RandomState(0)
    prompt, steps = rng.randint(0, cfg.vocab_size, (4, 2300)), rng.randint(0, cfg.vocab_size, (4, 3))
    ref = decode_logits(model, prompt, steps, 2400, "xla")
    got = decode_logits(model, prompt, steps, 2400, "pallas")
    err = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"pallas vs xla decode logits (bf16, Flash-width): max abs err / max |logit| = {err:.4f}")
    assert np.isfinite(got).all() and err < 2e-2
