#!/usr/bin/env bash
# Run 24 (2026-11-29, seventh session): expert_rows' dense cases (one matrix, one row) against XLA's GEMVs;
# decode context growth at batch 1 (4K, 32K, 128K) now that the engine is not host-bound, plus batch 8 / 128
# at 128K; the sparse-attention GPU tests that run 22's limit cut; a profile of the batch-1 step at 128K. At 1690350 (run from the repository root).
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec rows 80 env XLA_FLAGS=--xla_gpu_enable_command_buffer= python -m scripts.bench_kernels --busy --only expert_rows --cases dense --configs '[{}, {"block_n": 16}, {"block_n": 32}, {"block_n": 16, "block_k": 256}, {"block_n": 32, "num_warps": 8}]'
GEN="python -m scripts.bench_generate --model flash-slice --kernels pallas"
sec decode 230 $GEN --decode-cases 1,4096 1,32768 1,131072 8,131072 128,131072
sec tests 140 python -m pytest -q tests/test_kernel_sparse_attention.py -k "gpu and (prefill or hca)"
export XLA_FLAGS=--xla_gpu_enable_command_buffer=
sec profile 110 $GEN --no-ceilings --decode-cases 1,131072 --profile 1,131072 --decode-steps 8
log end
