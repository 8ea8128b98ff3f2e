#!/usr/bin/env bash
# Run 22 (2026-11-29, sixth session): the one-token decode window read from the written ring (730f8c1): its
# GPU kernel tests; the step against the old window layout in one process (exp_window.py beside this file),
# then batch 32 and Engine.generate; a profile of the batch-1 step. At cc60080.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec tests 120 python -m pytest -q tests/test_kernel_sparse_attention.py -k gpu
sec exp 230 python exp_window.py
export XLA_FLAGS=--xla_gpu_enable_command_buffer=
sec profile 110 python -m scripts.bench_generate --model flash-slice --kernels pallas --no-ceilings --decode-cases 1,4096 --profile 1,4096 --decode-steps 8
log end
