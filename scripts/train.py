"""Train a DeepSeek-V4 config on a text file with the byte-level tokenizer (the demo model's recipe).

    python -m scripts.prepare_demo_data                                   # writes data/austen.txt
    python -m scripts.train --steps 3000 --batch 64 --seq-len 512 --lr 3e-3 --export-demo
    JAX_PLATFORMS=cpu python -m scripts.train --steps 100 --batch 8 --seq-len 128   # a CPU smoke run
    python -m scripts.train --mtp --steps 1000 --batch 16 --seq-len 256 --export-demo  # the demo's MTP block

Batches are random crops of ``--seq-len`` tokens, each BOS + bytes (as the CLI tokenises a prompt), from
the first 1 - ``--eval-fraction`` of the file; the held-out loss is taken on fixed crops of the rest.
Training runs in ``--compute-dtype`` over fp32 master weights (dsv4_jax.train.trainer). Written to ``--out``:
log.csv (one row per ``--log-every`` steps), log.json (arguments, rows, summary) and checkpoint/ (an
orbax checkpoint of the fp32 model, every ``--ckpt-every`` steps and at the end; load it with
``python -m dsv4_jax.generate --checkpoint OUT/checkpoint``). The training curve goes to ``--plot``;
``--export-demo`` writes the trained weights into the package (dsv4_jax/runtime/demo_weights/) for the CLI's
default demo model. ``--mtp`` trains the multi-token-prediction block alone on the shipped demo weights, which
stay frozen (trainer.make_mtp_train_step; its loss predicts the token after next), reports its greedy
acceptance on the held-out text (teacher-forced, and as speculative decoding measures it) and writes
checkpoint/ as a Hugging Face format directory (load it with ``mtp=True``). Bad arguments: a one-line error
and exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

EXIT_USAGE = 2
LOG_FIELDS = ("step", "tokens", "elapsed_s", "train_loss", "eval_loss", "eval_acceptance", "grad_norm", "lr",
              "load_imbalance", "tokens_per_s")


class UsageError(ValueError):
    """A bad command-line argument; the message names it and what was expected."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m scripts.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/austen.txt"), help="UTF-8 text file")
    p.add_argument("--config", default="demo", help="'demo' (dsv4_jax.runtime.demo.demo_config) or a config.json path")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=200, help="linear warmup steps (then cosine decay)")
    p.add_argument("--final-lr-fraction", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--router-bias-rate", type=float, default=1e-3)
    p.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share at the end of the file")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--plot", type=Path, default=Path("docs/demo_training_curve.png"))
    p.add_argument("--export-demo", action="store_true", help="write the weights to dsv4_jax/runtime/demo_weights/")
    p.add_argument("--mtp", action="store_true", help="train the MTP block alone, on a frozen trained trunk (--trunk)")
    p.add_argument("--trunk", type=Path, help="with --mtp: the trunk, a Hugging Face format directory of --config's "
                   "model (default with --config demo: the shipped demo weights)")
    p.add_argument("--sample-tokens", type=int, default=300, help="length of the closing sample (0: none); with "
                   "--mtp, of each held-out prompt's greedy speculative decoding that measures the acceptance")
    return p.parse_args(argv)


def check_args(args) -> None:
    positive = {"--steps": args.steps, "--batch": args.batch, "--eval-every": args.eval_every,
                "--eval-batches": args.eval_batches, "--log-every": args.log_every, "--ckpt-every": args.ckpt_every}
    for name, value in positive.items():
        if value <= 0:
            raise UsageError(f"{name} {value} must be a positive integer")
    if args.seq_len < 2:
        raise UsageError(f"--seq-len {args.seq_len} must be at least 2 (a token and its successor)")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr {args.lr} must be a positive number")
    for name, value in {"--warmup": args.warmup, "--sample-tokens": args.sample_tokens,
                        "--weight-decay": args.weight_decay, "--router-bias-rate": args.router_bias_rate}.items():
        if not value >= 0:
            raise UsageError(f"{name} {value} must be >= 0")
    if not 0 <= args.final_lr_fraction <= 1:
        raise UsageError(f"--final-lr-fraction {args.final_lr_fraction} must be between 0 and 1")
    if not args.clip_norm > 0:
        raise UsageError(f"--clip-norm {args.clip_norm} must be positive")
    if not 0 < args.eval_fraction < 1:
        raise UsageError(f"--eval-fraction {args.eval_fraction} must be between 0 and 1")
    if not args.data.is_file():
        raise UsageError(f"--data {args.data} is not a file (make the demo text with python -m "
                         "scripts.prepare_demo_data)")
    if args.export_demo and args.config != "demo":
        raise UsageError("--export-demo needs --config demo: the package's demo model has demo_config()'s sizes")
    if args.trunk is not None and not args.mtp:
        raise UsageError("--trunk is the frozen trunk of --mtp training; add --mtp")
    if args.mtp and args.trunk is None and args.config != "demo":
        raise UsageError("--mtp needs --trunk DIR (the trained model whose MTP block to train) with a --config other "
                         "than demo")


