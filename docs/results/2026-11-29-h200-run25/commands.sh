#!/usr/bin/env bash
# Run 25 (2026-11-29, seventh session): the few-row dense product kernel (kernels_pallas/gemv.py): its GPU
# tests and busy time against XLA's GEMVs; the batch-1 decode step with the dense layers through it, in one
# process against XLA's (exp_gemv.py beside this file); a profile of that variant. At 1690350 plus gemv.py
# (kept here: not adopted, so not in the tree; it ran as kernels_pallas/gemv.py).
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec tests 60 python -m pytest -q tests/test_kernel_gemv.py -k gpu
sec exp 200 python exp_gemv.py
export XLA_FLAGS=--xla_gpu_enable_command_buffer=
sec kernels 110 python -m scripts.bench_kernels --busy --only gemv --configs '[{}, {"num_warps": 8}, {"block_k": 512}, {"num_warps": 2}]'
sec profile 100 python exp_gemv.py profile gemv_all
log end
