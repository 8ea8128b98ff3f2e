"""Benchmark cases of the Pallas kernels (scripts/bench_kernels.py; the GPU and compile tests run them too).

``bench_cases(kernel)``: a list of dicts, each with ``name``, ``shapes``, ``args`` (PRNG key -> the positional
inputs), ``kwargs``, the minimal HBM ``bytes``, the ``flops``, and the ``pallas`` and ``reference`` functions
to time. Cases whose inputs need the model (its metadata, config and XLA path) are built here, so the kernel
modules import nothing from dsv4_jax; the other kernel modules give their own ``bench_cases()``.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax import ops
from dsv4_jax.model.config import DeepseekV4Config
from dsv4_jax.model.metadata import build_metadata
from dsv4_jax.ops.indexer import select_topk
from kernels_pallas import sparse_attention as sa


def bench_cases(kernel: str) -> list[dict]:
    """The cases of ``kernels_pallas.<kernel>``."""
    if kernel == "sparse_attention":
        return sparse_attention_cases()
    return importlib.import_module(f"kernels_pallas.{kernel}").bench_cases()


# ----------------------------------------------------------------------------------------------------------
# Sparse attention
# ----------------------------------------------------------------------------------------------------------


def decode_inputs(key, cfg: DeepseekV4Config, *, B: int, K: int, N: int, dtype=jnp.bfloat16):
    """One decode step per row at batch B in the model's layout (``prefill_inputs`` for a chunk of one token),
    with ``cfg``'s sizes: the window block is the ring (W rows, the mask row from ``build_metadata``: all
    valid past the window), random q, ring and N compressed entries, K distinct random entry ids per row."""
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


def prefill_inputs(key, cfg: DeepseekV4Config, *, prompt: int, chunk: int, ratio: int, dtype=jnp.bfloat16):
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
                "args": functools.partial(decode_inputs, cfg=cfg, B=B, K=K, N=N),
                "kwargs": {"scale": D ** -0.5},
                "tuning": sa.choose_tuning(B, H, W, K),
                # q + each distinct key row once + indices + output
                "bytes": B * (H * D * itemsize + T * D * itemsize + K * 4 + W + H * D * itemsize),
                "flops": 4 * B * H * T * D,  # QK^T and PV
                "pallas": sa.sparse_attention_prefill,
                "reference": sa.reference_prefill,
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
                "args": functools.partial(prefill_inputs, cfg=cfg, prompt=prompt, chunk=C, ratio=ratio),
                "kwargs": {"scale": D ** -0.5},
                "tuning": sa.choose_tuning(C, H, 2 * W, K),  # window blocks of W + Bq rows, Bq = W
                # q + output + window blocks + every entry row once + ids + mask rows
                "bytes": 2 * C * H * D * itemsize + (rows + N) * D * itemsize + C * K * 4 + C * 2 * W,
                "flops": int(4 * H * D * keys.sum()),
                "pallas": sa.sparse_attention_prefill,
                "reference": functools.partial(model_attention, shared_entries=kind == "hca"),
            })
    return cases
