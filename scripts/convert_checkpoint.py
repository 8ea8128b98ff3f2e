"""Convert a Hugging Face format (or DeepSeek-official) checkpoint to an orbax checkpoint.

    python scripts/convert_checkpoint.py SRC DST [--dtype bfloat16|float32] [--overwrite]

Loads SRC with ``from_pretrained`` (every name spelling it accepts; released FP8 / FP4 weights dequantised to
--dtype: an orbax checkpoint holds plain arrays), saves it with
``checkpoint_orbax.save`` and copies SRC's tokenizer.json, so ``python -m dsv4_jax.generate
--checkpoint DST`` works as it does with SRC. Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from dsv4_jax.weights import orbax as checkpoint_orbax
from dsv4_jax.weights.checkpoint import from_pretrained

EXIT_USAGE = 2
TOKENIZER_FILE = "tokenizer.json"


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints the usage too: keep errors to one line
        raise ValueError(message)


def _parse_args(argv):
    p = _OneLineParser(prog="scripts/convert_checkpoint.py", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="Hugging Face format directory (config.json + *.safetensors)")
    p.add_argument("dst", help="orbax checkpoint directory to write")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="model dtype to store")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at DST")
    return p.parse_args(argv)


def convert(src, dst, dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    """SRC (Hugging Face format) -> orbax checkpoint at DST; returns DST."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"destination {dst} is the source directory; choose another DST")
    model = from_pretrained(src, dtype, dequantize=True)
    dst = checkpoint_orbax.save(model, dst, overwrite=overwrite)
    if (src / TOKENIZER_FILE).exists():
        shutil.copy(src / TOKENIZER_FILE, dst / TOKENIZER_FILE)
    return dst


def main(argv=None) -> int:
    try:
        args = _parse_args(argv)
        dst = convert(args.src, args.dst, args.dtype, args.overwrite)
    except ValueError as e:  # CheckpointError and ConfigError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote orbax checkpoint {dst} ({args.dtype})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
