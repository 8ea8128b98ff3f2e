#!/usr/bin/env bash
# Run 45 (2026-12-04, twelfth session), at eabf444: Nsight Compute (ncu, in the GPU image) on one launch of each
# kernel whose target is missed, to see what bounds it (first profile of the kernels' insides).
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1 XLA_FLAGS=--xla_gpu_enable_command_buffer=
NCU="/usr/local/cuda/bin/ncu --target-processes all -k regex:dsv4_ --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section SchedulerStats"
sec ncu 400 $NCU python ncu_probe.py sparse_attention:decode_B128_K512 'sparse_attention:decode_B128_K512:{"block_h": 64, "num_warps": 8}' sparse_attention:prefill_csa_S32768_C2048 indexer:prefill_S8192_N2048 indexer:decode_B32_N32768 compressor:prefill_hca_m128_d512_S32768 compressor:prefill_csa_m4_d512_S32768
log end
