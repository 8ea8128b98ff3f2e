#!/usr/bin/env bash
# Run 20 (2026-11-29, sixth session): the mHC as fused elementwise XLA (e938f7c: expand as fp32 multiply-adds,
# decode-sized mixing logits as a product sum) against the code before it (2fb4b2a, copied to run_baseline/ for
# this run by `git archive 2fb4b2a dsv4_jax kernels_pallas scripts`), batch-1 decode and 4K prefill; batch 32;
# a profile; the hc_pre GPU tests. Separate processes: run 21 found the 1.758 / 1.880 ms difference to be
# between processes, not between the code (in one process: 1.694 / 1.683 ms).
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
GEN="python -m scripts.bench_generate --model flash-slice --kernels pallas"
sec tests 90 python -m pytest -q tests/test_kernel_hc_pre.py -k gpu
sec base 150 bash -c "cd run_baseline && $GEN --decode-cases 1,4096 --prefill 4096"
sec new 190 $GEN --decode-cases 1,4096 32,4096 --prefill 4096
export XLA_FLAGS=--xla_gpu_enable_command_buffer=
sec profile 110 $GEN --no-ceilings --decode-cases 1,4096 --profile 1,4096 --decode-steps 8
log end
