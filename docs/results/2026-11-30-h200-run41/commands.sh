#!/usr/bin/env bash
# Run 41 (2026-11-30, eleventh session), at 7855ef3: the remaining sparse-attention and expert-row GPU tests (16
# passed), the second A/B (exp_cuts2.py: without the router kernel and the SwiGLU ending the step is 34 us faster,
# three rounds; exp_cuts2.py = run 40's exp_cuts.py with exp_cuts2.patch applied), the decode table at batch 8 / 32 / 128 x 4K. (run_old/ as in run 40.)
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec kernel_tests 140 python -m pytest -q tests/test_kernel_sparse_attention.py tests/test_kernel_expert_rows.py -k "gpu and not bench_shapes"
sec exp2 220 python exp_cuts2.py  # exp_cuts2.py: see exp_cuts2.patch
sec decode 200 python -m scripts.bench_generate --model flash-slice --kernels pallas --decode-cases 8,4096 32,4096 128,4096 --decode-steps 32 --rounds 2
log end
