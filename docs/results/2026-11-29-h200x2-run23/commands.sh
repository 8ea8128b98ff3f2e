#!/usr/bin/env bash
# Run 23 (2026-11-29, sixth session), 2 H200s of one host: the pipeline benchmark of issue 5 (pp=2 tokens
# equal to pp=1 under full-precision matmuls, then throughput), never measured on GPUs at highest precision.
# At cc60080.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec pipeline 320 python -m scripts.bench_pipeline --pp 1 2 --experts 64 --new-tokens 16
log end
