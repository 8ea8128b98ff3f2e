"""The mHC post-step kernel (kernels_pallas/hc_post.py: expand + the next pre-step's mixing matmul in partial
sums) against its XLA meaning, and the two kernels between sub-blocks (``HyperConnection.after``) against
the XLA path.

CPU: interpret mode into poisoned outputs (token counts below, at and above one block; n = 2 and 4; bf16 and
fp32 streams; column blocks narrower than d), the composition with ``hc_pre_partials`` over several
partials, bad arguments, and a CUDA cross-lowering check. GPU (skipped elsewhere): the compiled kernel at
decode and prefill token counts with the Flash sizes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny
from dsv4_jax.hyper_connection import HyperConnection
from kernels_pallas import hc_post as hq
from kernels_pallas.testing import lower_for_h100

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (runs the compiled kernel)")


def inputs(seed, lead, n, d, dtype):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    R = (2 + n) * n
    return (jax.random.normal(k[0], (*lead, n, d), jnp.float32).astype(dtype),
            jax.random.normal(k[1], (*lead, d), jnp.float32).astype(dtype),
            2 * jax.nn.sigmoid(jax.random.normal(k[2], (*lead, n), jnp.float32)),
            jax.nn.softmax(jax.random.normal(k[3], (*lead, n, n), jnp.float32), axis=-1),
            0.02 * jax.random.normal(k[4], (R, n * d), jnp.float32))


def check(got, want, *, what=""):
    """New streams: bf16 within one rounding of the same fp32 sum (fp32: 1e-6); partial sums: summed over
    the partials, within 1e-5 of the reference's single matmul / sum of squares."""
    new, raw, sq = got
    w_new, w_raw, w_sq = want
    g, w = np.asarray(new, np.float32), np.asarray(w_new, np.float32)
    assert g.shape == w.shape and np.isfinite(g).all(), f"{what}: new streams {g.shape} vs {w.shape}, unwritten"
    tol = 1e-6 if new.dtype == jnp.float32 else 2 ** -7
    assert np.abs(g - w).max() <= tol * np.abs(w).max(), f"{what}: new streams err {np.abs(g - w).max()}"
    for name, part, ref in (("raw", raw, w_raw), ("sq", sq, w_sq)):
        p = np.asarray(part)
        assert np.isfinite(p).all(), f"{what}: {np.sum(~np.isfinite(p))} unwritten {name} partials"
        total, ref = p.sum(0), np.asarray(ref)[0]
        err = np.abs(total - ref).max() / np.abs(ref).max()
        assert err < 1e-5, f"{what}: {name} partial sums err {err:.3g}"


# name -> (seed, lead shape, n, d, dtype, block_t, block_d)
CASES = {
    "decode_one_token": (1, (1, 1), 4, 128, jnp.bfloat16, 16, None),
    "ragged_tokens_fp32": (2, (3, 15), 4, 64, jnp.float32, 16, 16),  # 45 tokens, 4 partials
    "n2": (3, (7,), 2, 32, jnp.float32, 16, None),
    "block32_bf16": (4, (70,), 4, 64, jnp.bfloat16, 32, 32),
}


@pytest.mark.parametrize("name", list(CASES))
def test_interpret_matches_reference(name):
    seed, lead, n, d, dtype, bt, bd = CASES[name]
    args = inputs(seed, lead, n, d, dtype)
    got = hq.hc_post(*args, block_t=bt, block_d=bd, interpret=True, poison_outputs=True)
    assert got[1].shape[0] == d // (bd or min(d, 128))
    check(got, hq.reference(*args), what=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_after_pallas_matches_xla(dtype):
    """``HyperConnection.after``: expand then pre-step, the two kernels (several partials) against XLA.
    fp32: within 1e-5 (the kernels apply the RMS factor after the matmul, XLA before it); bf16: the sub-block
    input within one bf16 rounding, the rest as fp32."""
    cfg = tiny(hidden_size=64)
    hc = HyperConnection(cfg, rngs=nnx.Rngs(3))
    streams, block_out, post, comb, _ = inputs(5, (2, 9), cfg.hc_mult, cfg.hidden_size, dtype)
    want = hc.after(streams, block_out, post, comb, "xla")
    got = hc.after(streams, block_out, post, comb, "pallas")
    for name, g, w in zip(("streams", "x", "post", "comb"), got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        tol = 2 ** -7 if dtype == jnp.bfloat16 and name in ("streams", "x") else 1e-5
        assert np.abs(g - w).max() <= tol * np.abs(w).max(), (name, np.abs(g - w).max())


def test_bad_arguments_raise():
    streams, block_out, post, comb, fn = inputs(0, (3,), 4, 64, jnp.float32)
    with pytest.raises(ValueError, match="d a power of two"):
        hq.hc_post(streams[..., :48], block_out[..., :48], post, comb, fn, interpret=True)
    with pytest.raises(ValueError, match=r"fn \[\(2\+n\)n, n\*d\]"):
        hq.hc_post(streams, block_out, post, comb, fn[:, :-1], interpret=True)
    with pytest.raises(ValueError, match="block_out"):
        hq.hc_post(streams, block_out[:2], post, comb, fn, interpret=True)
    with pytest.raises(ValueError, match="block_d=48"):
        hq.hc_post(streams, block_out, post, comb, fn, block_d=48, interpret=True)


@pytest.mark.parametrize("T", [1, 16384])
def test_lowers_for_h100(T):
    n, d = 4, 4096
    S = jax.ShapeDtypeStruct
    args = (S((T, n, d), jnp.bfloat16), S((T, d), jnp.bfloat16), S((T, n), jnp.float32), S((T, n, n), jnp.float32),
            S(((2 + n) * n, n * d), jnp.float32))
    assert "triton" in lower_for_h100(hq.hc_post, *args).lower()


@on_gpu
@pytest.mark.parametrize("T", [1, 128, 16384, 1000])
def test_gpu_matches_reference(T):
    args = inputs(T, (T,), 4, 4096, jnp.bfloat16)
    check(hq.hc_post(*args, poison_outputs=True), jax.jit(hq.reference)(*args), what=f"T={T}")


@on_gpu
def test_gpu_after_matches_xla():
    cfg = tiny(hidden_size=4096)
    hc = HyperConnection(cfg, rngs=nnx.Rngs(3))
    args = inputs(7, (4, 3), cfg.hc_mult, cfg.hidden_size, jnp.bfloat16)[:4]
    want = jax.jit(functools.partial(hc.after, kernels="xla"))(*args)
    got = jax.jit(functools.partial(hc.after, kernels="pallas"))(*args)
    for name, g, w in zip(("streams", "x", "post", "comb"), got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        tol = 2 ** -7 if name in ("streams", "x") else 1e-5
        assert np.abs(g - w).max() <= tol * np.abs(w).max(), (name, np.abs(g - w).max())
