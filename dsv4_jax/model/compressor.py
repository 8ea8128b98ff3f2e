"""The KV compressor module: the projections, position bias (``ape``) and norm that pool every m tokens into
one compressed entry (CSA m=4 overlapping, HCA m=128). The bookkeeping (state ring, per-chunk metadata,
which compressor overlaps) is in compression.py, the pooling an op (dsv4_jax/ops/compressor.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .. import ops
from .compression import CompressionMeta, CompressorState, overlaps
from .config import DeepseekV4Config
from .layers import Linear, RMSNorm
from .spec import Storage, param


class Compressor(nnx.Module):
    """Projections, position bias (``ape``) and norm of one compressor.

    The attention compressor of a CSA layer also owns the lightning indexer (``self.indexer``),
    mirroring the checkpoint layout ``self_attn.compressor.indexer.*``.
    """

    def __init__(self, cfg: DeepseekV4Config, ratio: int, head_dim: int, *, dtype, rngs: nnx.Rngs,
                 indexer: nnx.Module | None = None):
        self.ratio = ratio
        self.overlap = overlaps(cfg, ratio)
        coff = 2 if self.overlap else 1
        self.eps = cfg.rms_norm_eps
        bf16 = dict(axes=("kv", "embed"), storage=Storage.MODEL, dtype=dtype, rngs=rngs)
        self.kv_proj = Linear(cfg.hidden_size, coff * head_dim, **bf16)
        self.gate_proj = Linear(cfg.hidden_size, coff * head_dim, **bf16)
        self.position_bias = param(0.02 * jax.random.normal(rngs.params(), (ratio, coff * head_dim), jnp.float32),
                                   ("ratio", "kv"), Storage.FP32)
        self.kv_norm = RMSNorm(head_dim, cfg.rms_norm_eps, "kv")
        self.indexer = nnx.data(indexer)

    def compress(self, x, state: CompressorState, cache_rows: jax.Array, meta: CompressionMeta):
        """x [B, C, d] -> (updated cache rows [B, N, D], new state)."""
        kv = self.kv_proj(x, out_dtype=jnp.float32)
        gate = self.gate_proj(x, out_dtype=jnp.float32)
        return ops.compress(kv, gate, state, cache_rows, meta, self.position_bias[...], self.kv_norm.weight[...],
                            eps=self.eps, overlap=self.overlap)
