#!/usr/bin/env bash
# Run 17 (2026-11-29, fifth session): after reverting the hc_post kernel (runs 15-16: 22-45 us per call in the
# model against XLA's 4.5 us): decode with the per-row expert kernel and the compressor skip; the engine with
# custom calls in CUDA graphs (its host dispatch, 2.5 ms per step in run 16, exceeds the device step); the
# fp32-anchored Flash-width in-model tests. At 38fb664 (the revert, staged then).
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
GEN="python -m scripts.bench_generate --model flash-slice --kernels pallas"
sec decode 130 $GEN --decode-cases 1,4096 32,4096 --engine-cases 1,4096
sec engine_graphs 80 env XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1" $GEN --decode-cases --engine-cases 1,4096
sec model_tests 340 python -m pytest -q tests/test_kernels_in_model.py -k flash -s
log end