def model_config(name: str):
    from dsv4_jax.weights.errors import CheckpointError
    from dsv4_jax.model.config import ConfigError, DeepseekV4Config
    from dsv4_jax.runtime.demo import demo_config
    from dsv4_jax.runtime.tokenizer import ByteTokenizer

    if name == "demo":
        return demo_config()
    try:
        cfg = DeepseekV4Config.from_json(name)
    except (ConfigError, CheckpointError) as e:
        raise UsageError(f"--config {name}: {e}") from None
    if cfg.vocab_size < ByteTokenizer.vocab_size:
        raise UsageError(f"--config {name} has vocab_size {cfg.vocab_size}; the byte tokenizer needs at least "
                         f"{ByteTokenizer.vocab_size}")
    return cfg


def split_corpus(tokens: np.ndarray, eval_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens [N] -> (train [N - M], held-out [M]), M = round(eval_fraction * N); each must fit a crop."""
    held = int(round(len(tokens) * eval_fraction))
    train, evaluation = tokens[: len(tokens) - held], tokens[len(tokens) - held:]
    body = seq_len - 1  # every crop is BOS + seq_len - 1 text tokens
    if min(len(train), len(evaluation)) <= body:
        raise UsageError(f"the text ({len(tokens)} bytes) is too short for --seq-len {seq_len} with --eval-fraction "
                         f"{eval_fraction}: each split needs more than {body} bytes")
    return train, evaluation


def crops(tokens: np.ndarray, starts: np.ndarray, seq_len: int, bos: int) -> np.ndarray:
    """[B] start offsets -> int32 [B, seq_len]: BOS then tokens[start : start + seq_len - 1]."""
    body = tokens[starts[:, None] + np.arange(seq_len - 1)[None, :]]
    return np.concatenate([np.full((len(starts), 1), bos, np.int32), body.astype(np.int32)], axis=1)


def random_starts(rng: np.random.Generator, n_tokens: int, batch: int, seq_len: int) -> np.ndarray:
    return rng.integers(0, n_tokens - (seq_len - 1) + 1, batch)


def even_starts(n_tokens: int, count: int, seq_len: int) -> np.ndarray:
    """``count`` crop starts spread evenly over the held-out text (the same crops at every evaluation)."""
    return np.linspace(0, n_tokens - (seq_len - 1), count).astype(np.int64)


def progress_line(step: int, total: int, width: int = 24) -> str:
    done = int(width * step / total)
    return f"[{'#' * done}{'.' * (width - done)}] {step}/{total}"


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def sample_text(model, tokenizer, prompt: str, n: int, seed: int) -> str:
    from dsv4_jax.runtime.engine import Engine
    from dsv4_jax.runtime.sampling import SamplingParams

    engine = Engine(model, capacity=len(tokenizer.encode(prompt)) + n, tokenizer=tokenizer)
    (result,) = engine.generate([prompt], max_new_tokens=n, sampling=SamplingParams(temperature=0.8, top_p=0.95),
                                seed=seed)
    return prompt + result.text


def mtp_training(cfg, tc, trunk_dir: Path | None, seed: int):
    """--mtp: (train state of the MTP block, step(state, ids, mask), eval(state, ids, mask), state -> model,
    save(model, directory)) on the trunk in ``trunk_dir`` (default: the shipped demo weights), frozen."""
    import jax.numpy as jnp
    from flax import nnx

    from dsv4_jax.model.mtp import DeepseekV4WithMTP
    from dsv4_jax.runtime import demo
    from dsv4_jax.train import trainer as training
    from dsv4_jax.weights.checkpoint import from_pretrained

    trunk_dir = trunk_dir or demo.DEMO_WEIGHTS
    trained = from_pretrained(trunk_dir, dtype="float32")
    if trained.config != cfg:
        raise UsageError(f"--trunk {trunk_dir} holds another config than --config's")
    model = DeepseekV4WithMTP(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    nnx.update(model, nnx.state(trained))  # every trunk parameter and buffer; the block stays as initialised
    state, trunk = training.init_mtp_state(model, training.make_optimizer(tc))
    step, evaluate = training.make_mtp_train_step(cfg, tc), training.make_mtp_eval(cfg, tc)
    return (state, lambda state, ids, mask: step(state, trunk, ids, mask),
            lambda state, ids, mask: evaluate(state, trunk, ids, mask),
            lambda state: training.mtp_state_model(cfg, state, trunk), demo.save_demo_weights)


def speculative_acceptance(model, tokens: np.ndarray, tok, new: int, prompts: int = 8, prompt_len: int = 32) -> dict:
    """Greedy speculative decoding from ``prompts`` held-out crops of ``prompt_len`` bytes (BOS first), ``new``
    tokens each: {draft tokens N: (acceptance rate, tokens per step)} for N = 1 and 3."""
    from dsv4_jax.runtime.engine import Engine

    starts = even_starts(len(tokens), prompts, prompt_len)
    batch = [list(row) for row in crops(tokens, starts, prompt_len, tok.bos_id)]
    out = {}
    for n in (1, 3):
        engine = Engine(model, capacity=prompt_len + new, speculative="mtp", draft_tokens=n)
        engine.generate(batch, max_new_tokens=new, eos_token_ids=[])
        out[n] = (round(engine.stats.acceptance_rate, 4), round(engine.stats.tokens_per_step, 3))
    return out


def train(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsv4_jax.weights import orbax as checkpoint_orbax
    from dsv4_jax.runtime import demo
    from dsv4_jax.train import trainer as training
    from dsv4_jax.model.transformer import DeepseekV4ForCausalLM
    from dsv4_jax.runtime.tokenizer import ByteTokenizer

    cfg = model_config(args.config)
    tok = ByteTokenizer()
    try:
        text = args.data.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--data {args.data} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    tokens = np.asarray(tok.encode(text)[1:], np.int32)  # the whole file as bytes, without the leading BOS
    train_tokens, eval_tokens = split_corpus(tokens, args.eval_fraction, args.seq_len)
    eval_ids = crops(eval_tokens, even_starts(len(eval_tokens), args.eval_batches * args.batch, args.seq_len),
                     args.seq_len, tok.bos_id)
    tc = training.TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup,
                              final_lr_fraction=args.final_lr_fraction, weight_decay=args.weight_decay,
                              clip_norm=args.clip_norm, router_bias_rate=args.router_bias_rate,
                              compute_dtype=args.compute_dtype)
    if args.mtp:
        state, step_fn, eval_fn, final_model, save = mtp_training(cfg, tc, args.trunk, args.seed)
    else:
        model = DeepseekV4ForCausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
        state = training.init_state(model, training.make_optimizer(tc))
        step_fn, eval_fn = training.make_train_step(cfg, tc), training.make_eval_loss(cfg, tc)
        final_model = lambda state: training.state_model(cfg, state)  # noqa: E731
        save = lambda model, path: checkpoint_orbax.save(model, path, overwrite=True)  # noqa: E731
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state.params))  # the trained ones
    mask = jnp.ones((args.batch, args.seq_len), jnp.int32)
    print(f"{n_params:,} parameters; {len(train_tokens):,} training / {len(eval_tokens):,} held-out bytes; "
          f"{args.steps} steps x {args.batch} x {args.seq_len} tokens on {jax.devices()[0].platform}",
          file=sys.stderr)

    def evaluate() -> list[float]:
        """[held-out loss], or with --mtp [the block's loss, its teacher-forced greedy acceptance]."""
        values = [eval_fn(state, jnp.asarray(eval_ids[i:i + args.batch]), mask)
                  for i in range(0, len(eval_ids), args.batch)]
        return np.atleast_2d(np.asarray(jax.device_get(values)).T).mean(axis=1).tolist()

    def save_checkpoint():
        save(final_model(state), args.out / "checkpoint")

    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    tokens_per_step = args.batch * args.seq_len
    rows, window, start, timed_from = [], [], time.perf_counter(), None
    paused = 0.0  # seconds spent evaluating and checkpointing, left out of tokens/s
    interactive = sys.stderr.isatty()
    for step in range(1, args.steps + 1):
        ids = crops(train_tokens, random_starts(rng, len(train_tokens), args.batch, args.seq_len), args.seq_len,
                    tok.bos_id)
        state, metrics = step_fn(state, jnp.asarray(ids), mask)
        window.append(metrics)
        if timed_from is None:  # the first step compiles: time the rest
            jax.block_until_ready(metrics["loss"])
            timed_from = time.perf_counter()
        if step % args.log_every and step % args.eval_every and step != args.steps:
            continue
        got = jax.device_get(window)
        window = []
        now = time.perf_counter()
        load = np.stack([m["expert_load"] for m in got])  # [steps, L_moe, E]
        row = dict(step=step, tokens=step * tokens_per_step, elapsed_s=round(now - start, 2),
                   train_loss=float(np.mean([m["loss"] for m in got])), eval_loss="", eval_acceptance="",
                   grad_norm=float(np.mean([m["grad_norm"] for m in got])), lr=float(got[-1]["lr"]),
                   load_imbalance=float((load.max(-1) / load.mean(-1)).mean()) if load.size else "",
                   tokens_per_s=round((step - 1) * tokens_per_step / max(now - timed_from - paused, 1e-9)))
        if step % args.eval_every == 0 or step == args.steps:
            row["eval_loss"], *acceptance = evaluate()
            row["eval_acceptance"] = acceptance[0] if acceptance else ""
            paused += time.perf_counter() - now
        rows.append(row)
        write_csv(args.out / "log.csv", rows)
        line = (f"{progress_line(step, args.steps)} loss {row['train_loss']:.3f}"
                + (f" eval {row['eval_loss']:.3f}" if row["eval_loss"] != "" else "")
                + f" | {row['tokens_per_s']:,.0f} tok/s | {row['elapsed_s']:.0f}s")
        print(("\r" + line) if interactive else line, end="" if interactive else "\n", file=sys.stderr, flush=True)
        if step % args.ckpt_every == 0 and step != args.steps:
            now = time.perf_counter()
            save_checkpoint()
            paused += time.perf_counter() - now
    if interactive:
        print(file=sys.stderr)
    save_checkpoint()
    final = final_model(state)
    summary = dict(parameters=n_params, steps=args.steps, tokens=args.steps * tokens_per_step,
                   seconds=round(time.perf_counter() - start, 1), tokens_per_s=rows[-1]["tokens_per_s"],
                   seconds_per_step=round(tokens_per_step / max(rows[-1]["tokens_per_s"], 1), 4),
                   final_train_loss=rows[-1]["train_loss"], final_eval_loss=rows[-1]["eval_loss"],
                   final_eval_bits_per_byte=rows[-1]["eval_loss"] / math.log(2), device=str(jax.devices()[0]))
    if args.mtp:
        summary["final_eval_acceptance"] = rows[-1]["eval_acceptance"]
        if args.sample_tokens:
            summary["speculative"] = speculative_acceptance(final, eval_tokens, tok, new=args.sample_tokens)
    run_args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "log.json").write_text(json.dumps(dict(args=run_args, train_config=dataclasses.asdict(tc),
                                                       summary=summary, rows=rows), indent=1) + "\n")
    if args.export_demo:
        print(f"exported the demo weights to {demo.save_demo_weights(final)}", file=sys.stderr)
    try:
        from scripts.plot_training_curve import plot

        title = f"{n_params / 1e6:.1f}M-parameter model on {args.data.name}: {args.steps} steps, {summary['device']}"
        print(f"training curve: {plot(rows, args.plot, title)}", file=sys.stderr)
    except ImportError:
        print(f"matplotlib is not installed: plot later with python -m scripts.plot_training_curve "
              f"{args.out / 'log.csv'} {args.plot}", file=sys.stderr)
    if args.sample_tokens and not args.mtp:  # the trunk of --mtp, and so its text, is as it was
        print(sample_text(final, tok, "Once upon a time", args.sample_tokens, args.seed))
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        summary = train(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
