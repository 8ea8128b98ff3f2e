"""Pallas GPU kernels for DeepSeek-V4, one kernel per module, each beside the plain-JAX reference that defines
its meaning (``reference``, or ``reference_prefill`` / ``reference_decode*`` per phase). A Pallas function takes
its reference's arguments plus ``interpret=`` (CPU interpret mode for tests) and ``tuning=``: a frozen
``TuningConfig`` (``PrefillTuningConfig`` / ``DecodeTuningConfig`` where the phases differ), None for the
module's per-shape ``choose_*tuning``. Benchmark inputs are in scripts/kernel_cases.py, for
scripts/bench_kernels.py. Nothing here imports dsv4_jax: the model calls the kernels through dsv4_jax.ops.
"""
