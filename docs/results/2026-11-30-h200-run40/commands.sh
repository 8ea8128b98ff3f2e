#!/usr/bin/env bash
# Run 40 (2026-11-30, eleventh session), at 7855ef3: the four launch cuts A/B at batch 1 x 4K in one process
# (exp_cuts.py; run_old/ held the old modules: git show f8e76fb:kernels_pallas/hc_pre.py, 4c25863:kernels_pallas/
# sparse_attention.py, eca254c:dsv4_jax/moe.py), then the in-model prefill + decode test (ran past its 300 s
# section: not run).
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec exp 280 python exp_cuts.py
sec model_prefill 300 python -m pytest -q -s tests/test_kernels_in_model.py -k "flash and prefill"
log end
