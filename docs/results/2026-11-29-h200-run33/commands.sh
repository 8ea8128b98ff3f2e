#!/usr/bin/env bash
# Run 33 (2026-11-29, eighth session): the step at HEAD (metadata barrier, hc_pre with the norm) on one
# machine: batch 1 at 4K / 32K / 128K, batch 8 and 32 at 4K, 2 rounds. At the commit after a5afcf6 (records only).
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec decode 330 python -m scripts.bench_generate --model flash-slice --kernels pallas --decode-cases 1,4096 1,32768 1,131072 8,4096 32,4096 --decode-steps 32 --rounds 2
log end
