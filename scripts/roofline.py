"""Measure the card's two ceilings: device-to-device copy bandwidth and bf16 matmul rate.

Bandwidth counts bytes read + written by a PyTorch ``copy_`` of 2 GB (and a JAX copy for comparison);
the matmul rate is a bf16 8192^3 product. Medians over repetitions timed with CUDA events.
"""

from __future__ import annotations

import json
import statistics


def torch_ceilings(reps: int = 20) -> dict:
    import torch

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return statistics.median(times)

    n = 2 * 1024**3 // 2
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src))
    src = dst = None  # free 4 GB before the matmul buffers
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    mm_s = timed(lambda: a @ b)
    return {"device": torch.cuda.get_device_name(), "copy_2GB_TBps": 2 * 2 * 1024**3 / copy_s / 1e12,
            "bf16_matmul_8192_TFLOPs": 2 * m**3 / mm_s / 1e12}


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


if __name__ == "__main__":
    out = torch_ceilings()
    out.update(jax_copy())
    print(json.dumps(out))
