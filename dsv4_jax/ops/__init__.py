"""The model's accelerated ops, and the one place that picks their implementation: plain XLA or a Pallas
kernel (kernels_pallas/, in interpret mode off the GPU).

    with ops.use(ops.Kernels("pallas", overrides=(("routed_experts", "xla"),))):
        ...  # trace the model: every op function reads ops.current()
"""

from .attention import sparse_attention
from .choice import IMPLEMENTATIONS, OPS, Kernels, current, use
from .compressor import compress, compressor_decode_step, compressor_prefill
from .dense import linear
from .hyper_connection import hc_pre
from .indexer import indexer_scores, topk
from .moe import routed_experts

__all__ = ["IMPLEMENTATIONS", "OPS", "Kernels", "compress", "compressor_decode_step", "compressor_prefill", "current",
           "hc_pre", "indexer_scores", "linear", "routed_experts", "sparse_attention", "topk", "use"]
