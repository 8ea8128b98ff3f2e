"""Benchmark cases of the Pallas kernels (scripts/bench_kernels.py; the GPU and compile tests run them too).

``bench_cases(kernel)``: a list of dicts, each with ``name``, ``shapes``, ``args`` (PRNG key -> the positional
inputs), ``kwargs``, the kernel's ``tuning`` for the case where it depends on the shape, the minimal HBM
``bytes``, the ``flops``, and the ``pallas`` and ``reference`` functions to time; optionally ``matmul``, the
precision of the kernel's matmul roofline ("bf16", the default, or "fp8"), and ``baselines``, other
implementations timed beside them (each a dict of ``name``, ``fn``, its own ``args`` builder, ``kwargs`` and
``bytes``, and optionally its bf16 matmul ``flops``). The inputs are built here,
some from the model (its metadata, config and XLA path), so the kernel modules hold only kernels, tuning and
references and import nothing from dsv4_jax.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from dsv4_jax import ops
from dsv4_jax.model import kv_rows
from dsv4_jax.model.config import DeepseekV4Config
from dsv4_jax.model.metadata import build_metadata
from dsv4_jax.model.spec import Storage, storage_of
from dsv4_jax.ops.indexer import select_topk
from dsv4_jax.weights.params import abstract_model, param_table
from kernels_pallas import compressor as cp
from kernels_pallas import expert_rows as er
from kernels_pallas import fp8_gemm as fg
from kernels_pallas import fp8_linear as fl
from kernels_pallas import grouped_gemv as gg
from kernels_pallas import grouped_matmul as gm
from kernels_pallas import hc_pre as hc
from kernels_pallas import indexer as ix
from kernels_pallas import sparse_attention as sa
from kernels_pallas import topk as tk


def bench_cases(kernel: str) -> list[dict]:
    """The cases of ``kernels_pallas.<kernel>``."""
    if kernel not in CASES:
        raise ValueError(f"no benchmark cases for kernel {kernel!r}; expected one of {sorted(CASES)}")
    return CASES[kernel]()


# ----------------------------------------------------------------------------------------------------------
# Sparse attention
# ----------------------------------------------------------------------------------------------------------


def attention_decode_inputs(key, cfg: DeepseekV4Config, *, B: int, K: int, N: int, dtype=jnp.bfloat16):
    """One decode step per row at batch B in the model's layout (``attention_prefill_inputs`` for a chunk of
    one token), with ``cfg``'s sizes: the window block is the ring (W rows, the mask row from
    ``build_metadata``: all valid past the window), random q, ring and N compressed entries, K distinct random
    entry ids per row."""
    H, D, W = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
    start = N * cfg.csa_compress_rate  # the token after a context whose CSA cache holds N entries
    meta = build_metadata(cfg, jnp.full((B,), start), jnp.ones((B,), jnp.int32), 1, start + 1)
    kq, kw, ke, ki, ks = jax.random.split(key, 5)
    q = jax.random.normal(kq, (B, 1, H, D), jnp.float32).astype(dtype)
    win_keys = jax.random.normal(kw, (B, 1, W, D), jnp.float32).astype(dtype)
    entries = jax.random.normal(ke, (B, N, D), jnp.float32).astype(dtype)
    ids = jax.vmap(lambda k: jax.random.permutation(k, N)[:K])(jax.random.split(ki, B)).astype(jnp.int32)
    sinks = jax.random.normal(ks, (H,), jnp.float32)
    return q, win_keys, meta.window.key_mask, entries, ids[:, None], sinks


def fp8_keys(inputs: tuple, cfg: DeepseekV4Config) -> tuple:
    """Attention inputs with the window block and the entries as FP8 records (the model's
    ``kv_cache_dtype="fp8"`` cache, dsv4_jax/model/kv_rows.py)."""
    q, win_keys, mask, entries, ids, sinks = inputs
    R = cfg.qk_rope_head_dim
    return q, kv_rows.quantise(win_keys, R), mask, kv_rows.quantise(entries, R), ids, sinks


def reference_fp8(q, win_keys, win_mask, entries, entry_ids, sinks, scale):
    """``reference_prefill`` on FP8 records, dequantised first."""
    return sa.reference_prefill(q, kv_rows.dequantise(*win_keys, q.dtype), win_mask,
                                kv_rows.dequantise(*entries, q.dtype), entry_ids, sinks, scale)


def attention_prefill_inputs(key, cfg: DeepseekV4Config, *, prompt: int, chunk: int, ratio: int, dtype=jnp.bfloat16):
    """The last ``chunk`` tokens of a ``prompt``-token prefill at batch 1 in the model's layouts, with
    ``cfg``'s sizes: window blocks and mask rows from ``build_metadata``, random q, window rows and compressed
    entries (N = prompt // ratio, the cache of a ``prompt``-token capacity), per-query entry ids: CSA
    (``ratio`` = the CSA rate) the top-``index_topk`` of random scores among each query's visible entries, as
    the indexer returns them; HCA ``arange(N)`` masked to -1 from each query's visible count."""
    H, D, W = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
    C, N = chunk, prompt // ratio
    meta = build_metadata(cfg, jnp.array([prompt - C]), jnp.array([C]), C, prompt)
    n_visible = meta.compression[ratio].n_visible  # [1, C]
    kq, kw, ke, ki, ks = jax.random.split(key, 5)
    q = jax.random.normal(kq, (1, C, H, D), jnp.float32).astype(dtype)
    mask = meta.window.key_mask  # [1, C, Kw]
    win_keys = jax.random.normal(kw, (1, C // min(W, C), mask.shape[-1], D), jnp.float32).astype(dtype)
    entries = jax.random.normal(ke, (1, N, D), jnp.float32).astype(dtype)
    entry_ids = meta.compression[ratio].visible_ids  # HCA; None for CSA
    if entry_ids is None:
        scores = jax.random.uniform(ki, (1, C, N), jnp.float32)
        entry_ids = select_topk(scores, n_visible, min(cfg.index_topk, N))
    sinks = jax.random.normal(ks, (H,), jnp.float32)
    return q, win_keys, mask, entries, entry_ids, sinks


def model_attention(q, win_keys, win_mask, entries, entry_ids, sinks, scale, *, shared_entries: bool):
    """What the model computes on its XLA path (``dsv4_jax.ops.sparse_attention``) for ``reference_prefill``'s
    inputs: CSA gathers each query's picks; HCA (``shared_entries``: ids are ``arange(N)`` masked to -1)
    attends to all entries under the per-query mask."""
    with ops.use("xla"):
        return ops.sparse_attention(q, win_keys, win_mask, entries, entry_ids, sinks, scale,
                                    shared_entries=shared_entries)


def sparse_attention_cases():
    """Decode at Flash sizes in the model's decode layout (one query token per row, its window block the
    128-row ring): H=64, D=512, N=8192 entries, top-k 512 / 1024, B=32 / 128; against ``reference_prefill``.
    Prefill at Flash sizes: the last 2048-token chunk (scripts/bench_generate.py's default chunk) of an 8K
    and a 32K prompt, batch 1, on a CSA layer (128 window + 512 picked keys per query) and an HCA layer
    (128 window + every visible entry of the 64 / 256); against the model's XLA path."""
    cfg = DeepseekV4Config.flash()
    H, D, W = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
    itemsize = 2
    cases = []
    N = 8192
    for B in (32, 128):
        for K in (512, 1024):
            T = W + K
            cases.append({
                "name": f"decode_B{B}_K{K}",
                "shapes": {"B": B, "H": H, "D": D, "Wk": W, "K": K, "N": N},
                "args": functools.partial(attention_decode_inputs, cfg=cfg, B=B, K=K, N=N),
                "kwargs": {"scale": D ** -0.5},
                "tuning": sa.choose_tuning(B, H, W, K),
                # q + each distinct key row once + indices + output
                "bytes": B * (H * D * itemsize + T * D * itemsize + K * 4 + W + H * D * itemsize),
                "flops": 4 * B * H * T * D,  # QK^T and PV
                "pallas": sa.sparse_attention_prefill,
                "reference": sa.reference_prefill,
            })
    # The same steps on the FP8 cache: 583-byte key rows (448 e4m3 + 64 bf16 + 7 scale bytes), dequantised in
    # the kernel.
    fp8_row = (D - cfg.qk_rope_head_dim) + 2 * cfg.qk_rope_head_dim + -(-(D - cfg.qk_rope_head_dim) // 64)
    for case in [c for c in cases if c["name"].startswith("decode_")]:
        B, K = case["shapes"]["B"], case["shapes"]["K"]
        cases.append({
            **case,
            "name": case["name"].replace("decode_", "decode_fp8_"),
            "args": lambda key, case=case: fp8_keys(case["args"](key), cfg),
            "bytes": case["bytes"] - B * (W + K) * (D * itemsize - fp8_row),
            "reference": reference_fp8,
        })
    C = 2048
    for kind, ratio in (("csa", cfg.csa_compress_rate), ("hca", cfg.hca_compress_rate)):
        for prompt in (8192, 32768):
            N = prompt // ratio
            K = min(cfg.index_topk, N) if kind == "csa" else N
            pos = np.arange(prompt - C, prompt)
            keys = np.minimum(pos + 1, W) + np.minimum((pos + 1) // ratio, K)  # valid keys per query token
            rows = C // W * 2 * W  # window blocks of W + Bq rows, Bq = W
            cases.append({
                "name": f"prefill_{kind}_S{prompt}_C{C}",
                "shapes": {"B": 1, "C": C, "prompt": prompt, "H": H, "D": D, "W": W, "K": K, "N": N},
                "args": functools.partial(attention_prefill_inputs, cfg=cfg, prompt=prompt, chunk=C, ratio=ratio),
                "kwargs": {"scale": D ** -0.5},
                "tuning": sa.choose_tuning(C, H, 2 * W, K),  # window blocks of W + Bq rows, Bq = W
                # q + output + window blocks + every entry row once + ids + mask rows
                "bytes": 2 * C * H * D * itemsize + (rows + N) * D * itemsize + C * K * 4 + C * 2 * W,
                "flops": int(4 * H * D * keys.sum()),
                "pallas": sa.sparse_attention_prefill,
                "reference": functools.partial(model_attention, shared_entries=kind == "hca"),
            })
    return cases


# ----------------------------------------------------------------------------------------------------------
# Indexer scores
# ----------------------------------------------------------------------------------------------------------


FLASH_HI, FLASH_DI = DeepseekV4Config.flash().index_n_heads, DeepseekV4Config.flash().index_head_dim


def indexer_decode_inputs(key, B, HI, DI, N, *, full=True):
    """Random decode inputs; n_valid = N (full=True) or uniform in [1, N]."""
    kq, kk, kw, kn = jax.random.split(key, 4)
    q = jax.random.normal(kq, (B, HI, DI), jnp.float32).astype(jnp.bfloat16)
    keys = jax.random.normal(kk, (B, N, DI), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (B, HI), jnp.float32) * (DI ** -0.5 * HI ** -0.5)
    n = jnp.full((B,), N, jnp.int32) if full else jax.random.randint(kn, (B,), 1, N + 1, jnp.int32)
    return q, keys, w, n


def causal_n_visible(B, S, *, offset=0, rate=4):
    """n_visible[b, t] = (offset + t + 1) // rate: entries complete before query t of a chunk at ``offset``."""
    t = jnp.arange(S, dtype=jnp.int32)
    return jnp.broadcast_to((offset + t + 1) // rate, (B, S)).astype(jnp.int32)


def indexer_prefill_inputs(key, B, S, HI, DI, N):
    kq, kk, kw = jax.random.split(key, 3)
    q = jax.random.normal(kq, (B, S, HI, DI), jnp.float32).astype(jnp.bfloat16)
    keys = jax.random.normal(kk, (B, N, DI), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (B, S, HI), jnp.float32) * (DI ** -0.5 * HI ** -0.5)
    return q, keys, w, causal_n_visible(B, S)


def indexer_cases():
    """Flash sizes: decode B=32 x N=32768 keys; causal prefill S=8192 and 32768 (N = S/4), B=1."""
    HI, DI = FLASH_HI, FLASH_DI
    cases = []
    B, N = 32, 32768
    cases.append({
        "name": f"decode_B{B}_N{N}",
        "shapes": {"B": B, "HI": HI, "DI": DI, "N": N},
        "args": functools.partial(indexer_decode_inputs, B=B, HI=HI, DI=DI, N=N),
        "kwargs": {},
        "bytes": B * (N * DI * 2 + N * 4 + HI * DI * 2 + HI * 4 + 4),  # keys once + scores out + q, w, n
        "flops": 2 * B * N * HI * DI,
        "tuning": ix.choose_decode_tuning(),
        "pallas": ix.index_scores_decode,
        "reference": ix.reference_decode,
    })
    for S in (8192, 32768):
        N = S // 4
        visible_pairs = sum((t + 1) // 4 for t in range(S))
        cases.append({
            "name": f"prefill_S{S}_N{N}",
            "shapes": {"B": 1, "S": S, "HI": HI, "DI": DI, "N": N},
            "args": functools.partial(indexer_prefill_inputs, B=1, S=S, HI=HI, DI=DI, N=N),
            "kwargs": {},
            "bytes": S * HI * DI * 2 + N * DI * 2 + S * HI * 4 + S * 4 + S * N * 4,
            "flops": 2 * visible_pairs * HI * DI,
            "tuning": ix.choose_prefill_tuning(),
            "pallas": ix.index_scores_prefill,
            "reference": ix.reference_prefill,
        })
    return cases


# ----------------------------------------------------------------------------------------------------------
# Top-k
# ----------------------------------------------------------------------------------------------------------


def topk_inputs(key, R, N):
    ks, kn = jax.random.split(key)
    scores = jax.random.normal(ks, (R, N), jnp.float32)
    n = jax.random.randint(kn, (R,), N // 2, N + 1, jnp.int32)
    return scores, n


def topk_cases():
    """Flash decode at 128K context, batch 32 (32K index keys, k = 512; Pro's k = 1024 too), and a prefill
    chunk of 2048 query rows at the end of a 32K prompt (8K keys), against one ``lax.top_k``."""
    cases = []
    for R, N, k in ((32, 32768, 512), (32, 32768, 1024), (2048, 8192, 512)):
        cases.append({
            "name": f"topk{k}_R{R}_N{N}",
            "shapes": {"rows": R, "N": N, "k": k},
            "args": functools.partial(topk_inputs, R=R, N=N),
            "kwargs": {"k": k},
            "tuning": tk.choose_tuning(R, N, k),
            "bytes": R * (N * 4 + 4 + k * 4),
            "flops": 0,
            "pallas": tk.topk_indices,
            "reference": tk.reference,
        })
    return cases


# ----------------------------------------------------------------------------------------------------------
# Compressor
# ----------------------------------------------------------------------------------------------------------


FLASH_EPS = 1e-6


def _rng(key) -> np.random.Generator:
    """Host RNG seeded from a JAX PRNG key (fresh inputs per key without compiling jax.random programs)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def _normal(rng, shape, scale=1.0, dtype=jnp.float32):
    return jnp.asarray((scale * rng.standard_normal(shape, np.float32)).astype(np.float32)).astype(dtype)


def rope_angles(rng, shape):
    """Random cos, sin of ``shape`` (fp32)."""
    t = rng.uniform(0.0, 6.28, shape).astype(np.float32)
    return jnp.asarray(np.cos(t)), jnp.asarray(np.sin(t))


def compressor_prefill_inputs(key, B, S, m, D, R, overlap, dtype=jnp.bfloat16):
    """Random prefill inputs: kv, gate [B,S,coff*D] in dtype; ape, norm weight, cos/sin fp32."""
    C = 2 * D if overlap else D
    rng = _rng(key)
    kv = _normal(rng, (B, S, C), 1.0, dtype)
    gate = _normal(rng, (B, S, C), 2.0, dtype)
    ape = _normal(rng, (m, C), 0.5)
    w = 1.0 + _normal(rng, (D,), 0.1)
    cos, sin = rope_angles(rng, (B, S // m, R // 2))
    return kv, gate, ape, w, cos, sin


def compressor_decode_indices(pos, m: int, overlap: bool, n_entries: int):
    """Positions [B] of decoding rows -> (write_slot, entry_index) [B] int32 as the model's metadata gives
    them: the ring slot pos % span, and the window the token closes (N = ``n_entries`` for none)."""
    pos = jnp.asarray(pos, jnp.int32)
    closes = (pos + 1) % m == 0
    return pos % cp._span(m, overlap), jnp.where(closes, (pos + 1) // m - 1, n_entries).astype(jnp.int32)


def compressor_decode_inputs(key, B, m, D, R, overlap, *, all_close=True, dtype=jnp.float32, positions=None):
    """Random decode inputs (``compress_decode_step``'s positional arguments) for rows at ``positions`` [B]
    (default random; all_close: every row closes a window, pos = k*m - 1, k >= 1), a cache of 4096 // m rows."""
    C = 2 * D if overlap else D
    span = cp._span(m, overlap)
    n_entries = 4096 // m
    rng = _rng(key)
    kv_new = _normal(rng, (B, C), 1.0, dtype)
    gate_new = _normal(rng, (B, C), 2.0, dtype)
    state_kv = _normal(rng, (B, span, C))
    state_gate = _normal(rng, (B, span, C), 2.0)
    if positions is not None:
        pos = positions
    elif all_close:
        pos = rng.integers(1, 4096 // m, B) * m - 1
    else:
        pos = rng.integers(0, 4096, B)
    ape = _normal(rng, (m, C), 0.5)
    w = 1.0 + _normal(rng, (D,), 0.1)
    cos, sin = rope_angles(rng, (B, R // 2))
    cache = _normal(rng, (B, n_entries, D))
    slot, index = compressor_decode_indices(pos, m, overlap, n_entries)
    return kv_new, gate_new, state_kv, state_gate, slot, index, ape, w, cos, sin, cache


def _decode_entry_pallas(*args, **kwargs):
    """Bench view of the decode step: the entry only (the ring and cache writes are in-place under
    donation; without donation jit would time copies of the whole state and cache instead)."""
    return cp.compress_decode_step(*args, **kwargs)[0]


def _decode_entry_reference(*args, **kwargs):
    return cp.reference_decode_step(*args, **kwargs)[0]


def compressor_cases():
    """Prefill at Flash sizes (CSA m=4 / HCA m=128, D=512, R=64, S=8K/32K (HCA 16K too), B=1, bf16; plus the
    indexer's D=128 compressor) and the decode step at B=32 with every row closing a window (fp32 ring)."""
    R = 64
    cases = []
    for kind, m, D, overlap in (("csa", 4, 512, True), ("hca", 128, 512, False), ("indexer", 4, 128, True)):
        for S in (8192, 16384, 32768) if kind == "hca" else (8192, 32768):  # HCA: the engine's 16K chunk too
            B, nW = 1, S // m
            it = 2
            # every kv/gate element a pooled slot needs, once: b-halves of nW windows (+ a-halves of nW-1)
            slots = nW * m + ((nW - 1) * m if overlap else 0)
            nbytes = 2 * B * slots * D * it + B * nW * (D * 4 + R * 4) + m * D * (2 if overlap else 1) * 4
            cases.append({
                "name": f"prefill_{kind}_m{m}_d{D}_S{S}",
                "shapes": {"B": B, "S": S, "m": m, "D": D, "R": R, "overlap": overlap, "dtype": "bfloat16"},
                "args": functools.partial(compressor_prefill_inputs, B=B, S=S, m=m, D=D, R=R, overlap=overlap),
                "kwargs": {"ratio": m, "overlap": overlap, "eps": FLASH_EPS},
                "tuning": cp.choose_prefill_tuning(B, nW, m, D),
                "bytes": nbytes,
                "flops": 6 * B * slots * D + 8 * B * nW * D,
                "pallas": cp.compress_prefill,
                "reference": cp.reference_prefill,
            })
    for kind, m, D, overlap in (("csa", 4, 512, True), ("hca", 128, 512, False), ("indexer", 4, 128, True)):
        B = 32
        span = cp._span(m, overlap)
        C = 2 * D if overlap else D
        # closing rows read span slots x D channels of kv and gate (fp32 ring; the new token from kv_new)
        nbytes = B * (2 * (span - 1) * D * 4 + 2 * C * 4 + 2 * D * 4 + R * 4 + 8)  # + the entry's cache row
        cases.append({
            "name": f"decode_{kind}_m{m}_d{D}_B{B}",
            "shapes": {"B": B, "m": m, "D": D, "R": R, "overlap": overlap, "state_dtype": "float32"},
            "args": functools.partial(compressor_decode_inputs, B=B, m=m, D=D, R=R, overlap=overlap),
            "kwargs": {"ratio": m, "overlap": overlap, "eps": FLASH_EPS},
            "tuning": cp.choose_decode_tuning(m, D),
            "bytes": nbytes,
            "flops": 6 * B * span * D + 8 * B * D,
            "pallas": _decode_entry_pallas,
            "reference": _decode_entry_reference,
        })
    return cases


# ----------------------------------------------------------------------------------------------------------
# mHC pre-step
# ----------------------------------------------------------------------------------------------------------


def hc_pre_inputs(key, T, n, d, norm=False):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    R = (2 + n) * n
    args = (jax.random.normal(k1, (T, n, d), jnp.bfloat16), 0.02 * jax.random.normal(k2, (R, n * d), jnp.float32),
            0.1 * jax.random.normal(k3, (R,), jnp.float32), jnp.ones((3,), jnp.float32))
    return (*args, 1.0 + 0.1 * jax.random.normal(k4, (d,), jnp.float32)) if norm else args


def with_norm(fn):  # the norm weight as a fifth positional argument (the benchmark's inputs are positional)
    return lambda streams, fn_w, base, scale, norm_weight, **kw: fn(streams, fn_w, base, scale,
                                                                     norm_weight=norm_weight, **kw)


def hc_pre_cases():
    """Flash mHC (n = 4, d = 4096, 20 Sinkhorn iterations): a batch-1 and a batch-128 decode step's tokens,
    and a 16384-token prefill chunk, without and with the sub-block's RMSNorm; against the XLA path.
    Bytes: fn once, the streams twice, x once (fp32 without the norm; and the norm weight)."""
    n, d, iters = 4, 4096, 20
    return [{
        "name": f"hc_pre{'_norm' * norm}_T{T}",
        "shapes": {"T": T, "n": n, "d": d, "iters": iters, "norm": norm},
        "args": functools.partial(hc_pre_inputs, T=T, n=n, d=d, norm=norm),
        "kwargs": {"rms_eps": 1e-6, "hc_eps": 1e-6, "iters": iters, **({"norm_eps": 1e-6} if norm else {})},
        "tuning": hc.choose_tuning(d, norm),
        "bytes": (2 + n) * n * n * d * 4 + T * 2 * n * d * 2 + T * d * (2 if norm else 4) + norm * d * 4,
        "flops": 2 * T * (2 + n) * n * n * d,
        "pallas": with_norm(hc.hc_pre) if norm else hc.hc_pre,
        "reference": with_norm(hc.reference) if norm else hc.reference,
    } for norm in (False, True) for T in (1, 128, 16384)]


# ----------------------------------------------------------------------------------------------------------
# Expert matmuls
# ----------------------------------------------------------------------------------------------------------


def fp4_experts(key, G: int, N: int, K: int, scale_dtype=jnp.float8_e8m0fnu) -> tuple[jax.Array, jax.Array]:
    """FP4 experts as the release stores them (kernels_pallas/common.py): w int8 [G, N, K/2], every byte (so
    every code in both nibbles) equally likely; w_scales [G, N, K/32] in ``scale_dtype``, powers of two
    2^-8 .. 2^-3 drawn per block (so a wrong block's scale shows)."""
    kw, ks = jax.random.split(key)
    w = lax.bitcast_convert_type(jax.random.bits(kw, (G, N, K // 2), jnp.uint8), jnp.int8)
    exponents = jax.random.randint(ks, (G, N, K // 32), -8, -2)
    return w, jnp.ldexp(jnp.ones((), jnp.float32), exponents).astype(scale_dtype)


def expert_weights(key, G: int, N: int, K: int, fp4: bool) -> tuple[jax.Array, ...]:
    """(w,): bf16 [G, N, K], normal with std 0.02; FP4: (w, w_scales) from ``fp4_experts``."""
    return fp4_experts(key, G, N, K) if fp4 else ((0.02 * jax.random.normal(key, (G, N, K))).astype(jnp.bfloat16),)


def expert_bytes(N: int, K: int, fp4: bool) -> int:
    """HBM bytes of one [N, K] expert matrix: bf16, or FP4 half a byte a weight and a ue8m0 byte per 32."""
    return N * K // 2 + N * K // 32 if fp4 else 2 * N * K


def with_scales(fn):  # w_scales as a fourth positional argument (the benchmark's inputs are positional)
    return lambda x, w, rows, w_scales, **kw: fn(x, w, rows, w_scales=w_scales, **kw)


def grouped_matmul_cases():
    """Flash expert shapes: d = 4096, F = 2048, 256 experts, 6 routed per token (gate_up, then down), bf16
    weights and FP4 as released (case names "fp4 ..."), against ``ragged_dot_general`` (FP4: the weights
    dequantised first)."""
    E, d, F, k = 256, 4096, 2048, 6

    def case(tokens, n, kk, name, fp4):
        def args(key):
            kx, kw, ke = jax.random.split(key, 3)
            M = tokens * k
            x = jax.random.normal(kx, (M, kk), jnp.bfloat16)
            w, *scales = expert_weights(kw, E, n, kk, fp4)
            picks = jax.random.randint(ke, (M,), 0, E)
            return x, w, jnp.bincount(picks, length=E).astype(jnp.int32), *scales

        M = tokens * k
        used = E * (1 - (1 - 1 / E) ** M)  # expected distinct experts under uniform picks
        return {"name": "fp4 " * fp4 + name, "tokens": tokens,
                "shapes": f"M={M} (tokens={tokens} x k={k}) N={n} K={kk} G={E}{' fp4' * fp4}", "args": args,
                "reference": gm.reference, "pallas": with_scales(gm.grouped_matmul) if fp4 else gm.grouped_matmul,
                "bytes": 2 * (M * kk + M * n) + int(used) * expert_bytes(n, kk, fp4), "flops": 2 * M * n * kk}

    return [case(t, n, kk, f"{label} T={t}", fp4) for fp4 in (False, True)
            for n, kk, label in ((2 * F, d, "gate_up"), (d, F, "down")) for t in (1, 8, 32, 128, 4096)]


def grouped_gemv_cases():
    """Decode expert shapes (d = 4096, F = 2048, 256 experts, 6 routed per token) at batch 1, 8, 32, 128, bf16
    and FP4 weights, against ``ragged_dot_general`` (FP4: the weights dequantised first); ``grouped_matmul``'s
    cases at the same shapes give the Mosaic GPU kernel's time in the same run."""
    fp4 = {"pallas": with_scales(gg.grouped_gemv), "tuning": gg.choose_tuning(fp4=True)}
    return [{**c, **(fp4 if c["name"].startswith("fp4") else {"pallas": gg.grouped_gemv})}
            for c in grouped_matmul_cases() if c["tokens"] <= 128]


def expert_rows_cases():
    """A one-token decode step's 6 routed rows over 256 Flash-size experts as the MoE layer runs them (gate_up
    from the token's one row, then down), bf16 and FP4 weights, against the gathered einsum (FP4: the picked
    weights dequantised first); ``grouped_gemv``'s ``T=1`` cases time the sorted alternative (without its
    sort)."""
    E, d, F, k = 256, 4096, 2048, 6

    def case(n, kk, name, shared, fp4=False):
        x_rows = 1 if shared else k

        def args(key):
            kx, kw, ke = jax.random.split(key, 3)
            x = jax.random.normal(kx, (x_rows, kk), jnp.bfloat16)
            w, *scales = expert_weights(kw, E, n, kk, fp4)
            return x, w, jax.random.permutation(ke, E)[:k].astype(jnp.int32), *scales

        return {"name": "fp4 " * fp4 + name, "shapes": f"M={k} N={n} K={kk} G={E} x_rows={x_rows}{' fp4' * fp4}",
                "args": args, "reference": er.reference,
                **({"pallas": with_scales(er.expert_rows), "tuning": er.choose_tuning(fp4=True)} if fp4 else
                   {"pallas": er.expert_rows}),
                "bytes": 2 * (x_rows * kk + k * n) + k * expert_bytes(n, kk, fp4), "flops": 2 * k * n * kk}

    def dense(n, kk, name):  # one matrix (G = 1) and one row: a dense layer's GEMV, against XLA's
        def args(key):
            kx, kw = jax.random.split(key)
            x = jax.random.normal(kx, (1, kk), jnp.bfloat16)
            w = (0.02 * jax.random.normal(kw, (1, n, kk))).astype(jnp.bfloat16)
            return x, w, jnp.zeros((1,), jnp.int32)

        return {"name": name, "shapes": f"M=1 N={n} K={kk} G=1", "args": args,
                "reference": lambda x, w, ids: jnp.einsum("mk,nk->mn", x, w[0]), "pallas": er.expert_rows,
                "bytes": 2 * (kk + n * kk + n), "flops": 2 * n * kk}

    # The dense cases ask whether this kernel beats XLA's GEMVs of the decode step's dense layers (the
    # shared expert's and q_a's ran at ~66-70% of copy rate in GPU run 22); sweep block_n down to 16 with
    # --configs, since one row of N = 2048 gives only N / block_n programs.
    return [case(2 * F, d, "gate_up T=1", True), case(d, F, "down T=1", False), dense(F, d, "dense shared gate T=1"),
            dense(d, F, "dense shared down T=1"), dense(1024, d, "dense q_a T=1"),
            case(2 * F, d, "gate_up T=1", True, fp4=True), case(d, F, "down T=1", False, fp4=True)]


# ----------------------------------------------------------------------------------------------------------
# FP8 block-scaled linears
# ----------------------------------------------------------------------------------------------------------


def fp8_linear_shapes(cfg: DeepseekV4Config) -> dict[str, tuple[int, int, int]]:
    """The distinct FP8 linears of ``cfg``'s model with its MTP block, read off the abstract model: label ->
    (N, K, groups) as ``fp8_linear`` takes them (``o_a_proj``: K of one group, groups = ``o_groups``). The
    first four layers hold every attention and MLP kind; a label joins the names of one shape (gate and up)."""
    first4 = dataclasses.replace(cfg, num_hidden_layers=4, layer_types=cfg.layer_types[:4],
                                 mlp_layer_types=cfg.mlp_layer_types[:4])
    model = abstract_model(first4, jnp.bfloat16, mtp=True)
    shapes = {}
    for name, var in param_table(model).items():
        if storage_of(var) is not Storage.FP8:
            continue
        module = name.split(".")[-2]
        label = f"indexer.{module}" if ".indexer." in name else f"shared.{module}" if ".shared_experts." in name \
            else module
        N, K = var.get_value().shape
        groups = cfg.o_groups if module == "o_a_proj" else 1
        shapes.setdefault((N, K, groups), set()).add(label)
    return {"+".join(sorted(labels)): shape for shape, labels in shapes.items()}


def fp8_linear_inputs(key, M, N, K, groups=1):
    """x [M, groups*K] bf16 (normal), w_q [N, K] e4m3 (every finite code equally likely), w_scale
    [cdiv(N,128), cdiv(K,128)] fp32, powers of two 2^-12 .. 2^-4 (distinct per block, so a wrong block's
    scale shows)."""
    kx, kw, ks = jax.random.split(key, 3)
    x = jax.random.normal(kx, (M, groups * K), jnp.float32).astype(jnp.bfloat16)
    bits = jax.random.bits(kw, (N, K), jnp.uint8)
    bits = jnp.where(bits & 0x7F == 0x7F, 0, bits)  # e4m3fn's two NaN codes -> 0
    w_q = lax.bitcast_convert_type(bits, jnp.float8_e4m3fn)
    exponents = jax.random.randint(ks, (pl.cdiv(N, fl.BLOCK), pl.cdiv(K, fl.BLOCK)), -12, -3)
    return x, w_q, jnp.ldexp(jnp.ones((), jnp.float32), exponents)


def bf16_linear_inputs(key, M, N, K, groups=1):
    """The same x with the weight dequantised to bf16: the bf16 model's linear of the same shape."""
    x, w_q, w_scale = fp8_linear_inputs(key, M, N, K, groups)
    return x, fl.dequantize(w_q, w_scale, jnp.bfloat16)


def fp8_linear_cases():
    """Every FP8 linear of Flash (``fp8_linear_shapes``) at 1, 8 and 32 rows (decode batches), against the
    plain-JAX path (``reference``: the weight dequantised inside the jit, then one dot), with the same shape's
    bf16 weight under XLA as the baseline ``bf16_weights``. Bytes: the e4m3 weight, its scales, x and the
    bf16 output. The benchmark's dependent loop threads the smallest float input, here w_scale, so XLA
    cannot hoist the reference's dequantisation out of the loop."""
    cases = []
    for label, (N, K, groups) in fp8_linear_shapes(DeepseekV4Config.flash()).items():
        for M in (1, 8, 32):
            io = 2 * M * (groups * K + N)
            cases.append({
                "name": f"{label} M={M}",
                "shapes": {"M": M, "N": N, "K": K, "groups": groups},
                "args": functools.partial(fp8_linear_inputs, M=M, N=N, K=K, groups=groups),
                "kwargs": {"groups": groups},
                "tuning": fl.choose_tuning(M, N, K),
                "bytes": N * K + 4 * pl.cdiv(N, fl.BLOCK) * pl.cdiv(K, fl.BLOCK) + io,
                "flops": 2 * M * N * K,
                "pallas": fl.fp8_linear,
                "reference": fl.reference,
                "baselines": [{"name": "bf16_weights", "fn": fl.grouped_linear, "kwargs": {"groups": groups},
                               "args": functools.partial(bf16_linear_inputs, M=M, N=N, K=K, groups=groups),
                               "bytes": 2 * N * K + io}],
            })
    return cases


def fp8_gemm_reference(x, w_q, w_scale, *, groups: int = 1):
    """fp8_gemm's plain-JAX simulation from bf16 x: ``quantize_activations``, then ``reference`` (XLA's e4m3
    dot per K block)."""
    return fg.reference(*fg.quantize_activations(x, groups), w_q, w_scale, groups=groups)


def fp8_gemm_cases():
    """Every FP8 linear of Flash (``fp8_linear_shapes``) at 2048 and 16384 rows (a prefill chunk, a long one):
    ``quantized_linear`` (activation quantisation + the FP8 x FP8 kernel) against its plain-JAX simulation,
    with the model's other paths for those rows as baselines: ``dequantised_bf16`` (fp8_linear.reference,
    today's prefill: the weight dequantised inside the jit, then XLA's bf16 dot), ``weight_only`` (the
    fp8_linear kernel at these rows) and ``bf16_weights`` (the bf16 model's XLA dot). Bytes: x and the
    output in bf16, the e4m3 weight and its scales (bf16 weights: twice the weight bytes). The kernel's
    roofline takes the FP8 matmul rate, the baselines' the bf16 rate."""
    cases = []
    for label, (N, K, groups) in fp8_linear_shapes(DeepseekV4Config.flash()).items():
        for M in (2048, 16384):
            io = 2 * M * (groups * K + N)
            w_bytes = N * K + 4 * pl.cdiv(N, fl.BLOCK) * pl.cdiv(K, fl.BLOCK)
            flops = 2 * M * N * K
            args = functools.partial(fp8_linear_inputs, M=M, N=N, K=K, groups=groups)
            cases.append({
                "name": f"{label} M={M}",
                "shapes": {"M": M, "N": N, "K": K, "groups": groups},
                "args": args,
                "kwargs": {"groups": groups},
                "bytes": w_bytes + io,
                "flops": flops,
                "matmul": "fp8",
                "pallas": fg.quantized_linear,
                "reference": fp8_gemm_reference,
                "baselines": [
                    {"name": "dequantised_bf16", "fn": fl.reference, "kwargs": {"groups": groups}, "args": args,
                     "bytes": w_bytes + io, "flops": flops},
                    {"name": "weight_only", "fn": fl.fp8_linear, "kwargs": {"groups": groups}, "args": args,
                     "bytes": w_bytes + io, "flops": flops},
                    {"name": "bf16_weights", "fn": fl.grouped_linear, "kwargs": {"groups": groups},
                     "args": functools.partial(bf16_linear_inputs, M=M, N=N, K=K, groups=groups),
                     "bytes": 2 * N * K + io, "flops": flops}],
            })
    return cases


CASES = {
    "sparse_attention": sparse_attention_cases,
    "indexer": indexer_cases,
    "topk": topk_cases,
    "compressor": compressor_cases,
    "hc_pre": hc_pre_cases,
    "grouped_matmul": grouped_matmul_cases,
    "grouped_gemv": grouped_gemv_cases,
    "expert_rows": expert_rows_cases,
    "fp8_linear": fp8_linear_cases,
    "fp8_gemm": fp8_gemm_cases,
}
