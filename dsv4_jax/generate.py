"""``python -m dsv4_jax.generate``: the command line (dsv4_jax/runtime/cli.py)."""

from .runtime.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
