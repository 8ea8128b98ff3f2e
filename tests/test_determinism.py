"""Determinism: the same inputs give bitwise the same tokens and logits.

CPU: the sampled path (temperature, top-p, seed) of ``Engine.generate`` repeated on one engine and in a second
Python process, token for token, with the logits each token was drawn from (replayed) bit for bit. GPU (skipped elsewhere): 20 repeated kernels-path decodes of the
Flash-width slice from one prefilled cache, bitwise identical (atomics or a split-K order that varies between
runs would show here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny
from dsv4_jax.model.config import CSA, HASH_MOE, HCA, MOE, SLIDING
from dsv4_jax.model.transformer import DeepseekV4ForCausalLM
from dsv4_jax.runtime.engine import Engine
from dsv4_jax.runtime.sampling import SamplingParams

CFG = tiny(num_hidden_layers=3, layer_types=(SLIDING, CSA, HCA), mlp_layer_types=(HASH_MOE, MOE, MOE))
SAMPLING = SamplingParams(temperature=0.8, top_p=0.9)
MAX_NEW = 10
PROMPTS = [list(np.random.RandomState(2).randint(0, CFG.vocab_size, n)) for n in (21, 6)]  # ragged


def sampled_generation(engine: Engine, seed: int) -> tuple[list[list[int]], np.ndarray]:
    """The sampled tokens [B][MAX_NEW] of ``engine.generate``, and the fp32 logits [B, MAX_NEW, V] each was drawn
    from, replayed as the last-token logits of prefills of the prompts and the tokens before it (the prefill's
    one compiled chunk: a replay through the decode step would compile a third program)."""
    tokens = [r.tokens for r in engine.generate(PROMPTS, MAX_NEW, sampling=SAMPLING, seed=seed, eos_token_ids=[])]
    logits = [engine.prefill([p + t[:n] for p, t in zip(PROMPTS, tokens)])[0] for n in range(MAX_NEW)]
    return tokens, np.stack([np.asarray(v, np.float32) for v in logits], 1)


def new_engine() -> Engine:
    return Engine(DeepseekV4ForCausalLM(CFG, rngs=nnx.Rngs(7)), capacity=64)


@pytest.fixture(scope="module")
def second_process(tmp_path_factory):
    """A second Python process that builds the same model and generates with the same seed, started first so that
    it compiles while this one does. Yields a function that waits for it: -> (tokens, logits)."""
    tests = Path(__file__).parent
    out = tmp_path_factory.mktemp("determinism") / "logits.npy"
    code = ("import json, sys; import numpy as np; sys.path.insert(0, sys.argv[1]); import test_determinism as t; "
            "tokens, logits = t.sampled_generation(t.new_engine(), seed=3); "
            "np.save(sys.argv[2], logits); print(json.dumps(tokens))")
    env = dict(os.environ, PYTHONHASHSEED="12345")  # this process's hash seed is random: they differ
    proc = subprocess.Popen([sys.executable, "-c", code, str(tests), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tests.parent)

    def result():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        return json.loads(stdout.strip().splitlines()[-1]), np.load(out)

    yield result
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def first_run(second_process):
    engine = new_engine()
    return engine, *sampled_generation(engine, seed=3)


def test_sampled_generation_repeats_bitwise_in_one_process(first_run):
    """The same engine again: same tokens, same logits bits (no state carried from one generation to the next)."""
    engine, tokens, logits = first_run
    again_tokens, again_logits = sampled_generation(engine, seed=3)
    assert again_tokens == tokens
    np.testing.assert_array_equal(again_logits, logits)
    other = [r.tokens for r in engine.generate(PROMPTS, MAX_NEW, sampling=SAMPLING, seed=4, eos_token_ids=[])]
    assert other != tokens  # the seed matters: the tokens are drawn, not the argmax


def test_sampled_generation_repeats_bitwise_across_processes(first_run, second_process):
    """The second process's tokens and logits bits equal this one's (nothing depends on hash seeds, addresses or
    the order things were compiled in)."""
    _, tokens, logits = first_run
    other_tokens, other_logits = second_process()
    assert other_tokens == tokens
    np.testing.assert_array_equal(other_logits, logits)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (the compiled kernels)")
def test_gpu_flash_width_kernel_decodes_repeat_bitwise():
    """The Flash-width slice (test_kernels_in_model.flash_width_slice, 64 experts) prefilled once on the XLA
    path (4 prompts of 2300 tokens: the indexer selects 512 of 575 entries), then 20 times the same 3 decode
    steps with kernels="pallas" from a copy of that cache: logits and caches bitwise identical every time."""
    from test_kernels_in_model import device_steps, flash_width_slice

    from dsv4_jax.model.cache import init_cache
    from dsv4_jax.runtime.engine import split_weights

    model = flash_width_slice(64)
    rng = np.random.RandomState(0)
    B, P, capacity = 4, 2300, 2400
    prompt, steps = rng.randint(0, model.config.vocab_size, (B, P)), rng.randint(0, model.config.vocab_size, (B, 3))
    graphdef, state_def, weights = split_weights(model)
    chunk_step = device_steps(graphdef, state_def, capacity).chunk
    _, prefilled = chunk_step(weights, init_cache(model.config, B, capacity, model.dtype), jnp.asarray(prompt),
                              jnp.zeros(B, jnp.int32), jnp.full(B, P, jnp.int32), last_only=True)
    first = None
    for run in range(20):
        cache = jax.tree.map(jnp.copy, prefilled)  # the steps donate their cache
        logits = []
        for t in range(steps.shape[1]):
            out, cache = chunk_step(weights, cache, jnp.asarray(steps[:, t:t + 1]), jnp.full(B, P + t, jnp.int32),
                                    jnp.ones(B, jnp.int32), last_only=True, kernels="pallas")
            logits.append(np.asarray(out, np.float32))
        result = [np.stack(logits)] + [np.asarray(leaf) for leaf in jax.tree.leaves(cache)]
        if first is None:
            first = result
            continue
        for i, (a, b) in enumerate(zip(result, first)):
            np.testing.assert_array_equal(a, b, err_msg=f"run {run}: {'logits' if i == 0 else f'cache leaf {i}'}")
