#!/usr/bin/env bash
# Run 36 (2026-11-30, tenth session), at 02abfcd: the in-model Flash-width GPU tests with the hc_weights barrier
# (the decode test compiled and FAILED: pallas 2.38% vs xla 1.81% of max |logit|, bound 1.25x; the prefill test ran past
# the section), then the batch-1 / 8 / 32 decode bench. Outputs: model_tests.txt, decode.txt.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec model_tests 380 python -m pytest -q -s tests/test_kernels_in_model.py -k flash
sec decode 200 python -m scripts.bench_generate --model flash-slice --kernels pallas --decode-cases 1,4096 1,32768 1,131072 8,4096 32,4096 --decode-steps 32 --rounds 2
log end
