"""``--checkpoint ORG/NAME``: a Hugging Face hub id, resolved to a local snapshot through ``huggingface_hub``
(downloaded into its cache when online, read from the cache when offline, ``HF_HUB_OFFLINE=1``).
``huggingface_hub`` is imported only when a hub id is given."""

from __future__ import annotations

import re
from pathlib import Path

from .checkpoint import CheckpointError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What the loader reads: config, weights (and their index), the tokenizer.
FILES = ["*.json", "*.safetensors"]


def is_hub_id(name: str) -> bool:
    """``org/name`` that is not a local path (no leading ``.`` or ``/``, one slash, nothing on disk)."""
    return bool(_HUB_ID.fullmatch(name)) and not Path(name).exists()


def resolve_checkpoint(name: str) -> Path:
    """A local checkpoint directory for ``name``: the directory itself, or the hub id's snapshot."""
    if not is_hub_id(name):
        return Path(name)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(f"checkpoint directory {name} does not exist, and reading it as a hub id needs "
                              "huggingface_hub (pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(name, allow_patterns=FILES))
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{name} is neither a local directory nor in the Hugging Face cache, and "
                              "downloading it is off (HF_HUB_OFFLINE) or failed") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"hub id {name}: {first}") from None
