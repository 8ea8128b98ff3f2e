"""Which kernel family moves the Flash-width decode test's bf16 logits away from fp32 (H200 diagnosis).

The decode test's model, prompt and steps (tests/test_kernels_in_model.py); the XLA prefill once per dtype, then
3 decode steps per variant: "xla", "pallas", and "xla" plus one family's kernels. Errors against the fp32
weights' XLA logits: max, 99.99th / 99.9th percentile and RMS of |logit - fp32| / max |fp32 logit|."""
import contextlib, os, sys, time
from unittest import mock
sys.path.insert(0, "tests")
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from test_kernels_in_model import flash_width_slice, upcast
from dsv4_jax.cache import init_cache
from dsv4_jax.engine import split_weights
from dsv4_jax.model import run_chunk
import dsv4_jax.attention as attention, dsv4_jax.moe as moe, dsv4_jax.compressor as compressor
import kernels_pallas.hc_pre as hc_pre, kernels_pallas.indexer as pidx, kernels_pallas.topk as ptopk
from dsv4_jax.indexer import index_scores, select_topk

T0 = time.time()
def log(*a): print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)

def xla_attention(q, win_keys, win_mask, entries, entry_ids, sinks, scale):
    if entries is None:
        return attention.sink_attention(q, win_keys, win_mask, None, None, sinks, scale)
    picked, valid = attention.gather_entries(entries, entry_ids)
    return attention.sink_attention(q, win_keys, win_mask, picked, valid, sinks, scale)

orig_routed, orig_compress = moe.routed_experts, compressor.Compressor.compress
OFF = {  # patches that send one family back to its XLA function while kernels="pallas"
    "attention": lambda: mock.patch.object(attention, "_pallas_attention", xla_attention),
    "hc_pre": lambda: mock.patch.object(hc_pre, "supported", lambda n, d: False),
    "moe": lambda: mock.patch.object(moe, "routed_experts", lambda *a, **k: orig_routed(*a[:6], "xla")),
    "compressor": lambda: mock.patch.object(compressor.Compressor, "compress",
                                            lambda self, *a, **k: orig_compress(self, *a[:4], "xla", *a[5:], **k)),
    "indexer": lambda: contextlib.ExitStack(),  # filled below
}
@contextlib.contextmanager
def indexer_off():
    with mock.patch.object(pidx, "index_scores_decode",
                           lambda q, keys, w, n, interpret=False: index_scores(q[:, None], keys, w[:, None])[:, 0]), \
         mock.patch.object(ptopk, "topk_indices",
                           lambda s, n, k, interpret=False: select_topk(s[:, None] if s.ndim == 2 else s,
                                                                        n[:, None] if n.ndim == 1 else n, k)[:, 0]
                           if s.ndim == 2 else select_topk(s, n, k)):
        yield
OFF["indexer"] = indexer_off

def variant(only=None, off=None):
    """kernels='pallas' with families sent to XLA: all but ``only``, or just ``off``."""
    fams = [f for f in OFF if f != only] if only else ([off] if off else [])
    stack = contextlib.ExitStack()
    for f in fams:
        stack.enter_context(OFF[f]())
    return stack

if os.environ.get("DIAG_TINY"):  # a CPU check of this script (interpret mode)
    from conftest import tiny
    from dsv4_jax.config import HASH_MOE
    from dsv4_jax.random_weights import random_model
    model = random_model(tiny(mlp_layer_types=(HASH_MOE,) * 5), jnp.bfloat16)
    P, CAP = 29, 40
else:
    model, P, CAP = flash_width_slice(64), 2300, 2400
rng = np.random.RandomState(0)
prompt, steps = rng.randint(0, model.config.vocab_size, (4, P)), rng.randint(0, model.config.vocab_size, (4, 3))

def prefilled(m):
    graphdef, state_def, weights = split_weights(m)
    merge = lambda w: nnx.merge(graphdef, jax.tree.unflatten(state_def, w))
    pre = jax.jit(lambda w, c, ids, s, n: run_chunk(merge(w), c, ids, s, n, CAP, True, "xla")[1])
    B, P = prompt.shape
    cache = pre(weights, init_cache(m.config, B, CAP, m.dtype), jnp.asarray(prompt), jnp.zeros(B, jnp.int32),
                jnp.full(B, P, jnp.int32))
    return merge, weights, cache

def decode(merge, weights, cache, kernels, patches):
    with patches:
        step = jax.jit(lambda w, c, ids, s, n: run_chunk(merge(w), c, ids, s, n, CAP, True, kernels))
        B, P = prompt.shape
        out = []
        for t in range(steps.shape[1]):
            logits, cache = step(weights, cache, jnp.asarray(steps[:, t:t + 1]), jnp.full(B, P + t, jnp.int32),
                                 jnp.ones(B, jnp.int32))
            out.append(np.asarray(logits, np.float32))
    return np.stack(out, 1)

wide = upcast(model)
merge, weights, cache = prefilled(wide)
want = decode(merge, weights, cache, "xla", contextlib.ExitStack()); log("fp32 reference")
del wide, weights, cache
merge, weights, cache0 = prefilled(model); log("bf16 prefill")
scale = np.abs(want).max()
def report(name, got):
    e = np.abs(got - want).reshape(-1) / scale
    log(f"{name:22s} max {e.max():.4%}  p99.99 {np.quantile(e, 0.9999):.4%}  p99.9 {np.quantile(e, 0.999):.4%}  "
        f"rms {np.sqrt((e ** 2).mean()):.4%}  per step max {[f'{v:.4%}' for v in np.abs(got - want).max((0, 2)) / scale]}")
    return got
copy = lambda c: jax.tree.map(jnp.copy, c)
ref = report("xla", decode(merge, weights, copy(cache0), "xla", contextlib.ExitStack()))
got = report("pallas", decode(merge, weights, copy(cache0), "pallas", contextlib.ExitStack()))
log(f"pallas vs xla max {np.abs(got - ref).max() / np.abs(ref).max():.4%}")
for fam in OFF:
    report(f"only {fam}", decode(merge, weights, copy(cache0), "pallas", variant(only=fam)))
for fam in OFF:
    report(f"all but {fam}", decode(merge, weights, copy(cache0), "pallas", variant(off=fam)))
