#!/usr/bin/env bash
# Run 28 (2026-11-29, seventh session), 2 H200s of one host: the pipeline benchmark of issue 5. First the bf16
# throughput rows without the fp32 check (run 23 spent its 320 s in that check); then the check (pp=2 tokens
# equal to pp=1 under full-precision matmuls) on a 3-layer slice with 16 experts. At 1690350 (from the repo root).
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec throughput 260 python -m scripts.bench_pipeline --pp 1 2 --experts 64 --new-tokens 16 --skip-check
sec check 220 python -m scripts.bench_pipeline --pp 1 2 --layers SWA,CSA,HCA --experts 16 --batch 4 --context 512 --new-tokens 8
log end
