#!/usr/bin/env bash
# Run 30 (2026-11-29, eighth session): the metadata step ending in an optimization barrier, so XLA computes
# the RoPE tables once instead of inside each consumer fusion: the step against the one before in one process
# (exp_metadata.py beside this file; the old metadata.py is ba82c75's, copied to run_old/), then a batch-1 128K profile with the barrier and its optimized HLO.
# At ba82c75 plus the barrier (committed next).
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec exp 330 python exp_metadata.py
export XLA_FLAGS=--xla_gpu_enable_command_buffer=
sec profile 120 python -m scripts.bench_generate --model flash-slice --kernels pallas --no-ceilings --decode-cases 1,131072 --profile 1,131072 --decode-steps 8 --hlo-dir $OUT/hlo
gzip -r $OUT/hlo 2>/dev/null
log end
