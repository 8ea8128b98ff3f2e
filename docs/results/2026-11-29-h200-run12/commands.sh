#!/usr/bin/env bash
# Run 12 (2026-11-29, fourth session): hc_pre with loops (run 11 timed out compiling it), grouped_gemv tile_of, device-carried decode. At 63ddbc2.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
GEN="python -m scripts.bench_generate --model flash-slice --kernels pallas"
sec tests 120 python -m pytest -q tests/test_kernel_hc_pre.py tests/test_kernel_grouped_gemv.py -k gpu
sec kernels 80 env XLA_FLAGS=--xla_gpu_enable_command_buffer= python -m scripts.bench_kernels --reps 5 --inner 20 --busy --only hc_pre grouped_gemv --cases hc_pre_T1 "T=1"
sec decode 150 $GEN --decode-cases 1,4096 8,4096 32,4096 --engine-cases 1,4096
sec model_tests 130 python -m pytest -q -x tests/test_kernels_in_model.py -k "pallas_decode_matches_xla_on_flash" -s
log end
