"""Pallas GPU kernels for DeepSeek-V4, one kernel per module, each beside the plain-JAX reference
that defines its meaning. Every module exposes ``reference(...)``, the Pallas implementation with the
same signature plus ``interpret=`` (CPU interpret mode for tests), and ``bench_cases()`` for
``scripts/bench_kernels.py`` (scripts/kernel_cases.py builds sparse_attention's, from the model's metadata).
Nothing here imports dsv4_jax: the model calls the kernels through dsv4_jax.ops.
"""
