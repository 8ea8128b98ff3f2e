#!/usr/bin/env bash
# Run 49 (2026-12-04, twelfth session), at d10f1f5: warps / windows-per-program sweeps of the CSA and indexer
# compressors' prefill, device-timed, plus every swept setting checked against the reference at the bench shapes.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
C='[{}, {"num_warps": 1}, {"num_warps": 2}, {"num_warps": 8}, {"windows_per_block": 2, "num_warps": 8}, {"windows_per_block": 4, "num_warps": 4}, {"windows_per_block": 16}, {"windows_per_block": 2, "num_warps": 2}]'
sec comp_sweep 150 python -m scripts.bench_kernels --reps 5 --inner 20 --only compressor --cases prefill_csa prefill_indexer --configs "$C"
sec comp_check 90 python sweep_check.py "$C"  # sweep_check.py sat in the repo root for the run
log end
