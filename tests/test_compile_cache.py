"""The persistent compilation cache (dsv4_jax.runtime.compile_cache): where it lives, how it is turned off, and
that a second engine on the same model loads its steps from it instead of compiling them again."""

from __future__ import annotations

import jax
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

from conftest import tiny
from dsv4_jax.model.transformer import DeepseekV4ForCausalLM
from dsv4_jax.runtime.compile_cache import ENV, default_cache_dir, enable_compile_cache, merged_seconds
from dsv4_jax.runtime.engine import Engine


@pytest.fixture
def restore_jax_cache():
    """The suite runs without the cache (conftest): put JAX back as it was after a test turns it on."""
    before = jax.config.jax_compilation_cache_dir
    yield
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()


def test_cache_directory_honours_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "dsv4_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "dsv4_jax"


def test_environment_variable_turns_it_off(monkeypatch, restore_jax_cache):
    monkeypatch.setenv(ENV, "0")
    before = jax.config.jax_compilation_cache_dir
    assert enable_compile_cache() is None and jax.config.jax_compilation_cache_dir == before


def test_merged_seconds_counts_nested_spans_once():
    assert merged_seconds([(0.0, 4.0), (1.0, 2.0), (3.0, 6.0), (8.0, 9.0)], 0.0, 10.0) == 7.0
    assert merged_seconds([(0.0, 4.0), (8.0, 12.0)], 2.0, 10.0) == 4.0


def test_second_engine_loads_its_steps_from_the_cache(monkeypatch, tmp_path, restore_jax_cache):
    monkeypatch.setenv(ENV, str(tmp_path / "cache"))
    model = DeepseekV4ForCausalLM(tiny(), rngs=nnx.Rngs(0))
    first = Engine(model, capacity=32).generate([[5, 6, 7]], max_new_tokens=3)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
    entries = {p.name for p in (tmp_path / "cache").iterdir()}
    assert {"jit_chunk", "jit_decode"} <= {e.split("-")[0] for e in entries}, entries

    hits = []

    def on_event(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_listener(on_event)
    try:
        jax.clear_caches()  # as a new process would start: nothing compiled in memory
        second = Engine(model, capacity=32).generate([[5, 6, 7]], max_new_tokens=3)
    finally:
        jax.monitoring.unregister_event_listener(on_event)
    assert second[0].tokens == first[0].tokens
    assert len(hits) >= 2, hits  # the prefill chunk and the decode step, at least
    new = {p.name for p in (tmp_path / "cache").iterdir()} - entries
    assert not {e for e in new if e.startswith(("jit_chunk", "jit_decode"))}, new  # the steps not compiled anew
