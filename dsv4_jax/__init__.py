"""dsv4_jax: DeepSeek-V4 inference in JAX / Flax NNX."""

from .checkpoint import CheckpointError, from_pretrained
from .config import ConfigError, DeepseekV4Config
from .model import DeepseekV4ForCausalLM, InputError

__all__ = ["CheckpointError", "ConfigError", "DeepseekV4Config", "DeepseekV4ForCausalLM", "InputError",
           "from_pretrained"]
