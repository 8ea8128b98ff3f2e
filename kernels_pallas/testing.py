"""Shared helper for kernel tests: a CUDA lowering check against an abstract H100."""

from __future__ import annotations

import jax
from jax.sharding import AbstractMesh


def lower_for_h100(fn, *args):
    """Lower ``fn(*args)`` for CUDA against an abstract H100 from a CPU-only host.

    Catches kernels that run in interpret mode but cannot compile for the GPU (unsupported ops,
    layouts, block shapes). Returns the lowered text.
    """
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=device)):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return lowered.as_text()

