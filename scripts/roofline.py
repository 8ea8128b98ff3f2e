"""The card's ceilings, and what one decode step / one prefill must at least move or compute.

Ceilings: device-to-device copy bandwidth (bytes read + written by a PyTorch ``copy_`` of 2 GB, and a
JAX copy for comparison), the bf16 matmul rate (an 8192^3 product) and the FP8 one (the same product in e4m3
through ``torch._scaled_mm``, fast accumulation, bf16 output); medians over repetitions timed with CUDA events.
``decode_step_bytes`` / ``prefill_flops`` are the model's side of the roofline.
"""

from __future__ import annotations

import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.model.config import CSA, HCA, SLIDING


def torch_time(fn, reps: int) -> float:
    """Median seconds of ``fn()`` (PyTorch work) over ``reps`` runs after one warm-up: CUDA events on the GPU,
    the wall clock on CPU (smoke runs)."""
    import time

    import torch

    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_ceilings(reps: int = 20) -> dict:
    import torch

    n = 2 * 1024**3 // 2
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy_s = torch_time(lambda: dst.copy_(src), reps)
    src = dst = None  # free 4 GB before the matmul buffers
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    mm_s = torch_time(lambda: a @ b, reps)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), dtype=torch.float32, device="cuda")
    # _scaled_mm takes its second operand column-major: b8 [n, k] row-major, transposed
    mm8_s = torch_time(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                                use_fast_accum=True), reps)
    return {"device": torch.cuda.get_device_name(), "copy_2GB_TBps": 2 * 2 * 1024**3 / copy_s / 1e12,
            "bf16_matmul_8192_TFLOPs": 2 * m**3 / mm_s / 1e12, "fp8_matmul_8192_TFLOPs": 2 * m**3 / mm8_s / 1e12}


def jax_copy(reps: int = 20) -> dict:
    import time

    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.PRNGKey(0), (1024**3,), jnp.bfloat16)
    f = jax.jit(lambda x: x + 1)

    def loop(n):
        y = x
        for _ in range(n):
            y = f(y)
        return y.block_until_ready()

    loop(2)
    t0 = time.perf_counter()
    loop(reps)
    per = (time.perf_counter() - t0) / reps
    return {"jax_elementwise_2GB_TBps": 2 * 2 * 1024**3 / per / 1e12}


def distinct_experts(E: int, k: int, tokens: int) -> float:
    """Expected number of distinct experts hit by ``tokens`` tokens picking k of E uniformly."""
    return E * (1 - (1 - k / E) ** tokens)


def picked_experts(model, cache, tokens, pos, capacity: int) -> list[int]:
    """The distinct routed experts each layer's router picks for one decode step of ``tokens`` [B] at ``pos`` [B]
    on ``cache`` of ``capacity`` tokens (the step as the engine runs it, its routers' outputs captured; the
    cache is not changed)."""
    from flax import nnx

    from dsv4_jax.model.transformer import run_chunk

    graphdef, state = nnx.split(model)
    E, L = model.config.n_routed_experts, model.config.num_hidden_layers

    @jax.jit
    def probe(state, cache, tokens, pos):
        chunk = nnx.capture(run_chunk, nnx.Intermediate, method_outputs=nnx.Intermediate)
        _, captured = chunk(nnx.merge(graphdef, state), cache, tokens[:, None], pos, jnp.ones_like(pos), capacity,
                            True)
        layers = captured["model"]["layers"]
        return [jnp.sum(jnp.bincount(layers[i]["mlp"]["gate"]["__call__"].get_value()[0][1].reshape(-1), length=E) > 0)
                for i in range(L)]

    return [int(n) for n in probe(state, cache, tokens, pos)]


def decode_step_bytes(model, batch: int, context: int, experts: list[int] | None = None) -> dict:
    """HBM bytes one decode step must read: every non-expert weight once (embedding: B rows), the
    batch's distinct routed experts once (``experts``: each layer's count, ``picked_experts``; else the
    expectation under uniform routing), and per sequence the KV rows attention reads (window + top-k on CSA,
    every visible entry on HCA) and the indexer keys scored (CSA)."""
    from dsv4_jax.weights.params import param_table

    cfg = model.config
    wbytes = expert_bytes = 0
    for name, var in param_table(model).items():
        v = var.get_value()
        nbytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(v))  # a QuantArray: codes + scales
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            layer = int(name.split(".")[2])
            read = (experts[layer] if experts is not None
                    else distinct_experts(v.shape[0], cfg.num_experts_per_tok, batch))
            expert_bytes += nbytes / v.shape[0] * read
        elif name.endswith("embed_tokens.weight"):
            wbytes += batch * v.shape[1] * v.dtype.itemsize
        elif not name.endswith("tid2eid"):
            wbytes += nbytes
    item = np.dtype(model.dtype).itemsize
    kv = 0
    for t in cfg.layer_types:
        rows = min(context, cfg.sliding_window)
        if t == CSA:
            visible = context // cfg.csa_compress_rate
            rows += min(cfg.index_topk, visible)
            kv += visible * cfg.index_head_dim * item
        elif t == HCA:
            rows += context // cfg.hca_compress_rate
        kv += rows * cfg.head_dim * item
    assert set(cfg.layer_types) <= {SLIDING, CSA, HCA}
    return {"weights": wbytes, "experts": expert_bytes, "kv": batch * kv,
            "total": wbytes + expert_bytes + batch * kv}


def prefill_flops(model, tokens: int) -> float:
    """Matmul FLOPs of a causal prefill of ``tokens`` tokens: 2 x active parameters per token (all but
    the unrouted experts and the embedding table), plus attention over window + picks / visible
    entries and the indexer over the visible index keys (counting only causal pairs)."""
    from dsv4_jax.weights.params import param_table

    cfg = model.config
    active = 0
    for name, var in param_table(model).items():
        n = int(np.prod(var.get_value().shape))
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            active += n / cfg.n_routed_experts * cfg.num_experts_per_tok
        elif not name.endswith(("embed_tokens.weight", "tid2eid")):
            active += n
    flops = 2 * active * tokens
    H, D, W = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
    for t in cfg.layer_types:
        keys = W * tokens
        if t == CSA:
            visible = tokens * tokens / 2 / cfg.csa_compress_rate  # sum over queries of visible entries
            keys += min(cfg.index_topk * tokens, visible)
            flops += 2 * cfg.index_n_heads * cfg.index_head_dim * visible
        elif t == HCA:
            keys += tokens * tokens / 2 / cfg.hca_compress_rate
        flops += 4 * H * D * keys  # q.k and p.v
    return flops


if __name__ == "__main__":
    out = torch_ceilings()
    out.update(jax_copy())
    print(json.dumps(out))
