#!/usr/bin/env bash
# Run 16 (2026-11-29, fifth session): hc_post with one fp32 (IEEE) dot per stream instead of a loop over fn's
# rows (run 15: 24 us at T=1, 45 us per call in the model); its GPU tests against the kernel's own streams.
# At 0903cd0 plus hc_post_dot_variant.diff (beside this file; not committed: reverted in 38fb664).
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
GEN="python -m scripts.bench_generate --model flash-slice --kernels pallas"
sec tests 100 python -m pytest -q tests/test_kernel_hc_post.py -k gpu
sec kernels 80 env XLA_FLAGS=--xla_gpu_enable_command_buffer= python -m scripts.bench_kernels --reps 5 --inner 20 --busy --only hc_post --configs '[{}, {"block_d": 64}, {"block_d": 256}]'
sec decode 160 $GEN --decode-cases 1,4096 32,4096 --engine-cases 1,4096
export XLA_FLAGS=--xla_gpu_enable_command_buffer=
sec profile 110 $GEN --decode-cases 1,4096 --profile 1,4096 --decode-steps 8
log end
