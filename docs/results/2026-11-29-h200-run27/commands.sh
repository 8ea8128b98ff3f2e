#!/usr/bin/env bash
# Run 27 (2026-11-29, seventh session): run 26's mHC boundary kernels rewritten one token per program, one warp,
# scalar logits (kernels_pallas/hc_pre.py): GPU tests, busy time against XLA over block / warp settings, and
# the batch-1 decode step with base / mid-layer / all boundaries fused, in one process (exp_mhc2.py beside this
# file); a profile of the all-boundaries variant. At 1690350 plus the uncommitted kernels (not adopted: hc_pre.py
# and model_and_tests.diff beside this file), from the repository root.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec tests 60 python -m pytest -q tests/test_kernel_hc_pre.py -k gpu
sec exp 180 python exp_mhc2.py
export XLA_FLAGS=--xla_gpu_enable_command_buffer=
sec kernels 70 python -m scripts.bench_kernels --busy --only hc_pre --cases T1 --configs '[{}, {"num_warps": 2}, {"num_warps": 4}, {"block_c": 128}, {"block_c": 32}]'
sec profile 90 python exp_mhc2.py profile cross
log end
