#!/usr/bin/env bash
# Run 29 (2026-11-29, eighth session): the compressor decode kernel's in-place cache writes (a24d54c..5011168):
# its GPU tests; the step against the kernel before it, with and without PDL, in one process
# (exp_compressor.py beside this file; the old modules are 1690350's, copied to run_old/); a batch-1 profile at
# 128K with the optimized HLO (decode_B1_C131072_pallas_options0.txt.gz). At ba82c75.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec tests 110 python -m pytest -q tests/test_kernel_compressor.py tests/test_kernels_in_model.py -k gpu
sec exp 260 python exp_compressor.py
export XLA_FLAGS=--xla_gpu_enable_command_buffer=
sec profile 150 python -m scripts.bench_generate --model flash-slice --kernels pallas --no-ceilings --decode-cases 1,131072 --profile 1,131072 --decode-steps 8 --hlo-dir $OUT/hlo
gzip -r $OUT/hlo 2>/dev/null
log end
