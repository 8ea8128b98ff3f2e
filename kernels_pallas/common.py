"""What every kernel module shares: the Triton-backend ``pallas_call`` with optional output poisoning, and the
SM count the launch heuristics aim at."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


NUM_SMS = 132  # H100 SXM and H200


def triton_call(kernel, args, *, grid, in_specs, out_shape: list, out_specs: list, num_warps: int, num_stages: int,
                interpret: bool, name: str, poison: bool = False, aliases: dict[int, int] | None = None) -> list:
    """``pl.pallas_call`` on the Triton backend; returns the list of outputs.

    ``aliases`` {input index: output index}: that output is the input's buffer (in place when the input is
    donated), so the elements the kernel does not write keep the input's values.
    ``poison`` (a testing aid): the other outputs are NaN-filled (integers: INT_MIN-filled) buffers aliased as
    extra inputs, so any element the kernel fails to write keeps that value. The kernel still sees only
    its inputs and outputs.
    """
    aliases = dict(aliases or {})
    if poison:
        n_in, n_out = len(args), len(out_shape)
        poisoned = [i for i in range(n_out) if i not in aliases.values()]
        aliases.update({n_in + j: i for j, i in enumerate(poisoned)})
        args = [*args, *(poison_like(out_shape[i].shape, out_shape[i].dtype) for i in poisoned)]
        in_specs = [*in_specs, *(out_specs[i] for i in poisoned)]
        inner = kernel

        def kernel(*refs):  # drop the poison input refs; those outputs are the same buffers
            return inner(*refs[:n_in], *refs[n_in + len(poisoned):])

    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(*args)


def expert_blocks(kernel: str, x, w, block_n: int, block_k: int) -> tuple[int, int]:
    """Checks of the expert matmul kernels: x [M, K] and w [G, N, K] of one dtype; block_n / block_k (powers of
    two >= 16) clipped to N / K, then dividing them. Returns the clipped (block_n, block_k)."""
    (_, K), (_, N, K2) = x.shape, w.shape
    if K2 != K or x.dtype != w.dtype:
        raise ValueError(f"{kernel}: x {x.shape} {x.dtype}, w {w.shape} {w.dtype}: expected x [M, K], w [G, N, K] "
                         f"of one dtype")
    block_n, block_k = min(block_n, N), min(block_k, K)
    for name, v in (("block_n", block_n), ("block_k", block_k)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{kernel}: {name}={v} must be a power of two >= 16")
    if K % block_k or N % block_n:
        raise ValueError(f"{kernel}: K={K} and N={N} must be multiples of block_k={block_k} and block_n={block_n}")
    return block_n, block_k


def check_tuning(config, *, blocks: tuple[str, ...] = (), flags: tuple[str, ...] = ()) -> None:
    """A TuningConfig's checks: the fields named in ``flags`` bools, every other field a positive int, the
    fields named in ``blocks`` powers of two >= 16 (clipped to the matrix later, so the clipped block stays
    one)."""
    kind = type(config).__module__.rsplit(".", 1)[-1]
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if f.name in flags:
            if not isinstance(v, bool):
                raise ValueError(f"{kind} TuningConfig: {f.name}={v!r}: expected a bool")
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{kind} TuningConfig: {f.name}={v!r}: expected a positive int")
        if f.name in blocks and (v < 16 or v & (v - 1)):
            raise ValueError(f"{kind} TuningConfig: {f.name}={v} must be a power of two >= 16")


def poison_like(shape, dtype):
    """NaN-filled buffer (integers: the dtype's minimum), so unwritten elements fail comparisons."""
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.full(shape, jnp.nan, dtype)
    return jnp.full(shape, jnp.iinfo(dtype).min, dtype)
