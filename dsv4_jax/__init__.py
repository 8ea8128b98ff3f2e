"""dsv4_jax: DeepSeek-V4 inference in JAX / Flax NNX."""

from .checkpoint import CheckpointError, from_pretrained
from .config import ConfigError, DeepseekV4Config
from .engine import Engine, GenerationResult
from .model import DeepseekV4ForCausalLM, InputError
from .sampling import SamplingParams
from .tokenizer import load_tokenizer

__all__ = ["CheckpointError", "ConfigError", "DeepseekV4Config", "DeepseekV4ForCausalLM", "Engine",
           "GenerationResult", "InputError", "SamplingParams", "from_pretrained", "load_tokenizer"]
