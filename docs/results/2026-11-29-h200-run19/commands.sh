#!/usr/bin/env bash
# Run 19 (2026-11-29, sixth session): first GPU run of 71c2789 (flat weights to DeviceSteps) and 2594b99
# (sampling scalars once per generation): the engine's per-token host time; batch 32 decode at the current code;
# the engine with custom calls in CUDA graphs; a profile of the batch-1 step after the hc_post revert. At 2fb4b2a.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
GEN="python -m scripts.bench_generate --model flash-slice --kernels pallas"
sec decode 200 $GEN --decode-cases 1,4096 32,4096 --engine-cases 1,4096
sec engine_graphs 150 env XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1" $GEN --decode-cases --engine-cases 1,4096
export XLA_FLAGS=--xla_gpu_enable_command_buffer=
sec profile 110 $GEN --decode-cases 1,4096 --profile 1,4096 --decode-steps 8
log end
