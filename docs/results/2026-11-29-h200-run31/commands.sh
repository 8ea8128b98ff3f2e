#!/usr/bin/env bash
# Run 31 (2026-11-29, eighth session): the mHC pre-step kernel applying the sub-block's RMSNorm (one program
# per token, whole rows): its GPU tests and the in-model ones; the kernel's cases (loop and busy time,
# num_warps 4 / 8 / 16); the step against the kernel + XLA norm in one process (exp_hc_norm.py).
# At eaa9521 plus the kernel change (committed next, with NORM_IN_KERNEL_MAX_TOKENS = 32).
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec tests 120 python -m pytest -q tests/test_kernel_hc_pre.py tests/test_kernels_in_model.py -k gpu
sec kernels 90 python -m scripts.bench_kernels --only hc_pre --configs '[{}, {"num_warps": 8}, {"num_warps": 16}]'
sec exp 250 python exp_hc_norm.py
export XLA_FLAGS=--xla_gpu_enable_command_buffer=
sec busy 90 python -m scripts.bench_kernels --only hc_pre --busy --configs '[{}, {"num_warps": 8}, {"num_warps": 16}]'
log end
