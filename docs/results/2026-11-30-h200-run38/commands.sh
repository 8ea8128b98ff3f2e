#!/usr/bin/env bash
# Run 38 (2026-11-30, tenth session), at the commit that reads the mHC collapse in fp32 for its norm (working tree
# before commit): hc_pre GPU tests (8 passed), the Flash-width in-model decode test (PASSED: pallas 2.03% vs xla 1.81%),
# the prefill test (ran past its 150 s section: no device time left). Outputs: hc_pre_tests.txt, model_decode.txt, model_prefill.txt.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec hc_pre_tests 60 python -m pytest -q tests/test_kernel_hc_pre.py -k gpu
sec model_decode 360 python -m pytest -q -s tests/test_kernels_in_model.py -k "flash and not prefill"
sec model_prefill 150 python -m pytest -q -s tests/test_kernels_in_model.py -k "flash and prefill"
log end
