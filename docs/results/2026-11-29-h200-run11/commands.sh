#!/usr/bin/env bash
# Run 11 (2026-11-29, fourth session), at b69ed32: first GPU compile of hc_pre / in-kernel tile grouped_gemv /
# device-carried decode. Every section hit its time limit: Triton compiled the unrolled hc_pre for minutes
# (fixed in 63ddbc2); pytest's buffered output was lost on the kill (run 12 sets PYTHONUNBUFFERED).
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda
GEN="python -m scripts.bench_generate --model flash-slice --kernels pallas"
sec tests 90 python -m pytest -q tests/test_kernel_hc_pre.py tests/test_kernel_grouped_gemv.py -k gpu
sec kernels 80 env XLA_FLAGS=--xla_gpu_enable_command_buffer= python -m scripts.bench_kernels --reps 5 --inner 20 --busy --only hc_pre grouped_gemv --cases hc_pre_T1 "T=1"
sec decode 130 $GEN --decode-cases 1,4096 8,4096 32,4096 --engine-cases 1,4096
sec model_tests 130 python -m pytest -q -x tests/test_kernels_in_model.py -k "pallas_decode_matches_xla_on_flash" -s
export XLA_FLAGS=--xla_gpu_enable_command_buffer=
sec profile 110 $GEN --decode-cases 1,4096 --profile 1,4096 --decode-steps 8
log end
