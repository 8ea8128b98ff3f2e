#!/usr/bin/env bash
# Run 14 (2026-11-29, fourth session): the Flash-width decode test against fp32; a batch-1 step with more
# thunk kinds in command buffers (run 13: host dispatch 1.9 ms for a 1.77 ms device step). Tests at the working tree after d72e4ec (the fp32-anchored decode test, committed next).
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec model_tests 200 python -m pytest -q -x tests/test_kernels_in_model.py -k "pallas_decode_matches_xla_on_flash" -s
sec decode 100 env XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1" python -m scripts.bench_generate --model flash-slice --kernels pallas --decode-cases 1,4096
log end
