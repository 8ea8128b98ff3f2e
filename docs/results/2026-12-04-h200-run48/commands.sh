#!/usr/bin/env bash
# Run 48 (2026-12-04, twelfth session), as run 47: the HCA compressor's two settings at 8K / 16K / 32K, three
# alternating rounds, to place the threshold (the engine's prefill chunk is 16K tokens).
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
for r in 0 1 2; do
sec comp_hca 60 python -m scripts.bench_kernels --reps 10 --inner 20 --only compressor --cases prefill_hca --configs '[{"slots_per_step": 32, "num_warps": 16}, {"slots_per_step": 16, "num_warps": 4}]'
done
log end
