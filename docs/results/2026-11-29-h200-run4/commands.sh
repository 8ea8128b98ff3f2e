#!/usr/bin/env bash
# One device run (run A of 2026-11-29 session 5): sections with their own time limits, outputs under $OUT.
set -u
T0=$(date +%s)
log() { echo "== $1 at $(( $(date +%s) - T0 ))s" | tee -a "$OUT/log"; }
sec() {  # sec NAME LIMIT_S CMD...  -> $OUT/NAME.txt
  local name=$1 lim=$2; shift 2
  log "$name"
  timeout "$lim" "$@" > "$OUT/$name.txt" 2>&1; echo "rc=$?" >> "$OUT/$name.txt"
}
nvidia-smi -L > "$OUT/gpu.txt" 2>&1
python -c 'import jax, jaxlib, flax; print(jax.__version__, jaxlib.__version__, flax.__version__, jax.devices())' >> "$OUT/gpu.txt" 2>&1
export JAX_PLATFORMS=cuda
BK="python -m scripts.bench_kernels --reps 10 --inner 10"
sec topk_tests 90 python -m pytest -q -x tests/test_kernel_topk.py -k gpu
sec topk_sweep 60 $BK --only topk --configs '[{}, {"num_warps": 4}, {"num_warps": 8}, {"num_warps": 16}, {"num_warps": 32}]'
sec attn_sweep 170 $BK --only sparse_attention --cases decode_B128 decode_B32_K512 prefill_csa_S32768 --configs '[{}, {"block_h": 64, "num_warps": 8}, {"block_h": 64, "num_warps": 8, "block_k": 32}, {"block_h": 64, "num_warps": 16, "block_k": 32}, {"block_h": 32, "num_warps": 8}, {"block_k": 32, "num_stages": 4}, {"block_h": 16}, {"block_h": 32, "block_k": 128, "num_stages": 2}]'
sec model_tests 230 python -m pytest -q -x tests/test_kernels_in_model.py -k flash -s
sec compressor_sweep 100 $BK --only compressor --cases prefill --configs '[{}, {"windows_per_block": 1}, {"windows_per_block": 4}, {"windows_per_block": 8}, {"num_warps": 8}, {"num_warps": 4, "num_stages": 1}]'
log end
