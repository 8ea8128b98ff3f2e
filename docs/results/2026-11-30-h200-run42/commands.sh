#!/usr/bin/env bash
# Run 42 (2026-11-30, eleventh session), at the revert of the router kernel and the SwiGLU ending (working tree
# before commit): batch 1 x 4K decode, three rounds: 1.545 / 1.546 / 1.556 ms = 70.6 / 70.5 / 70.1% of roofline.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec decode 190 python -m scripts.bench_generate --model flash-slice --kernels pallas --decode-cases 1,4096 --decode-steps 48 --rounds 3
log end
