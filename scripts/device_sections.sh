# Sourced by a GPU run's script (its commands.sh, writing under $OUT): each benchmark or test is a
# section with its own time limit, so one slow case cannot eat the run, and every section's output is
# appended to $OUT/NAME.txt with its exit status (the device tool returns at most 8 files from $OUT).
#
#   source scripts/device_sections.sh
#   sec tests 100 python -m pytest -q tests/test_kernel_topk.py -k gpu
#   sec kernels 60 python -m scripts.bench_kernels --busy --only topk
#   log end
T0=$(date +%s)
# One compilation cache for every process of the run (and of later calls while the machine stays warm, which
# keeps ignored files): a program compiled once loads from disk, and XLA's per-fusion autotuning results are
# shared, so the many programs of one model (steps, bench pieces, a test's two implementations) autotune each
# matmul shape once.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
nvidia-smi -L > "$OUT/gpu.txt" 2>&1
log() { echo "== $1 at $(( $(date +%s) - T0 ))s" | tee -a "$OUT/log"; }
sec() {  # sec NAME LIMIT_S CMD...  -> appended to $OUT/NAME.txt, then "rc=<status>" (124: time limit)
  local name=$1 lim=$2; shift 2
  log "$name"
  timeout "$lim" "$@" 2>&1 | grep -v "DeprecationWarning\|return rule(ctx" >> "$OUT/$name.txt"
  echo "rc=${PIPESTATUS[0]}" >> "$OUT/$name.txt"
}
