#!/usr/bin/env bash
# Run 15b (2026-11-29, fifth session): which side of run 15's hc_post GPU test failures was off, the kernel
# or XLA's fp32 matmul? diag_hc.py (beside this file) at 0903cd0, run from the repository root.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec diag 150 python diag_hc.py
log end
