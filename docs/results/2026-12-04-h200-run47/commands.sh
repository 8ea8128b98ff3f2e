#!/usr/bin/env bash
# Run 47 (2026-12-04, twelfth session), working tree after eabf444 (compressor.prefill_tiling: HCA with every SM
# holding a window pools 16-slot steps at 4 warps): the compressor's GPU tests, its bench at the new defaults
# with the old HCA setting beside it, and the kernels whose rows runs 44-46 did not refresh, at their defaults.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec comp_tests 120 python -m pytest -q tests/test_kernel_compressor.py -k gpu
BK="python -m scripts.bench_kernels --reps 5 --inner 20"
sec comp_hca 80 $BK --only compressor --cases prefill_hca --configs '[{}, {"slots_per_step": 32, "num_warps": 16}]'
sec comp_rest 80 $BK --only compressor --cases prefill_csa prefill_indexer decode
sec rest 150 $BK --only indexer sparse_attention --cases decode_B32_N32768 decode_B32_K1024 prefill_hca prefill_csa_S8192
log end
