#!/usr/bin/env bash
# Run 43 (2026-12-04, twelfth session), at eabf444: every kernel GPU test (three processes side by side) and the
# Flash-width in-model chunked prefill + decode test (not run since run 18), all in parallel on one H200.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
sec model_prefill 560 python -m pytest -q -s tests/test_kernels_in_model.py -k "flash and prefill" &
sec tests_attn 540 python -m pytest -q tests/test_kernel_sparse_attention.py -k gpu &
sec tests_idx 540 python -m pytest -q tests/test_kernel_compressor.py tests/test_kernel_indexer.py tests/test_kernel_topk.py -k gpu &
sec tests_moe 540 python -m pytest -q tests/test_kernel_hc_pre.py tests/test_kernel_expert_rows.py tests/test_kernel_grouped_gemv.py tests/test_kernel_grouped_matmul.py -k gpu &
wait
log end
