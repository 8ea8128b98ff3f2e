#!/usr/bin/env bash
# Run 18 (2026-11-29, fifth session): the fp32-anchored Flash-width chunked prefill + decode test (run 17 ran
# out of time after the decode test passed). At 38fb664.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec model_tests 255 python -m pytest -q tests/test_kernels_in_model.py -k pallas_prefill_and_decode_match_xla_on_flash -s
log end
