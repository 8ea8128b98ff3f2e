"""The PyTorch reference's decode and prefill speed on the same GPU and shapes (a benchmark, not a test).

    python -m scripts.bench_torch_reference --batch 1 8 32 --context 4096 32768 --prefill 4096

transformers' ``DeepseekV4ForCausalLM`` (bf16, eager attention, eager experts) with random weights, built
for the same config as scripts/bench_generate.py (``make_config``). Prefill: one forward over the prompt
with a fresh cache. Decode: after that prefill, ``--decode-steps`` single-token forwards with the cache,
timed with CUDA events; median of 3 groups. Out-of-memory cases are recorded as errors. One JSON line
per case.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import transformers

from scripts.bench_generate import make_config
from scripts.roofline import torch_time


def build(cfg, device: str) -> transformers.DeepseekV4ForCausalLM:
    hf = transformers.DeepseekV4Config(**cfg.to_hf_dict())
    hf._attn_implementation = "eager"
    hf._experts_implementation = "eager"
    torch.set_default_dtype(torch.bfloat16)  # never materialise an fp32 copy of 80 GB of experts
    with torch.device(device):
        model = transformers.DeepseekV4ForCausalLM(hf)
    torch.set_default_dtype(torch.float32)
    return model.eval()


@torch.no_grad()
def decode_case(model, batch: int, context: int, steps: int) -> dict:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, context), device=model.device)
    out = model(input_ids=ids, use_cache=True)
    past = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)

    def run():
        nonlocal past, token
        for _ in range(steps):
            o = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = o.past_key_values, o.logits[:, -1:].argmax(-1)

    step_s = torch_time(run, reps=3) / steps
    return {"phase": "decode", "batch": batch, "context": context, "decode_ms_per_step": step_s * 1e3,
            "decode_tokens_per_s": batch / step_s}


@torch.no_grad()
def prefill_case(model, context: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=model.device)
    seconds = torch_time(lambda: model(input_ids=ids, use_cache=True), reps=1)
    return {"phase": "prefill", "batch": 1, "context": context, "prefill_tokens_per_s": context / seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="flash-slice")
    p.add_argument("--layers", default="SWA,SWA,CSA,HCA,CSA,HCA")
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--batch", type=int, nargs="*", default=[1])
    p.add_argument("--context", type=int, nargs="*", default=[4096])
    p.add_argument("--prefill", type=int, nargs="*", default=[])
    p.add_argument("--decode-steps", type=int, default=8)
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    model = build(make_config(args.model, args.layers, args.experts), "cuda" if on_gpu else "cpu")
    base = {"impl": f"transformers {transformers.__version__} eager bf16",
            "device": torch.cuda.get_device_name() if on_gpu else "cpu"}
    cases = [(prefill_case, (model, c)) for c in args.prefill]
    cases += [(decode_case, (model, b, c, args.decode_steps)) for b in args.batch for c in args.context]
    for fn, a in cases:
        try:
            row = fn(*a)
        except torch.OutOfMemoryError as e:
            row = {"phase": fn.__name__.split("_")[0], "args": [x for x in a[1:]],
                   "error": f"OutOfMemoryError: {str(e).splitlines()[0][:200]}"}
        if on_gpu:
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(json.dumps({**base, **row}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
