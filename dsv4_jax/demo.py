"""The built-in demo model: a tiny DeepSeek-V4 (all three attention types, hash and learned MoE, mHC)
with a byte-level tokenizer, so text in and text out work with nothing downloaded.

No trained demo checkpoint exists yet: the weights are fixed-seed random, so the text is noise.
"""

from __future__ import annotations

from flax import nnx

from .config import CSA, HASH_MOE, HCA, MOE, SLIDING, DeepseekV4Config, YarnScaling
from .model import DeepseekV4ForCausalLM
from .tokenizer import ByteTokenizer

DEMO_SEED = 0


def demo_config() -> DeepseekV4Config:
    tok = ByteTokenizer
    return DeepseekV4Config(
        vocab_size=tok.vocab_size, hidden_size=128, num_hidden_layers=6, num_attention_heads=4, head_dim=64,
        qk_rope_head_dim=16, q_lora_rank=64, o_groups=2, o_lora_rank=32, sliding_window=32,
        layer_types=(SLIDING, SLIDING, CSA, HCA, CSA, HCA), mlp_layer_types=(HASH_MOE,) * 2 + (MOE,) * 4,
        hca_compress_rate=16, compress_yarn=YarnScaling(4.0, 256), index_n_heads=8, index_head_dim=32,
        index_topk=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
        bos_token_id=tok.bos_id, eos_token_ids=(tok.eos_id,),
    )


def demo_model(dtype="float32") -> tuple[DeepseekV4ForCausalLM, ByteTokenizer]:
    """(model with fixed-seed random weights, byte tokenizer)."""
    return DeepseekV4ForCausalLM(demo_config(), dtype=dtype, rngs=nnx.Rngs(DEMO_SEED)), ByteTokenizer()
