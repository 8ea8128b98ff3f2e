#!/usr/bin/env bash
# Run 34 (2026-11-30, ninth session), at 4fb1f22: the GPU tests of b3a10f5's three untimed cuts (hc_pre, expert_rows,
# and the in-model Flash-width tests, which did not finish in the 150 s section: see run 35), then their A/B in one
# process (exp_small_kernels.py, beside this file). Before it: mkdir -p run_old && git show e7d1376:dsv4_jax/moe.py > run_old/moe_old.py
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec tests 150 python -m pytest -q tests/test_kernel_hc_pre.py tests/test_kernel_expert_rows.py tests/test_kernels_in_model.py -k "gpu or flash"
sec exp 200 python exp_small_kernels.py
log end
