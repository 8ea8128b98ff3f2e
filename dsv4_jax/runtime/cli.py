"""Command line generation: ``python -m dsv4_jax.generate [--checkpoint DIR] --prompt TEXT``.

Streams the new text to stdout as it is generated; on stderr reports load and compile time, the time to the
first token and the decode speed. Bad input is one line on stderr and exit code 2, never a traceback.
Imports only what generating needs (no torch, transformers or orbax on the demo path).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time

from ..weights.checkpoint import CheckpointError
from ..model.config import ConfigError
from ..model.transformer import InputError, check_capacity, check_vocab

EXIT_USAGE = 2
DESCRIPTION = ("Generate text with a DeepSeek-V4 model: a Hugging Face format or orbax checkpoint directory, a "
               "Hugging Face hub id, or (with no --checkpoint) the built-in demo model. Compiled steps are kept in "
               "a cache on disk, so a second run does not compile again.")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" where there is a default to show and the help does not already say it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse's own errors as ours: one line, no usage block (``main`` prints it, exit 2)."""

    def error(self, message):
        raise InputError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m dsv4_jax.generate", description=DESCRIPTION,
                formatter_class=_HelpFormatter)
    p.add_argument("prompt_text", nargs="?", help="prompt text (same as --prompt)")
    p.add_argument("--checkpoint", help="Hugging Face format or orbax (scripts/convert_checkpoint.py) directory, "
                   "or a Hugging Face hub id (ORG/NAME, through huggingface_hub and its cache); "
                   "default: the built-in demo model")
    p.add_argument("--prompt", help="prompt text, tokenised with the checkpoint's tokenizer.json")
    p.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 0,17,42 (instead of text)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (0: none)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default without --temperature)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature, > 0 samples; unset or 0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample within the smallest set of tokens holding this probability mass (1.0: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampler")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="activation dtype, and that of the weights not stored quantised; auto: the checkpoint's own "
                   "(dtype / torch_dtype in its config.json; bfloat16 where it states none), float32 for the demo "
                   "model")
    p.add_argument("--dequantize", action="store_true",
                   help="dequantise the released FP8 / FP4 weights to --dtype at load (default: keep them so on the "
                   "device, about 3.6x less memory for the released Flash)")
    p.add_argument("--capacity", type=int, default=None, help="cache capacity in tokens (default: prompt + new)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                   help="the caches' K=V rows: auto (the model dtype) or fp8 (448 e4m3 + 64 bf16 rope values + "
                   "ue8m0 scales per row, 583 bytes against 1,024 in bf16)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.add_argument("--kernels", choices=("xla", "pallas"), default=None,
                   help="attention/indexer implementation (default: pallas on a GPU, xla elsewhere)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages, one device each (on CPU set "
                   "XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    p.add_argument("--pp-boundaries", help="first layer of stages 1..pp-1, comma-separated (default: even split)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel: heads, MLP widths and vocabulary split over "
                   "this many devices")
    p.add_argument("--dp", type=int, default=1, help="data parallel: batch rows split over this many devices "
                   "(each with --tp devices)")
    p.add_argument("--ep", action="store_true", help="expert parallel: the routed experts spread whole over the "
                   "dp x tp devices (else split along their width over tp)")
    p.add_argument("--speculative", choices=("mtp",), default=None,
                   help="speculative decoding: the model's MTP block drafts --draft-tokens tokens a step, the model "
                   "verifies them in one step (greedy output unchanged; sampled output distributed as without)")
    p.add_argument("--draft-tokens", type=int, default=None,
                   help="tokens the MTP block drafts per step with --speculative (default: 3)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="compile every step again instead of using the compilation cache on disk "
                   "($XDG_CACHE_HOME/dsv4_jax or ~/.cache/dsv4_jax; also DSV4_JAX_COMPILE_CACHE=0)")
    return p


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
    try:
        texts[0].encode("utf-8")
    except UnicodeEncodeError as e:  # the shell passed bytes that are not UTF-8 (Python keeps them as surrogates)
        raise InputError(f"the prompt is not valid UTF-8 text (at character {e.start}); "
                         "expected UTF-8, or --prompt-ids") from None
    if tokenizer is None:
        raise InputError("this checkpoint has no tokenizer.json; pass --prompt-ids instead of text")
    return tokenizer.encode(texts[0])


_SAMPLING_FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p"}


def _sampling(args):
    """SamplingParams of the flags; its errors name the flags."""
    from .sampling import SamplingParams

    try:
        return SamplingParams(temperature=0.0 if args.greedy or args.temperature is None else args.temperature,
                              top_k=args.top_k, top_p=args.top_p)
    except ValueError as e:
        raise InputError(re.sub(r"^\w+", lambda m: _SAMPLING_FLAGS.get(m.group(), m.group()), str(e))) from None


