#!/usr/bin/env bash
# Run 44 (2026-12-04, twelfth session), at eabf444: the grouped-matmul bench-shape test alone (in run 43 it ran out
# of memory beside the in-model test), then block/warp sweeps of the sparse attention (batch-128 decode, prefill)
# and the indexer prefill, device-timed in the loop like runs 5-6.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
(which nsys ncu; nvidia-smi --query-gpu=clocks.max.sm,clocks.max.mem --format=csv) > "$OUT/tools.txt" 2>&1
sec gmm_test 100 python -m pytest -q tests/test_kernel_grouped_matmul.py -k "gpu and 4096"
BK="python -m scripts.bench_kernels --reps 5 --inner 20"
sec attn_sweep 250 $BK --only sparse_attention --cases decode_B128 prefill_csa_S32768 --configs '[{}, {"block_h": 64, "num_warps": 8}, {"block_h": 64, "num_warps": 8, "num_splits": 2}, {"block_h": 64, "num_warps": 8, "block_k": 32, "num_stages": 4}, {"block_h": 64, "num_warps": 8, "num_stages": 2}, {"num_splits": 2}]'
sec idx_sweep 170 $BK --only indexer --cases prefill --configs '[{}, {"block_q": 128, "block_k": 64}, {"block_q": 64, "block_k": 64}, {"block_q": 128, "block_k": 128, "num_warps": 8}, {"block_q": 128, "block_k": 64, "num_warps": 8}, {"block_q": 32, "block_k": 128}]'
log end
