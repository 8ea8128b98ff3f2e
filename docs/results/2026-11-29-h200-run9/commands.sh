#!/usr/bin/env bash
# One device run (run 9, 2026-11-29 third session): sections with their own time limits, outputs under $OUT (<= 8 files).
set -u
T0=$(date +%s)
log() { echo "== $1 at $(( $(date +%s) - T0 ))s" | tee -a "$OUT/log"; }
sec() {  # sec NAME LIMIT_S CMD...  -> appended to $OUT/NAME.txt
  local name=$1 lim=$2; shift 2
  log "$name"
  timeout "$lim" "$@" 2>&1 | grep -v "DeprecationWarning\|return rule(ctx" >> "$OUT/$name.txt"; echo "rc=${PIPESTATUS[0]}" >> "$OUT/$name.txt"
}
sinkhorn_kernel() {  # on | off: the model's Pallas path with or without the Pallas Sinkhorn (A/B in one run)
  python - "$1" <<'PY'
import pathlib, sys
p = pathlib.Path("dsv4_jax/hyper_connection.py"); s = p.read_text()
on, off = '    if kernels == "pallas":\n        from kernels_pallas.sinkhorn', '    if False:\n        from kernels_pallas.sinkhorn'
p.write_text(s.replace(off, on) if sys.argv[1] == "on" else s.replace(on, off))
PY
}
nvidia-smi -L > "$OUT/gpu.txt" 2>&1
export JAX_PLATFORMS=cuda
BK="python -m scripts.bench_kernels --reps 5 --inner 20"
GEN="python -m scripts.bench_generate --model flash-slice --kernels pallas"
sec ab 100 $GEN --decode-cases 1,4096 8,4096
sinkhorn_kernel off
echo "--- XLA Sinkhorn" >> "$OUT/ab.txt"
sec ab 100 $GEN --decode-cases 1,4096 8,4096
sinkhorn_kernel on
sec engine 120 $GEN --engine-cases 1,4096
export XLA_FLAGS=--xla_gpu_enable_command_buffer=
sec profile 110 $GEN --decode-cases 1,4096 --profile 1,4096 --decode-steps 8
sec busy 80 $BK --busy --only sparse_attention topk grouped_gemv compressor --cases decode_B32 topk512_R2048 topk1024 T=1 T=32 decode_csa
log end
