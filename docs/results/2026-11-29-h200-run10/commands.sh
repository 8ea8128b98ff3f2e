#!/usr/bin/env bash
# One device run (run 10, 2026-11-29 third session): sections with their own time limits, outputs under $OUT (<= 8 files).
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
GEN="python -m scripts.bench_generate --model flash-slice --kernels pallas"
sec decode 150 $GEN --decode-cases 1,4096 8,4096 32,4096 128,4096
sec model_tests 130 python -m pytest -q -x tests/test_kernels_in_model.py -k "pallas_decode_matches_xla_on_flash" -s
sec engine 110 $GEN --engine-cases 1,4096
export XLA_FLAGS=--xla_gpu_enable_command_buffer=
sec profile 110 $GEN --decode-cases 1,4096 --profile 1,4096 --decode-steps 8
log end
