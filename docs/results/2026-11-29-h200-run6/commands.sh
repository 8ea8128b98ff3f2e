#!/usr/bin/env bash
# One device run (run 6, 2026-11-29): sections with their own time limits, outputs under $OUT (<= 8 files).
set -u
T0=$(date +%s)
log() { echo "== $1 at $(( $(date +%s) - T0 ))s" | tee -a "$OUT/log"; }
sec() {  # sec NAME LIMIT_S CMD...  -> appended to $OUT/NAME.txt
  local name=$1 lim=$2; shift 2
  log "$name"
  timeout "$lim" "$@" 2>&1 | grep -v "DeprecationWarning\|return rule(ctx" >> "$OUT/$name.txt"; echo "rc=${PIPESTATUS[0]}" >> "$OUT/$name.txt"
}
nvidia-smi -L > "$OUT/gpu.txt" 2>&1
export JAX_PLATFORMS=cuda
BK="python -m scripts.bench_kernels --reps 5 --inner 20"
sec tests 90 python -m pytest -q tests/test_kernel_topk.py tests/test_kernel_compressor.py -k gpu
sec kernels 60 $BK --only topk --configs '[{}, {"num_warps": 8}, {"num_warps": 16}, {"num_warps": 32}, {"segments": 2}, {"segments": 4}, {"segments": 4, "num_warps": 8}, {"segments": 8, "num_warps": 8}]'
sec kernels 30 $BK --only compressor --cases prefill_csa
sec generate 420 python -m scripts.bench_generate --model flash-slice --kernels pallas --prefill 4096 32768 --prefill-chunk 8192 16384 --decode-cases 1,4096 8,4096 32,4096 128,4096 1,131072 32,131072
log end
