"""Command line generation: ``python -m dsv4_jax.generate [--checkpoint DIR] --prompt TEXT``.

Streams the new text to stdout as it is generated, reports prefill and decode tokens/s on stderr.
Bad input is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..weights.checkpoint import CheckpointError
from ..model.config import ConfigError
from ..model.transformer import InputError, check_capacity, check_vocab

EXIT_USAGE = 2


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dsv4_jax.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("prompt_text", nargs="?", help="prompt text (same as --prompt)")
    p.add_argument("--checkpoint", help="Hugging Face format or orbax (scripts/convert_checkpoint.py) "
                   "directory; default: the built-in demo model")
    p.add_argument("--prompt", help="prompt text, tokenised with the checkpoint's tokenizer.json")
    p.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 0,17,42")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default without --temperature)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="parameter dtype (default bfloat16 for checkpoints, float32 for the demo)")
    p.add_argument("--capacity", type=int, default=None, help="cache capacity in tokens (default: prompt + new)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.add_argument("--kernels", choices=("xla", "pallas"), default=None,
                   help="attention/indexer implementation (default: the engine's, see docs/performance.md)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages, one device each (on CPU set "
                   "XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    p.add_argument("--pp-boundaries", help="first layer of stages 1..pp-1, comma-separated (default: even split)")
    return p.parse_args(argv)


def _prompt_ids(args, tokenizer) -> list[int]:
    texts = [t for t in (args.prompt, args.prompt_text) if t is not None]
    if args.prompt_ids is not None and texts:
        raise InputError("give either --prompt-ids or a text prompt, not both")
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise InputError(f"--prompt-ids {args.prompt_ids!r} must be comma-separated integers") from None
        if not ids:
            raise InputError("--prompt-ids is empty; expected at least one token id")
        return ids
    if not texts:
        raise InputError("no prompt: pass --prompt TEXT or --prompt-ids 1,2,3")
    if len(texts) > 1:
        raise InputError("give the prompt once, either positionally or with --prompt")
    if not texts[0]:
        raise InputError("empty prompt; expected some text")
    if tokenizer is None:
        raise InputError("this checkpoint has no tokenizer.json; pass --prompt-ids instead of text")
    return tokenizer.encode(texts[0])


def run(argv=None) -> int:
    args = _parse_args(argv)
    from . import demo
    from ..weights.checkpoint import checkpoint_config, from_pretrained
    from .engine import Engine
    from .sampling import SamplingParams
    from .tokenizer import load_tokenizer

    if args.max_new_tokens < 0:  # before any file is read
        check_capacity(0, args.max_new_tokens, 0, "--max-new-tokens")
    # Everything about the request is checked against the config before any weights are loaded.
    if args.checkpoint is None:
        cfg, tokenizer = demo.demo_config(), demo.ByteTokenizer()
    else:
        cfg, tokenizer = checkpoint_config(args.checkpoint), load_tokenizer(args.checkpoint)
    ids = _prompt_ids(args, tokenizer)
    check_vocab(ids, cfg.vocab_size)
    capacity = args.capacity or len(ids) + max(args.max_new_tokens, 1)
    check_capacity(len(ids), args.max_new_tokens, capacity, "--max-new-tokens")
    boundaries = None
    if args.pp_boundaries is not None:
        try:
            boundaries = [int(t) for t in args.pp_boundaries.split(",") if t.strip()]
        except ValueError:
            raise InputError(f"--pp-boundaries {args.pp_boundaries!r} must be comma-separated integers") from None
    if args.pp != 1 or boundaries is not None:
        from .pipeline import check_pipeline
        check_pipeline(cfg.num_hidden_layers, args.pp, boundaries)
    sampling = SamplingParams(temperature=0.0 if args.greedy or args.temperature is None else args.temperature,
                              top_k=args.top_k, top_p=args.top_p)

    if args.checkpoint is None:
        if demo.has_trained_weights():
            print("dsv4_jax: no --checkpoint given; running the built-in demo model (a tiny byte-level model "
                  "trained on Jane Austen's novels)", file=sys.stderr)
        else:
            print("dsv4_jax: no --checkpoint given; running the built-in demo model with fixed-seed RANDOM "
                  "weights (no trained demo checkpoint exists yet), so its text is noise", file=sys.stderr)
        model, _ = demo.demo_model(args.dtype or "float32")
    else:
        model = from_pretrained(args.checkpoint, dtype=args.dtype or "bfloat16")
    if args.pp != 1 or boundaries is not None:
        from .pipeline import PipelineEngine
        engine = PipelineEngine(model, pp=args.pp, boundaries=boundaries, capacity=capacity, tokenizer=tokenizer,
                                kernels=args.kernels)
    else:
        engine = Engine(model, capacity=capacity, tokenizer=tokenizer, kernels=args.kernels)

    new: list[int] = []
    printed = ""
    for _, tok in engine.stream([ids], args.max_new_tokens, sampling, seed=args.seed):
        new.append(tok)
        if tokenizer is not None:
            text = tokenizer.decode(new)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
    text = tokenizer.decode(new) if tokenizer is not None else None
    if text is not None and text != printed:
        sys.stdout.write(text[len(printed):])
    sys.stdout.write("\n")
    s = engine.stats
    print(f"prefill: {s.prompt_tokens} tokens, {s.prefill_tokens_per_s:.1f} tok/s | "
          f"decode: {s.generated_tokens} tokens, {s.decode_tokens_per_s:.1f} tok/s (first calls include compilation)", file=sys.stderr)
    if args.json:
        out = {"tokens": new, "finish_reason": engine.finish_reasons[0]}
        if text is not None:
            out["text"] = text
        print(json.dumps(out))
    return 0


class _PluginErrorInOneLine(logging.Filter):
    """JAX logs a device plugin that fails to start (the CUDA plugin of the ``aot`` extra on a host without a GPU)
    with its traceback, then runs on the devices it has: say it in one line, with the plugin's error."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.getMessage().startswith("Jax plugin configuration error"):
            record.msg = f"{record.getMessage()}: {record.exc_info[1]} (JAX goes on without it)"
            record.args = None
            record.exc_info = record.exc_text = None
        return True


_PLUGIN_ERROR_IN_ONE_LINE = _PluginErrorInOneLine()  # one instance: addFilter skips it when main runs again


def main(argv=None) -> int:
    logging.getLogger("jax._src.xla_bridge").addFilter(_PLUGIN_ERROR_IN_ONE_LINE)
    try:
        return run(argv)
    except (InputError, CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE

