"""The mHC pre-step kernel (kernels_pallas/hc_pre.py) against the XLA path (hc_weights, then collapse).

CPU: interpret mode into poisoned outputs (token counts below, at and above one block; n = 2 and 4; 1, 3
and 20 Sinkhorn iterations; bf16 and fp32 streams; tiles narrower than d; large mixing logits that the
row softmax must shift; with the sub-block's RMSNorm, one or several tokens per program), the in-register
Sinkhorn against the reference's on plain arrays, bad arguments, and a CUDA cross-lowering check. GPU (skipped elsewhere): the compiled kernel at decode and prefill token
counts with the Flash sizes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.ops.hyper_connection import hc_weights, sinkhorn
from kernels_pallas import hc_pre as hp
from kernels_pallas.testing import lower_for_h100
from scripts import kernel_cases

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (runs the compiled kernel)")
EPS = 1e-6


def inputs(seed, lead, n, d, dtype, fn_scale=0.02):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    R = (2 + n) * n
    return (jax.random.normal(k1, (*lead, n, d), jnp.float32).astype(dtype),
            fn_scale * jax.random.normal(k2, (R, n * d), jnp.float32), 0.5 * jax.random.normal(k3, (R,), jnp.float32),
            1.0 + 0.5 * jax.random.uniform(k4, (3,), jnp.float32))


# max |err| / max |ref| of x, post and comb in CPU interpret mode: measured 0-1.82e-7 over the cases, bf16 and fp32
# streams alike (kernel and reference round the same fp32 values); 10x. The GPU bounds (tol None) are the H200's.
CPU_TOL = 2e-6


def check(got, want, *, tol=None, what=""):
    """Each output within ``tol`` (printed: ``pytest -s``), or the GPU bounds below."""
    for name, g, w, gpu_tol in zip(("x", "post", "comb"), got, want, (None, 1e-5, 1e-5)):
        assert g.dtype == w.dtype, (what, name, g.dtype, w.dtype)
        g, w = np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32))
        assert g.shape == w.shape, (what, name, g.shape, w.shape)
        assert np.isfinite(g).all(), f"{what} {name}: {np.sum(~np.isfinite(g))} non-finite (unwritten) entries"
        # x in bf16: the kernel and the reference round the same fp32 sum, which may differ in its last bit.
        limit = tol or gpu_tol or (1e-5 if got[0].dtype == jnp.float32 else 2 ** -7)
        err = np.abs(g - w).max() / np.abs(w).max()
        print(f"{what} {name}: max abs err / max |ref| {err:.3g}")
        assert err < limit, f"{what} {name}: max abs err / max |ref| = {err:.3g}"


def norm_weight(seed, d):
    return 1.0 + 0.5 * jax.random.normal(jax.random.PRNGKey(100 + seed), (d,), jnp.float32)


# name -> (seed, lead shape, n, d, dtype, iters, fn scale, block_t, block_d, with the RMSNorm)
CASES = {
    "decode_one_token": (1, (1, 1), 4, 128, jnp.bfloat16, 20, 0.02, 16, None, False),
    "ragged_tokens_fp32": (2, (3, 15), 4, 64, jnp.float32, 20, 0.02, 16, 16, False),  # 45 tokens, d in 4 tiles
    "n2_three_iters": (3, (7,), 2, 32, jnp.float32, 3, 0.02, 16, None, False),
    "one_iteration_block32": (4, (70,), 4, 64, jnp.bfloat16, 1, 0.02, 32, 32, False),
    "large_logits": (5, (2, 9), 4, 64, jnp.float32, 20, 3.0, 16, None, False),  # exp would overflow unshifted
    "norm_decode_one_token": (6, (1, 1), 4, 128, jnp.bfloat16, 20, 0.02, None, None, True),
    "norm_ragged_tokens": (7, (3, 5), 4, 64, jnp.bfloat16, 20, 0.02, None, None, True),  # a program per token
    "norm_four_tokens_per_program_fp32": (8, (11,), 2, 32, jnp.float32, 3, 0.02, 4, None, True),  # 3 ragged
    # few tokens over column blocks: the RMS factor from XLA's sum of squares (whole rows sum their own)
    "few_tokens_column_blocks": (10, (5,), 4, 64, jnp.bfloat16, 20, 0.02, None, 16, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_interpret_matches_reference(name):
    seed, lead, n, d, dtype, iters, fn_scale, bt, bd, norm = CASES[name]
    streams, fn, base, scale = inputs(seed, lead, n, d, dtype, fn_scale)
    kw = dict(norm_weight=norm_weight(seed, d), norm_eps=EPS) if norm else {}
    blocks = {k: v for k, v in (("block_t", bt), ("block_d", bd)) if v}  # the rest: the kernel's choice
    tuning = dataclasses.replace(hp.choose_tuning(d, norm), **blocks)
    got = hp.hc_pre(streams, fn, base, scale, rms_eps=EPS, hc_eps=EPS, iters=iters, tuning=tuning,
                    interpret=True, poison_outputs=True, **kw)
    check(got, hp.reference(streams, fn, base, scale, rms_eps=EPS, hc_eps=EPS, iters=iters, **kw), tol=CPU_TOL,
          what=name)


@pytest.mark.parametrize("norm", [False, True])
def test_interpret_applies_each_eps_in_its_place(norm):
    """The other cases use one eps for all three, at 1e-6 of a mean square near 1, where no eps shows. Here the
    streams are small (mean square ~1e-6) and rms_eps, hc_eps, norm_eps are 1e-6, 1e-4, 1e-5, so each is of the
    size of what it is added to: one used in another's place moves x, post or comb by 13-67% (measured); the
    correct kernel stays within CPU_TOL (measured 0-1.83e-7). Three tokens: the RMS factor (and the norm) in
    the kernel."""
    streams, fn, base, scale = inputs(23, (3,), 4, 64, jnp.float32)
    streams = 1e-3 * streams
    kw = dict(rms_eps=1e-6, hc_eps=1e-4, iters=20, **(dict(norm_weight=norm_weight(20, 64), norm_eps=1e-5) if norm
                                                         else {}))
    check(hp.hc_pre(streams, fn, base, scale, interpret=True, poison_outputs=True, **kw),
          hp.reference(streams, fn, base, scale, **kw), tol=CPU_TOL, what=f"norm={norm}")


def test_norm_reads_the_unrounded_sum():
    """With the norm fused, x is the norm of the fp32 sum rounded once to bf16, kernel and XLA path alike (as
    XLA's GPU fusion computes the XLA path anyway; rounding the sum first made the kernel path's Flash-width
    decode logits 1.3x as far from fp32 as the XLA path's on an H200, run 36). Checked against float64; rounding
    the sum to bf16 first changes ~26% of the outputs here."""
    streams, fn, base, scale = inputs(9, (64,), 4, 128, jnp.bfloat16)
    weight = norm_weight(9, 128)
    kw = dict(rms_eps=EPS, hc_eps=EPS, iters=20, norm_weight=weight, norm_eps=EPS)
    pre, _, _ = hc_weights(streams, fn, base, scale, n=4, rms_eps=EPS, hc_eps=EPS, sinkhorn_iters=20)
    total = (np.asarray(pre, np.float64)[..., None] * np.asarray(streams.astype(jnp.float32), np.float64)).sum(-2)

    def normed_bf16(v):  # float64 RMSNorm, rounded once (via fp32) to bf16
        v = np.asarray(weight, np.float64) * v / np.sqrt((v * v).mean(-1, keepdims=True) + EPS)
        return np.asarray(jnp.asarray(v, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))

    want = normed_bf16(total)
    rounded_first = normed_bf16(np.asarray(jnp.asarray(total, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32)))
    assert (rounded_first != want).mean() > 0.1  # the check below tells the two apart
    for what, x in (("kernel", hp.hc_pre(streams, fn, base, scale, interpret=True, **kw)[0]),
                    ("reference", hp.reference(streams, fn, base, scale, **kw)[0])):
        assert x.dtype == jnp.bfloat16
        mismatched = (np.asarray(x.astype(jnp.float32)) != want).mean()
        assert mismatched < 0.01, f"{what}: {mismatched:.1%} of x differ from the once-rounded norm"


@pytest.mark.parametrize("n,iters", [(4, 20), (2, 1), (3, 5)])
def test_sinkhorn_entries_matches_reference(n, iters):
    x = jax.random.normal(jax.random.PRNGKey(n), (50, n, n), jnp.float32) * 30.0
    got = hp.sinkhorn_entries([[x[:, i, j] for j in range(n)] for i in range(n)], iters, EPS)
    got = jnp.stack([jnp.stack(row, -1) for row in got], -2)
    want = sinkhorn(x, iters, EPS)
    assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) < 1e-5


def test_bad_arguments_raise():
    streams, fn, base, scale = inputs(0, (3,), 4, 64, jnp.float32)
    kw = dict(rms_eps=EPS, hc_eps=EPS, iters=20, interpret=True)
    with pytest.raises(ValueError, match="d a power of two"):
        hp.hc_pre(streams[..., :48], fn, base, scale, **kw)
    with pytest.raises(ValueError, match=r"fn \[\(2\+n\)n, n\*d\]"):
        hp.hc_pre(streams, fn[:, :-1], base, scale, **kw)
    with pytest.raises(ValueError, match="block_d=48"):
        hp.TuningConfig(block_d=48)
    with pytest.raises(ValueError, match="block_t=3"):
        hp.TuningConfig(block_t=3)
    with pytest.raises(ValueError, match=r"norm_weight \(32,\), expected \[64\]"):
        hp.hc_pre(streams, fn, base, scale, norm_weight=jnp.ones((32,)), **kw)
    with pytest.raises(ValueError, match="block_d=32 .* equal to it with norm_weight"):
        hp.hc_pre(streams, fn, base, scale, norm_weight=jnp.ones((64,)), tuning=hp.TuningConfig(block_d=32), **kw)
    assert not hp.supported(4, 48) and hp.supported(4, 4096)


@pytest.mark.parametrize("T,kw,norm", [(1, {}, False), (128, {}, False), (16384, {}, False),
                                       (100, dict(tuning=hp.TuningConfig(block_t=32), poison_outputs=True), False),
                                       (1, {}, True), (128, dict(poison_outputs=True), True)])
def test_lowers_for_h100(T, kw, norm):
    n, d = 4, 4096
    fn = functools.partial(hp.hc_pre, rms_eps=EPS, hc_eps=EPS, iters=20, **kw)
    args = (jax.ShapeDtypeStruct((T, n, d), jnp.bfloat16), jax.ShapeDtypeStruct(((2 + n) * n, n * d), jnp.float32),
            jax.ShapeDtypeStruct(((2 + n) * n,), jnp.float32), jax.ShapeDtypeStruct((3,), jnp.float32))
    if norm:
        fn = kernel_cases.with_norm(fn)
        args = (*args, jax.ShapeDtypeStruct((d,), jnp.float32))
    assert "triton" in lower_for_h100(fn, *args).lower()


@on_gpu
@pytest.mark.parametrize("T", [1, 128, 16384, 1000])
@pytest.mark.parametrize("norm", [False, True])
def test_gpu_matches_reference(T, norm):
    streams, fn, base, scale = inputs(T, (T,), 4, 4096, jnp.bfloat16)
    kw = dict(rms_eps=EPS, hc_eps=EPS, iters=20)
    if norm:
        kw.update(norm_weight=norm_weight(T, 4096), norm_eps=EPS)
    check(hp.hc_pre(streams, fn, base, scale, poison_outputs=True, **kw),
          jax.jit(functools.partial(hp.reference, **kw))(streams, fn, base, scale), what=f"T={T}")