def run(argv=None) -> int:
    t_start = time.time()
    args = build_parser().parse_args(argv)
    if args.no_compile_cache:
        os.environ["DSV4_JAX_COMPILE_CACHE"] = "0"  # read by Engine (and enable_compile_cache below)
    from . import demo
    from .compile_cache import compile_seconds, enable_compile_cache, watch_compilation
    from ..weights.checkpoint import checkpoint_config, from_pretrained
    from ..weights.hub import resolve_checkpoint
    from .engine import Engine
    from .tokenizer import has_tokenizer, load_tokenizer

    enable_compile_cache()  # before the first compilation: loading compiles too
    watch_compilation()
    if args.max_new_tokens < 0:  # before any file is read
        check_capacity(0, args.max_new_tokens, 0, "--max-new-tokens")
    sampling = _sampling(args)
    # Everything about the request is checked against the config before any weights are loaded.
    if args.checkpoint is None:
        cfg, tokenizer = demo.demo_config(), demo.ByteTokenizer()
    else:
        path = resolve_checkpoint(args.checkpoint)
        cfg = checkpoint_config(path)
        tokenizer = load_tokenizer(path) if has_tokenizer(path) else None
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
    sharded = args.pp != 1 or boundaries is not None or args.tp != 1 or args.dp != 1 or args.ep
    if args.draft_tokens is not None and args.speculative is None:
        raise InputError("--draft-tokens is the draft length of --speculative mtp; add --speculative mtp")
    draft_tokens = 3 if args.draft_tokens is None else args.draft_tokens
    if args.speculative is not None:
        from .speculative import check_speculative
        # (whether the weights hold the block: checked as they load)
        check_speculative(cfg, args.speculative, draft_tokens, names={"speculative": "--speculative",
                                                                      "draft_tokens": "--draft-tokens"})
    if sharded:
        from .mesh import check_layout
        from .pipeline import stage_starts
        stage_starts(cfg.num_hidden_layers, args.pp, boundaries, names=("--pp", "--pp-boundaries"))
        check_layout(cfg, args.tp, args.dp, args.pp, args.ep, names={k: f"--{k}" for k in ("tp", "dp", "pp", "ep")})
    if args.max_new_tokens == 0:  # nothing to generate: no weights loaded, no prefill run
        if args.json:
            print(json.dumps({"tokens": [], "finish_reason": "length", **({"text": ""} if tokenizer else {})}))
        print("dsv4_jax: --max-new-tokens 0: nothing generated", file=sys.stderr)
        return 0

    t_load = time.time()
    mesh = None
    if sharded:
        from .mesh import make_mesh
        mesh = make_mesh(tp=args.tp, dp=args.dp, pp=args.pp, ep=args.ep)
    if args.checkpoint is None:
        if demo.has_trained_weights():
            print("dsv4_jax: no --checkpoint given; running the built-in demo model (a tiny byte-level model "
                  "trained on Jane Austen's novels)", file=sys.stderr)
        else:
            print("dsv4_jax: no --checkpoint given; running the built-in demo model with fixed-seed RANDOM "
                  "weights (no trained demo checkpoint exists yet), so its text is noise", file=sys.stderr)
        model, _ = demo.demo_model("float32" if args.dtype == "auto" else args.dtype, mtp=args.speculative is not None)
    else:
        # Without pipeline stages each tensor goes straight to its shards; the stages restack the layers.
        model = from_pretrained(path, dtype=args.dtype, dequantize=args.dequantize,
                                mesh=mesh if mesh is not None and mesh.pp == 1 else None,
                                mtp=args.speculative is not None)
    engine = Engine(model, capacity=capacity, tokenizer=tokenizer, kernels=args.kernels, mesh=mesh,
                    pp_boundaries=boundaries if args.pp > 1 else None, kv_cache_dtype=args.kv_cache_dtype,
                    speculative=args.speculative, draft_tokens=draft_tokens)
    t_gen = time.time()

    new: list[int] = []
    printed = ""
    t_first = None
    for _, tok in engine.stream([ids], args.max_new_tokens, sampling, seed=args.seed):
        t_first = t_first or time.time()
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
    sys.stdout.flush()
    t_end = time.time()
    print(stats_line(load=t_gen - t_load - compile_seconds(t_load, t_gen), compile=compile_seconds(t_start, t_end),
                     first_token=t_first - t_gen, prompt_tokens=len(ids), generated=len(new),
                     decode=t_end - t_first - compile_seconds(t_first, t_end),
                     speculative=engine.stats if args.speculative else None), file=sys.stderr)
    if args.json:
        out = {"tokens": new, "finish_reason": engine.finish_reasons[0]}
        if text is not None:
            out["text"] = text
        print(json.dumps(out))
    return 0


def stats_line(load: float, compile: float, first_token: float, prompt_tokens: int, generated: int,
               decode: float, speculative=None) -> str:
    """The stderr summary. Seconds: ``load`` the weights (without compiling), ``compile`` (tracing, compiling
    or loading from the cache, anywhere in the run), ``first_token`` from the start of generation (prefill and
    its compilation included), ``decode`` from the first token to the last, without compilation: the tokens
    after the first at that rate. ``speculative``: the engine's GenerationStats of a speculative run (its drafts'
    acceptance rate and the tokens per step)."""
    rate = f"{(generated - 1) / decode:.1f} tok/s" if generated > 1 and decode > 0 else "n/a"
    line = (f"load: {load:.2f} s | compile: {compile:.2f} s | prefill: {prompt_tokens} tokens, first token after "
            f"{first_token:.2f} s | decode: {generated} tokens, {rate}")
    if speculative is not None:
        line += (f" | speculative: {speculative.accepted_tokens}/{speculative.drafted_tokens} drafts accepted "
                 f"({speculative.acceptance_rate:.1%}), {speculative.tokens_per_step:.2f} tokens/step")
    return line


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

