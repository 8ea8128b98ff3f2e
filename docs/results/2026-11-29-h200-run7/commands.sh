#!/usr/bin/env bash
# One device run (run 1, 2026-11-29 third session): sections with their own time limits, outputs under $OUT (<= 8 files).
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
sec kernels 60 $BK --only sinkhorn
sec generate 380 python -m scripts.bench_generate --model flash-slice --kernels pallas --decode-cases 1,4096 32,4096 128,4096 1,131072 32,131072
log end
