"""The learned router's choice (kernels_pallas/router.py) against moe.route_learned, and the MoE layer's
few-token path that uses it against the XLA path.

CPU: Pallas interpret mode into poisoned outputs on fresh random inputs (Flash's 256 experts, a count that is
not a power of two, ties at the k-th place, one to 16 tokens, a NaN row), bad arguments, a CUDA lowering
check at the Flash shapes. GPU (skipped elsewhere): the compiled kernel on the benchmark's cases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax import moe
from kernels_pallas import router
from kernels_pallas.testing import lower_for_h100

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (runs the compiled kernel)")


def check(got, want, what):
    (w, ids), (ref_w, ref_ids) = got, want
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids), err_msg=f"{what}: ids")
    np.testing.assert_allclose(np.asarray(w), np.asarray(ref_w), rtol=2e-6, atol=0, err_msg=f"{what}: weights")


# name -> (seed, tokens, experts, k, logits drawn from this many values (ties) or None)
CASES = {
    "flash_one_token": (0, 1, 256, 6, None),
    "flash_16_tokens_tied": (1, 16, 256, 6, 5),
    "twelve_experts": (2, 3, 12, 2, None),  # padded to 16 with -inf
    "tiny_all_tied": (3, 4, 8, 2, 1),  # every score equal: ids 0, 1
    "k_equals_e": (4, 2, 8, 8, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_interpret_matches_reference(name):
    seed, T, E, k, values = CASES[name]
    kl, kb = jax.random.split(jax.random.PRNGKey(seed))
    if values is None:
        logits = 3.0 * jax.random.normal(kl, (T, E), jnp.float32)
        bias = 0.1 * jax.random.normal(kb, (E,), jnp.float32)
    else:  # few distinct logits and no bias: ties, broken by the lower id
        logits = jax.random.randint(kl, (T, E), 0, values).astype(jnp.float32)
        bias = jnp.zeros((E,), jnp.float32)
    kw = dict(k=k, route_scale=2.5)
    check(router.route(logits, bias, interpret=True, poison_outputs=True, **kw),
          router.reference(logits, bias, **kw), name)


def test_nan_row_gives_valid_ids_and_other_rows_exact():
    logits = jax.random.normal(jax.random.PRNGKey(5), (3, 256), jnp.float32).at[1, ::3].set(jnp.nan)
    bias = jnp.zeros((256,), jnp.float32)
    w, ids = router.route(logits, bias, k=6, route_scale=1.0, interpret=True, poison_outputs=True)
    ref_w, ref_ids = router.reference(logits, bias, k=6, route_scale=1.0)
    assert ((0 <= np.asarray(ids)) & (np.asarray(ids) < 256)).all()
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids))  # the same clamp of shared rank 0
    check((w[::2], ids[::2]), (ref_w[::2], ref_ids[::2]), "finite rows")


def test_moe_few_token_path_matches_xla():
    """The learned MoE layer at 3 tokens with kernels="pallas" (router kernel; fp32 experts stay on XLA)
    against kernels="xla"."""
    from conftest import tiny
    from dsv4_jax.config import MOE
    from flax import nnx

    cfg = tiny(mlp_layer_types=(MOE,) * 5)
    layer = moe.MoE(cfg, 0, dtype=jnp.float32, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.PRNGKey(6), (1, 3, cfg.hidden_size), jnp.float32)
    tokens = jnp.zeros((1, 3), jnp.int32)
    want = layer(x, tokens, "xla")
    got = layer(x, tokens, "pallas")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise():
    logits, bias = jnp.zeros((2, 8)), jnp.zeros((8,))
    with pytest.raises(ValueError, match="bias"):
        router.route(logits, jnp.zeros((7,)), k=2, route_scale=1.0)
    with pytest.raises(ValueError, match="k=9"):
        router.route(logits, bias, k=9, route_scale=1.0)
    with pytest.raises(ValueError, match="block_e=3"):
        router.route(logits, bias, k=2, route_scale=1.0, block_e=3)


@pytest.mark.parametrize("T", [1, 16])
def test_lowers_for_h100(T):
    args = (jax.ShapeDtypeStruct((T, 256), jnp.float32), jax.ShapeDtypeStruct((256,), jnp.float32))
    assert "triton" in lower_for_h100(lambda lg, b: router.route(lg, b, k=6, route_scale=1.5), *args).lower()


@on_gpu
@pytest.mark.parametrize("case", [c["name"] for c in router.bench_cases()])
def test_gpu_bench_cases_match_reference(case):
    [c] = [c for c in router.bench_cases() if c["name"] == case]
    args = c["args"](jax.random.PRNGKey(7))
    check(router.route(*args, poison_outputs=True, **c["kwargs"]), jax.jit(router.reference, static_argnames=(
        "k", "route_scale"))(*args, **c["kwargs"]), case)
