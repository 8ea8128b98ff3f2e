"""The mHC Sinkhorn kernel (kernels_pallas/sinkhorn.py) against ``dsv4_jax.hyper_connection.sinkhorn``.

CPU: interpret mode into a poisoned output (token counts below, at and above one block; n = 2 and 4;
1 and 20 iterations; large logits that the row softmax must shift), bad arguments, and a CUDA
cross-lowering check. GPU (skipped elsewhere): the compiled kernel at decode and prefill token counts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import sinkhorn as sk
from kernels_pallas.testing import lower_for_h100

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (runs the compiled kernel)")
EPS = 1e-6


def check(out, ref, *, what=""):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape and out.dtype == np.float32, (out.shape, out.dtype, ref.shape)
    assert np.isfinite(out).all(), f"{what}: {np.sum(~np.isfinite(out))} non-finite (unwritten) entries"
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 1e-5, f"{what}: max abs err / max |ref| = {err:.3g}"


# name -> (seed, shape, iters, logit scale, block_t)
CASES = {
    "decode_one_token": (1, (1, 1, 4, 4), 20, 3.0, None),
    "ragged_tokens": (2, (3, 45, 4, 4), 20, 3.0, 16),  # 135 tokens: 9 blocks, the last partly masked
    "n2_three_iters": (3, (7, 2, 2), 3, 1.0, None),
    "one_iteration": (4, (130, 4, 4), 1, 1.0, None),
    "large_logits": (5, (2, 8, 4, 4), 20, 80.0, None),  # exp would overflow without the max shift
}


@pytest.mark.parametrize("name", list(CASES))
def test_interpret_matches_reference(name):
    seed, shape, iters, scale, bt = CASES[name]
    x = jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32) * scale
    out = sk.sinkhorn(x, iters, EPS, block_t=bt, interpret=True, poison_outputs=True)
    check(out, sk.reference(x, iters, EPS), what=name)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"expected \[..., n, n\]"):
        sk.sinkhorn(jnp.zeros((3, 4, 5)), 20, EPS, interpret=True)
    with pytest.raises(ValueError, match="block_t=24"):
        sk.sinkhorn(jnp.zeros((3, 4, 4)), 20, EPS, block_t=24, interpret=True)


@pytest.mark.parametrize("T,kw", [(1, {}), (128, {}), (16384, {}), (100, dict(block_t=32, poison_outputs=True))])
def test_lowers_for_h100(T, kw):
    fn = functools.partial(sk.sinkhorn, iters=20, eps=EPS, **kw)
    assert "triton" in lower_for_h100(fn, jax.ShapeDtypeStruct((T, 4, 4), jnp.float32)).lower()


@on_gpu
@pytest.mark.parametrize("T", [1, 128, 16384, 1000])
def test_gpu_matches_reference(T):
    x = jax.random.normal(jax.random.PRNGKey(T), (T, 4, 4), jnp.float32) * 3.0
    check(sk.sinkhorn(x, 20, EPS, poison_outputs=True), jax.jit(sk.reference, static_argnums=(1, 2))(x, 20, EPS),
          what=f"T={T}")
