"""Shared helper for kernel tests: a CUDA lowering check against an abstract H100."""

from __future__ import annotations

import jax
from jax.sharding import AbstractMesh


def abstract_h100():
    """A context in which Pallas' Triton lowering, finding no GPU attached, targets an H100, and the model's
    kernels lower for it rather than in interpret mode (``dsv4_jax.ops.choice.interpret``)."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    return jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=device))


def lower_for_h100(fn, *args):
    """Lower ``fn(*args)`` for CUDA against an abstract H100 from a CPU-only host.

    Catches kernels that run in interpret mode but cannot compile for the GPU (unsupported ops,
    layouts, block shapes). Returns the lowered text.
    """
    with abstract_h100():
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return lowered.as_text()


def compile_for_h100(fn, *args, asm: dict | None = None) -> dict[str, float]:
    """Lower ``fn(*args)`` as ``lower_for_h100`` does, then compile each Pallas Triton kernel in it to a
    cubin for sm_90 with the ``triton`` package's compiler, which needs no GPU. Returns seconds per kernel;
    ``asm``, if given, receives each kernel's compiled forms by name (Triton's ``asm``: "ttgir", "ptx", "sass"...).

    Catches kernels that lower but do not compile, and compiles that take minutes (an unrolled kernel once
    timed a GPU run out; docs/performance.md, Kernel design notes). The ``triton`` package (a torch
    dependency) stands in for the Triton inside jaxlib: the same dialect, a nearby version. ``args`` may
    be ``jax.ShapeDtypeStruct``s."""
    import os
    import re
    import tempfile
    import time
    from pathlib import Path
    from unittest import mock

    import triton
    from jax._src.pallas.triton import pallas_call_registration as registration
    from triton.backends.compiler import GPUTarget

    modules = []
    lower = registration.lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = lower(*a, **k)
        modules.append(str(result.module.operation))
        return result

    jax.clear_caches()  # a cached lowering would not run the Pallas rule again
    with mock.patch.object(registration.lowering, "lower_jaxpr_to_triton_module", capture):
        text = lower_for_h100(fn, *args)
    options = dict((name, (int(stages), int(warps))) for name, stages, warps in
                   re.findall(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text))
    if not modules:
        raise AssertionError("no Pallas Triton kernel in the lowered function")
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {"TRITON_CACHE_DIR": tmp}):
        for i, module in enumerate(modules):  # an empty cache: every kernel compiles
            name = re.search(r"tt\.func public @(\w+)", module).group(1)
            stages, warps = options[name]
            path = Path(tmp) / f"{i}.ttir"
            path.write_text(module)
            t0 = time.perf_counter()
            kernel = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": warps, "num_stages": stages})
            seconds[name] = time.perf_counter() - t0
            if asm is not None:
                asm[name] = kernel.asm
    return seconds


# XLA's description of an H100 SXM (its xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb): the target a compile-only
# device stands for.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84978434048 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 3 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def cuda_plugin_installed(versions: tuple[int, ...] = (13, 12)) -> bool:
    """Whether JAX's CUDA plugin for one of the CUDA ``versions`` (the ``aot`` extra, or a GPU machine's own) is
    installed. False, not an error, without any JAX plugin: ``find_spec`` of a submodule imports its parent
    package, and ``jax_plugins`` exists only once some plugin is installed (``pip install -e ".[test]"``)."""
    import importlib.util

    try:
        return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in versions)
    except ModuleNotFoundError:
        return False


def h100_compile_only_sharding():
    """A sharding on a compile-only H100, or None without a CUDA plugin for JAX (the ``aot`` extra).

    ``jax.jit(f).lower(*ShapeDtypeStructs with this sharding).compile()`` then runs XLA's whole GPU pipeline on
    a CPU-only host (fusion, the Pallas Triton kernels, scheduling; no autotuning, which needs the device), so
    a test can read the optimized GPU HLO. The GPU machines' plugin is jax-cuda13-plugin. On a host without a GPU,
    run with ``JAX_PLATFORMS=cpu`` (tests/conftest.py sets it): otherwise the plugin fails to initialise and JAX
    drops it."""
    devices = h100_compile_only_devices(1)
    return None if devices is None else jax.sharding.SingleDeviceSharding(devices[0])


def h100_compile_only_devices(n: int) -> list | None:
    """``n`` compile-only H100s of one host (an NVLink node), or None without a CUDA plugin for JAX: a
    ``jax.sharding.Mesh`` of them compiles a sharded program, its collectives included, as
    ``h100_compile_only_sharding`` does one device's."""
    if not cuda_plugin_installed():
        return None
    from jax.experimental import topologies

    # "slices x hosts per slice x devices per host"
    topology = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET_CONFIG, topology=f"1x1x{n}")
    return list(topology.devices)
