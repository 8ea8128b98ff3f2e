"""dsv4_jax: DeepSeek-V4 inference in JAX / Flax NNX."""

from .weights.checkpoint import from_pretrained
from .weights.errors import CheckpointError
from .model.config import ConfigError, DeepseekV4Config
from .runtime.engine import Engine, GenerationResult
from .model.transformer import DeepseekV4ForCausalLM, InputError
from .runtime.sampling import SamplingParams
from .runtime.tokenizer import load_tokenizer

__all__ = ["CheckpointError", "ConfigError", "DeepseekV4Config", "DeepseekV4ForCausalLM", "Engine",
           "GenerationResult", "InputError", "SamplingParams", "from_pretrained", "load_tokenizer"]
