#!/usr/bin/env bash
# Run 13 (2026-11-29, fourth session): hc_pre over (token block, column block) after mix_logits at full fp32
# (run 12: 28 us busy at T=1 in one program; in-model test 2.36% with TF32 mixing logits on the kernel path). At d72e4ec.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
GEN="python -m scripts.bench_generate --model flash-slice --kernels pallas"
sec tests 70 python -m pytest -q tests/test_kernel_hc_pre.py -k gpu
sec kernels 50 env XLA_FLAGS=--xla_gpu_enable_command_buffer= python -m scripts.bench_kernels --reps 5 --inner 20 --busy --only hc_pre
sec decode 160 $GEN --decode-cases 1,4096 32,4096 --engine-cases 1,4096
sec model_tests 120 python -m pytest -q -x tests/test_kernels_in_model.py -k "pallas_decode_matches_xla_on_flash" -s
export XLA_FLAGS=--xla_gpu_enable_command_buffer=
sec profile 110 $GEN --decode-cases 1,4096 --profile 1,4096 --decode-steps 8
log end
