#!/usr/bin/env bash
# Run 26 (2026-11-29, seventh session): the mHC boundary kernels (kernels_pallas/hc_pre.py: the mixing sums in
# a kernel at decode sizes, the expand fused into them): GPU tests, busy time against XLA, and the batch-1
# decode step with base / mid-layer / all boundaries fused, in one process (exp_mhc2.py: the same file as in
# run 27's folder);
# a profile of the all-boundaries variant. At 1690350 plus the uncommitted kernels (not adopted; hc_pre.py
# beside this file, reconstructed from the session's copy; the model change is run 27's diff), from the repo root.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec tests 70 python -m pytest -q tests/test_kernel_hc_pre.py -k gpu
sec exp 200 python exp_mhc2.py
export XLA_FLAGS=--xla_gpu_enable_command_buffer=
sec kernels 60 python -m scripts.bench_kernels --busy --only hc_pre --cases T1
sec profile 100 python exp_mhc2.py profile cross
log end
