#!/usr/bin/env bash
# Run 15 (2026-11-29, fifth session): first GPU run of the hc_post kernel and model step fusion (38da961), the
# one-token expert_rows kernel (95926b3) and the compressor decode closes-skip (4e6e560); decode and profile.
# At 0903cd0.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
GEN="python -m scripts.bench_generate --model flash-slice --kernels pallas"
sec tests 150 python -m pytest -q tests/test_kernel_hc_post.py tests/test_kernel_hc_pre.py tests/test_kernel_expert_rows.py tests/test_kernel_compressor.py -k gpu
sec kernels 80 env XLA_FLAGS=--xla_gpu_enable_command_buffer= python -m scripts.bench_kernels --reps 5 --inner 20 --busy --only hc_pre hc_post expert_rows
sec decode 160 $GEN --decode-cases 1,4096 32,4096 --engine-cases 1,4096
export XLA_FLAGS=--xla_gpu_enable_command_buffer=
sec profile 110 $GEN --decode-cases 1,4096 --profile 1,4096 --decode-steps 8
log end
