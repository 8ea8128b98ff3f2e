#!/usr/bin/env bash
# Run 39 (2026-11-30, eleventh session), at 7855ef3: the changed kernels' GPU tests (ran past the 150 s section after
# 19 passed, none failed: hc_pre 8, router 2, sparse attention's 8 bench shapes + 1 ragged; the rest ran in run 41),
# then the Flash-width in-model decode test (PASSED: bf16 pallas 2.03% vs bf16 xla 1.78%; pallas vs xla 1.46%).
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec kernel_tests 150 python -m pytest -q tests/test_kernel_hc_pre.py tests/test_kernel_router.py tests/test_kernel_sparse_attention.py tests/test_kernel_expert_rows.py -k gpu
sec model_decode 400 python -m pytest -q -s tests/test_kernels_in_model.py -k "flash and not prefill"
log end
