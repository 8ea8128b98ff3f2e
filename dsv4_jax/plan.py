"""``python -m dsv4_jax.plan``: the per-device memory of a model on a layout (dsv4_jax/runtime/plan.py says what
is counted and how). Bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .model.config import ConfigError, DeepseekV4Config
from .model.transformer import InputError
from .runtime.cli import EXIT_USAGE, _HelpFormatter, _Parser
from .model.kv_rows import KV_CACHE_DTYPES
from .runtime.plan import DEFAULT_CHUNK, PRECISIONS, cache_bytes_per_token, format_bytes, format_plan, parse_bytes, plan
from .weights.errors import CheckpointError
from .weights.params import checkpoint_config

PRESETS = {"flash": DeepseekV4Config.flash, "pro": DeepseekV4Config.pro}  # model/config.py: the released sizes
NAMES = {k: f"--{k.replace('_', '-')}" for k in ("tp", "dp", "pp", "ep", "capacity", "batch", "precision", "chunk",
                                                  "kv_cache_dtype")}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m dsv4_jax.plan", formatter_class=_HelpFormatter,
                description="The bytes one device holds for a DeepSeek-V4 model on a tp x dp x pp layout: weights "
                "by kind and precision, caches by field, an activation estimate, and whether they fit.")
    p.add_argument("--config", required=True,
                   help="flash, pro (the released sizes), a config.json or a checkpoint directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel devices per stage: heads, vocabulary, widths")
    p.add_argument("--dp", type=int, default=1, help="data-parallel devices per stage: batch rows")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages: contiguous layer ranges")
    p.add_argument("--ep", action="store_true", help="routed experts whole over the stage's dp x tp devices "
                   "(default: their width split over tp)")
    p.add_argument("--capacity", type=int, required=True, help="cache capacity in tokens per sequence")
    p.add_argument("--batch", type=int, required=True, help="sequences (padded to a multiple of --dp)")
    p.add_argument("--gpu-memory", default="141GB", help="one device's memory (GB, GiB, ... or bytes)")
    p.add_argument("--precision", choices=PRECISIONS, default="released",
                   help="weights as the checkpoint stores them and from_pretrained keeps them (released: FP8 / "
                   "FP4 with scales), or dequantised to bf16 (--dequantize)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="prefill tokens per sequence and step, for "
                   "the activation estimate")
    p.add_argument("--mtp", action="store_true", help="with the multi-token-prediction block and its cache (on every "
                   "pipeline stage), as speculative decoding holds them")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="the caches' window and compressed K=V rows: bf16 (auto) or DeepSeek's FP8 record (e4m3 + "
                   "bf16 RoPE + a scale per 64 channels: 583 bytes a row for 512 channels)")
    return p


def load_config(text: str) -> DeepseekV4Config:
    """--config: a preset name, a config.json file or a checkpoint directory."""
    if text in PRESETS:
        return PRESETS[text]()
    path = Path(text)
    if path.is_dir():
        return checkpoint_config(path)
    if path.is_file():
        return DeepseekV4Config.from_json(path)
    raise InputError(f"--config {text!r} is not {', '.join(PRESETS)}, a config.json or a checkpoint directory")


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config)
    gpu_memory = parse_bytes(args.gpu_memory, "--gpu-memory")
    p = plan(cfg, args.tp, args.dp, args.pp, args.ep, capacity=args.capacity, batch=args.batch,
             precision=args.precision, chunk=args.chunk, mtp=args.mtp, names=NAMES, kv_cache_dtype=args.kv_cache_dtype)
    experts = f"whole over {args.dp * args.tp} devices" if args.ep else f"width over tp {args.tp}"
    print(f"config {args.config}: {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} routed experts"
          f"{' + MTP block' if args.mtp else ''}; tp {args.tp} x dp {args.dp} x pp {args.pp} = "
          f"{args.tp * args.dp * args.pp} devices, routed experts {experts}")
    rows = "bf16" if args.kv_cache_dtype == "auto" else "FP8 K=V rows"
    print(f"batch {args.batch} x capacity {args.capacity} tokens, weights {args.precision}, caches {rows}, "
          f"prefill chunk {args.chunk}; sizes in powers of 1000 ({format_bytes(gpu_memory)} = {gpu_memory} bytes)")
    print(format_plan(p, gpu_memory))
    per_token = cache_bytes_per_token(cfg, args.kv_cache_dtype, args.mtp)
    print(f"caches per token of a sequence (all layers, before sharding): {per_token:,.1f} bytes")
    return 0


def main(argv=None) -> int:
    try:
        return run(argv)
    except (InputError, CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
