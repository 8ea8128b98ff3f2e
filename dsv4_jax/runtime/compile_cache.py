"""JAX's persistent compilation cache, on by default for the CLI and ``Engine``, and compile-time accounting.

A second run of the same model and shapes then loads its compiled steps from disk instead of compiling them
again. The cache lives in ``$XDG_CACHE_HOME/dsv4_jax`` (``~/.cache/dsv4_jax`` without it);
``DSV4_JAX_COMPILE_CACHE=0`` turns it off, ``DSV4_JAX_COMPILE_CACHE=DIR`` puts it in DIR. A directory the user
gave JAX itself (``JAX_COMPILATION_CACHE_DIR``) is left as it is.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

ENV = "DSV4_JAX_COMPILE_CACHE"
OFF = ("0", "off", "false", "no")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dsv4_jax"


def enable_compile_cache(directory: str | Path | None = None) -> Path | None:
    """Turn the persistent cache on (``directory``, else ``$DSV4_JAX_COMPILE_CACHE``, else the default) and
    return its directory; None when the environment variable turns it off."""
    setting = os.environ.get(ENV, "").strip()
    if directory is None and setting.lower() in OFF:
        return None
    current = jax.config.jax_compilation_cache_dir
    if directory is None and current and os.environ.get("JAX_COMPILATION_CACHE_DIR") == current:
        return Path(current)
    path = str(Path(directory or setting or default_cache_dir()).expanduser())
    if current == path:
        return Path(path)
    jax.config.update("jax_compilation_cache_dir", path)
    # Every step is worth keeping: the demo model's steps compile in about a second on a CPU, and the many
    # small eager ops of a generation add up to seconds more.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()  # JAX reads the setting once, at its first compilation
    return Path(path)


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_spans: list[tuple[float, float]] = []
_lock = threading.Lock()
_listening = False


def _record(event: str, start: float, end: float, **_):
    if event in _COMPILE_EVENTS:
        with _lock:
            _spans.append((start, end))


def watch_compilation() -> None:
    """Start recording when JAX traces, lowers and compiles (or loads from the cache); see ``compile_seconds``."""
    global _listening
    if not _listening:
        jax.monitoring.register_event_time_span_listener(_record)
        _listening = True


def merged_seconds(spans, start: float, end: float) -> float:
    """Length of the union of the (start, end) intervals in ``spans``, clipped to [start, end]: nested traces
    (a jitted function inside another) count once."""
    total, reach = 0.0, start
    for a, b in sorted(spans):
        a, b = max(a, reach), min(b, end)
        if b > a:
            total += b - a
            reach = b
    return total


def compile_seconds(start: float, end: float) -> float:
    """Wall time JAX spent tracing, lowering and compiling between ``start`` and ``end`` (``time.time()``)."""
    with _lock:
        return merged_seconds(list(_spans), start, end)
