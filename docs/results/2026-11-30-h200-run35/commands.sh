#!/usr/bin/env bash
# Run 35 (2026-11-30, ninth session), at 4fb1f22: three calls, each one section, trying to complete the in-model
# Flash-width GPU tests; none did (rc=124, no test result printed). Outputs: tests_flash.txt (call a, on run 34's
# machine: gpu_a.txt), tests_flash_decode.txt (call b, a fresh machine: gpu_b.txt), flash_decode_compiles.txt (call c, same machine as b;
# JAX_LOG_COMPILES printed nothing under pytest, whose logging capture holds records until a test ends).
# The cause, found afterwards on a CPU host by compiling for a compile-only H100 (docs/performance.md, ninth
# session): the XLA path's decode step compiled for ~197 s, its Sinkhorn pulled into expand's fusion (e938f7c).
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
# call a
sec tests_flash 330 python -m pytest -v --durations=5 tests/test_kernels_in_model.py -k flash
# call b
sec tests_flash_decode 560 python -m pytest -q -s --durations=3 tests/test_kernels_in_model.py -k pallas_decode_matches_xla_on_flash
# call c
export JAX_LOG_COMPILES=1
sec flash_decode_compiles 470 python -m pytest -q -s -p no:cacheprovider tests/test_kernels_in_model.py -k pallas_decode_matches_xla_on_flash
log end
