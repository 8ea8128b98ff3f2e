#!/usr/bin/env bash
# Run 37 (2026-11-30, tenth session), at 02abfcd: which kernel family moves the Flash-width decode test's bf16 logits
# away from fp32 (diag_inmodel.py, copied to the repo root for the run; "only X": kernels="pallas" with every other family
# patched back to its XLA function). The section ended (rc=124) before the "all but X" variants. Output: diag.txt.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec diag 540 python diag_inmodel.py
log end
