#!/usr/bin/env bash
# Run 46 (2026-12-04, twelfth session), at eabf444: run 45's profile showed register spills (255 registers a thread
# in the sparse attention, 128 at 16 warps in the HCA compressor): sweeps of the settings that cut the registers
# a thread holds, device-timed in the loop like runs 5-6; then the other kernels at their defaults.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
BK="python -m scripts.bench_kernels --reps 5 --inner 20"
sec attn_sweep 200 $BK --only sparse_attention --cases decode_B128 decode_B32_K512 prefill_csa_S32768 --configs '[{}, {"num_warps": 8}, {"block_h": 16}, {"block_h": 16, "num_warps": 8}, {"num_warps": 8, "block_k": 32}, {"block_h": 64, "num_warps": 16}]'
sec comp_sweep 90 $BK --only compressor --cases prefill_hca --configs '[{}, {"slots_per_step": 16, "num_warps": 8}, {"slots_per_step": 16, "num_warps": 4}, {"slots_per_step": 8, "num_warps": 4}, {"slots_per_step": 8, "num_warps": 8, "slot_rows": false}, {"num_warps": 8}]'
sec idx 60 $BK --only indexer --cases prefill --configs '[{}, {"num_warps": 8}]'
sec rest 130 $BK --only topk hc_pre expert_rows grouped_gemv
log end
