#!/usr/bin/env bash
# One device run (run 8, 2026-11-29 third session): sections with their own time limits, outputs under $OUT (<= 8 files).
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
sec tests 100 python -m pytest -q tests/test_kernel_sinkhorn.py -k gpu
if ! grep -q "passed" "$OUT/tests.txt" || grep -q "failed\|error" "$OUT/tests.txt"; then
  echo "SINKHORN KERNEL FAILED: model falls back to the XLA Sinkhorn for this run" | tee -a "$OUT/log"
  python - <<'PY'
import re, pathlib
p = pathlib.Path("dsv4_jax/hyper_connection.py"); s = p.read_text()
p.write_text(s.replace('    if kernels == "pallas":\n        from kernels_pallas.sinkhorn', '    if False:\n        from kernels_pallas.sinkhorn'))
PY
fi
sec kernels 50 $BK --only sinkhorn
export XLA_FLAGS=--xla_gpu_enable_command_buffer=
sec busy 150 $BK --busy --only sinkhorn topk sparse_attention indexer --cases sinkhorn topk512_R32 decode_B128 decode_B32_N
sec profile 250 python -m scripts.bench_generate --model flash-slice --kernels pallas --decode-cases 1,4096 1,131072 --profile 1,4096 1,131072 --decode-steps 8
log end
