"""What every kernel module shares: the Triton-backend ``pallas_call`` with optional output poisoning, and the
SM count the launch heuristics aim at."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


NUM_SMS = 132  # H100 SXM and H200


def triton_call(kernel, args, *, grid, in_specs, out_shape: list, out_specs: list, num_warps: int, num_stages: int,
                interpret: bool, name: str, poison: bool = False) -> list:
    """``pl.pallas_call`` on the Triton backend; returns the list of outputs.

    ``poison`` (a testing aid): the outputs are NaN-filled (integers: INT_MIN-filled) buffers aliased as
    extra inputs, so any element the kernel fails to write keeps that value. The kernel still sees only
    its inputs and outputs.
    """
    aliases = {}
    if poison:
        n_in, n_out = len(args), len(out_shape)
        aliases = {n_in + i: i for i in range(n_out)}
        args = [*args, *(poison_like(o.shape, o.dtype) for o in out_shape)]
        in_specs = [*in_specs, *out_specs]
        inner = kernel

        def kernel(*refs):  # drop the aliased input refs; the outputs are the same buffers
            return inner(*refs[:n_in], *refs[n_in + n_out:])

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


def poison_like(shape, dtype):
    """NaN-filled buffer (integers: the dtype's minimum), so unwritten elements fail comparisons."""
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.full(shape, jnp.nan, dtype)
    return jnp.full(shape, jnp.iinfo(dtype).min, dtype)
