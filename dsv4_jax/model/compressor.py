"""KV compressor: pools every m tokens into one compressed entry (CSA m=4 overlapping, HCA m=128).

Entry w = RoPE_{w*m}(RMSNorm(sum_j softmax_j(gate_j + ape_j) * kv_j)), with the softmax taken over the
window's slots separately per channel, in fp32. The overlapping (CSA) layout pools 2m slots: the
a-halves of window w-1 and the b-halves of window w; for w = 0 the a-half slots do not exist.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .. import ops
from .layers import Linear, RMSNorm
from .cache import CompressorState
from .config import DeepseekV4Config
from .metadata import CompressionMeta
from .spec import Storage, param


class Compressor(nnx.Module):
    """Projections, position bias (``ape``) and norm of one compressor.

    The attention compressor of a CSA layer also owns the lightning indexer (``self.indexer``),
    mirroring the checkpoint layout ``self_attn.compressor.indexer.*``.
    """

    def __init__(self, cfg: DeepseekV4Config, ratio: int, head_dim: int, overlap: bool, *, dtype, rngs: nnx.Rngs,
                 indexer: nnx.Module | None = None):
        coff = 2 if overlap else 1
        self.ratio = ratio
        self.overlap = overlap
        self.eps = cfg.rms_norm_eps
        bf16 = dict(axes=("kv", "embed"), storage=Storage.MODEL, dtype=dtype, rngs=rngs)
        self.kv_proj = Linear(cfg.hidden_size, coff * head_dim, **bf16)
        self.gate_proj = Linear(cfg.hidden_size, coff * head_dim, **bf16)
        self.position_bias = param(0.02 * jax.random.normal(rngs.params(), (ratio, coff * head_dim), jnp.float32),
                                   ("ratio", "kv"), Storage.FP32)
        self.kv_norm = RMSNorm(head_dim, cfg.rms_norm_eps, "kv")
        self.indexer = nnx.data(indexer)

    def compress(self, x, state: CompressorState, cache_rows: jax.Array, meta: CompressionMeta,
                 positions: jax.Array | None = None):
        """x [B, C, d] at token ``positions`` [B, C] (``ForwardMetadata.positions``; only a decode step
        through the Pallas kernel reads them) -> (updated cache rows [B, N, D], new state)."""
        kv = self.kv_proj(x, out_dtype=jnp.float32)
        gate = self.gate_proj(x, out_dtype=jnp.float32)
        return ops.compress(kv, gate, state, cache_rows, meta, positions, self.position_bias[...],
                            self.kv_norm.weight[...], eps=self.eps, overlap=self.overlap)
