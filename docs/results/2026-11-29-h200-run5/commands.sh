#!/usr/bin/env bash
# One device run (run 5, 2026-11-29): sections with their own time limits, outputs under $OUT.
set -u
T0=$(date +%s)
log() { echo "== $1 at $(( $(date +%s) - T0 ))s" | tee -a "$OUT/log"; }
sec() {  # sec NAME LIMIT_S CMD...  -> $OUT/NAME.txt
  local name=$1 lim=$2; shift 2
  log "$name"
  timeout "$lim" "$@" 2>&1 | grep -v "DeprecationWarning\|return rule(ctx" > "$OUT/$name.txt"; echo "rc=${PIPESTATUS[0]}" >> "$OUT/$name.txt"
}
nvidia-smi -L > "$OUT/gpu.txt" 2>&1
export JAX_PLATFORMS=cuda
BK="python -m scripts.bench_kernels --reps 5 --inner 20"
sec topk_tests 60 python -m pytest -q -x tests/test_kernel_topk.py -k gpu
sec topk_sweep 70 $BK --only topk --configs '[{}, {"num_warps": 8}, {"num_warps": 16}, {"num_warps": 32}, {"segments": 2}, {"segments": 4}, {"segments": 4, "num_warps": 8}, {"segments": 8, "num_warps": 8}]'
sec attn_sweep 110 $BK --only sparse_attention --configs '[{}, {"block_h": 16}, {"block_h": 32}, {"block_k": 32, "num_stages": 4}, {"block_h": 64, "num_warps": 8}]'
sec compressor_sweep 70 $BK --only compressor --configs '[{}, {"windows_per_block": 1}, {"windows_per_block": 2}, {"num_warps": 8}, {"num_stages": 1}]'
sec indexer 40 $BK --only indexer
sec gemv 40 $BK --only grouped_gemv --cases "T=1" "T=8"
sec gmm_sweep 90 $BK --only grouped_matmul --cases "T=4096" --configs '[{}, {"block_n": 256}, {"block_k": 128, "max_concurrent_steps": 3}, {"block_m": 64}, {"max_concurrent_steps": 6}]'
sec prefill 200 python -m scripts.bench_generate --model flash-slice --kernels pallas --prefill 32768 --prefill-chunk 2048 8192 --decode-cases
log end
