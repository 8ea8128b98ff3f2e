"""The built-in demo model: a tiny DeepSeek-V4 (all three attention types, hash and learned MoE, mHC)
with a byte-level tokenizer, so text in and text out work with nothing downloaded.

Its trained weights ship inside the package as a Hugging Face format checkpoint (``demo_weights/``:
config.json + one bf16 model.safetensors, written by ``save_demo_weights`` from scripts/train.py; trained
on Jane Austen's novels, see scripts/prepare_demo_data.py), with an MTP block trained on the frozen trunk
(``scripts/train.py --mtp``) for speculative decoding. Without that folder the weights are fixed-seed random
and the text is noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..weights.checkpoint import from_pretrained
from ..weights.errors import CheckpointError
from ..weights.params import abstract_model, checkpoint_config, param_table
from ..model.config import CSA, HASH_MOE, HCA, MOE, SLIDING, DeepseekV4Config, YarnScaling
from ..model.mtp import DeepseekV4WithMTP
from ..model.transformer import DeepseekV4ForCausalLM
from .tokenizer import ByteTokenizer

DEMO_SEED = 0
DEMO_WEIGHTS = Path(__file__).with_name("demo_weights")
WEIGHTS_FILE = "model.safetensors"


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


def has_trained_weights(directory: Path = DEMO_WEIGHTS) -> bool:
    return (directory / WEIGHTS_FILE).exists()


def has_trained_mtp(directory: Path = DEMO_WEIGHTS) -> bool:
    """Whether the shipped weights hold a trained MTP block (``scripts/train.py --mtp --export-demo``)."""
    from safetensors import safe_open

    if not has_trained_weights(directory):
        return False
    with safe_open(directory / WEIGHTS_FILE, "numpy") as f:
        return any(name.startswith("model.mtp.") for name in f.keys())


def demo_model(dtype="float32", mtp: bool = False) -> tuple[DeepseekV4ForCausalLM, ByteTokenizer]:
    """(model, byte tokenizer): the shipped trained weights when present, else fixed-seed random weights.
    ``mtp``: with the multi-token-prediction block (a ``DeepseekV4WithMTP``, for speculative decoding)."""
    cls = DeepseekV4WithMTP if mtp else DeepseekV4ForCausalLM
    if not has_trained_weights():
        return cls(demo_config(), dtype=dtype, rngs=nnx.Rngs(DEMO_SEED)), ByteTokenizer()
    if checkpoint_config(DEMO_WEIGHTS) != demo_config():
        raise CheckpointError(f"the demo weights in {DEMO_WEIGHTS} were trained for another config than "
                              "demo_config(); retrain them with scripts/train.py --export-demo")
    if mtp and not has_trained_mtp():
        raise CheckpointError(f"the demo weights in {DEMO_WEIGHTS} hold no MTP block; train one with "
                              "scripts/train.py --mtp --export-demo")
    return from_pretrained(DEMO_WEIGHTS, dtype=jnp.dtype(dtype).name, mtp=mtp), ByteTokenizer()


def save_demo_weights(model: DeepseekV4ForCausalLM, directory: Path = DEMO_WEIGHTS, dtype="bfloat16") -> Path:
    """Write ``model`` as a Hugging Face format checkpoint: config.json and one model.safetensors, each
    tensor in the dtype the model has at ``dtype`` (bf16 matrices; fp32 norms, mHC, sinks, biases)."""
    from safetensors.numpy import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with_mtp = isinstance(model, DeepseekV4WithMTP)
    want = {name: var.get_value().dtype
            for name, var in param_table(abstract_model(model.config, dtype, with_mtp)).items()}
    tensors = {name: np.asarray(var.get_value()).astype(want[name]) for name, var in param_table(model).items()}
    (directory / WEIGHTS_FILE).write_bytes(save(tensors))  # save_file would make it owner-only (0600)
    (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    return directory
