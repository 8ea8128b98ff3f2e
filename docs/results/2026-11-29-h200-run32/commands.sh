#!/usr/bin/env bash
# Run 32 (2026-11-29, eighth session): expert_rows with one shared x row and the SwiGLU on load: its GPU tests
# and the in-model ones; its kernel cases; the step against a5afcf6's MoE path and against the mHC pre-step on
# XLA, in one process (exp_moe.py); a batch-1 4K profile of the new step.
# At a5afcf6 plus the change in expert_rows_swiglu.diff (not adopted: reverted).
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec tests 110 python -m pytest -q tests/test_kernel_expert_rows.py tests/test_kernels_in_model.py -k gpu
sec exp 230 python exp_moe.py
export XLA_FLAGS=--xla_gpu_enable_command_buffer=
sec kernels 60 python -m scripts.bench_kernels --only expert_rows --busy --cases "T=1"
sec profile 100 python -m scripts.bench_generate --model flash-slice --kernels pallas --no-ceilings --decode-cases 1,4096 --profile 1,4096 --decode-steps 8
log end
