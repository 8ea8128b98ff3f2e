"""Float64 gradient check of dsv4_jax.train.trainer's loss, run by tests/test_training.py in a subprocess.

The model pins fp32 in many places (``astype(jnp.float32)``, ``preferred_element_type=jnp.float32``,
fp32 norm / mHC weights), which would cap a finite-difference check at fp32 round-off. So this process
enables x64 and rebinds ``jax.numpy.float32`` to float64 *before* dsv4_jax is imported: every one of
those sites then computes in float64 and the code under test is otherwise unchanged (RoPE's numpy
frequency constants stay fp32-rounded, which is the same constant at every evaluation).

For every parameter tensor: a random unit direction v, the autodiff directional derivative <grad, v>
and the central difference (L(p + eps v) - L(p - eps v)) / 2 eps. Routing and indexer top-k picks are
recorded at both points: a difference is only a derivative where no discrete choice flipped.
Prints one JSON object: {"checks": [{"name", "ad", "fd", "picks_equal"}], "loss", "loss_probe"}.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)
jnp.float32 = jnp.float64

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny  # noqa: E402
from dsv4_jax.train import trainer as training  # noqa: E402
from dsv4_jax.model.config import CSA, HASH_MOE, HCA, MOE, SLIDING  # noqa: E402
from dsv4_jax.model.transformer import DeepseekV4ForCausalLM, stateless_forward  # noqa: E402

EPS = 1e-4
# Window 8, CSA m=4 with top-k 3 of up to 7 entries, HCA m=8; learned top-2 of 4 experts; one padded row.
CFG = tiny(num_hidden_layers=3, layer_types=(SLIDING, CSA, HCA), mlp_layer_types=(HASH_MOE, MOE, MOE),
           hca_compress_rate=8, index_topk=3, n_routed_experts=4, num_experts_per_tok=2)
B, S, PAD_FROM = 2, 29, 21


def main() -> None:
    model = DeepseekV4ForCausalLM(CFG, dtype=jnp.float64, rngs=nnx.Rngs(3))
    graphdef, dtypes = training.compute_view(CFG, jnp.float64)
    _, params, buffers = training.split_model(model)
    rng = np.random.RandomState(0)
    ids = rng.randint(3, CFG.vocab_size, (B, S))
    mask = np.ones((B, S), np.int64)
    mask[1, PAD_FROM:] = 0
    ids[1, PAD_FROM:] = 2
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    def loss_and_routing(p):
        return training.loss_and_routing(p, buffers, ids, mask, graphdef=graphdef, dtypes=dtypes)

    grads, _ = jax.jit(jax.grad(loss_and_routing, has_aux=True))(params)

    @jax.jit
    def probe(p):
        """(loss, every discrete pick: router experts and indexer top-k) at parameters p."""
        m = nnx.merge(graphdef, p, buffers)
        capture = nnx.capture(stateless_forward, nnx.Intermediate, method_outputs=nnx.Intermediate)
        logits, captured = capture(m, ids)
        picks = []
        for i in range(CFG.num_hidden_layers):
            layer = captured["model"]["layers"][i]
            picks.append(layer["mlp"]["gate"]["__call__"].get_value()[0][1])
            if "compressor" in layer["self_attn"] and "indexer" in layer["self_attn"]["compressor"]:
                picks.append(layer["self_attn"]["compressor"]["indexer"]["__call__"].get_value()[0][0])
        return training.next_token_loss(logits, ids, mask), picks

    def with_value(path, value):
        flat = [(p, v.replace(value) if p == path else v) for p, v in nnx.to_flat_state(params)]
        return nnx.from_flat_state(flat)

    grad_of = dict(nnx.to_flat_state(grads))
    checks = []
    for path, var in nnx.to_flat_state(params):
        x = np.asarray(var.get_value())
        v = rng.randn(*x.shape)
        v /= np.linalg.norm(v)
        up, up_picks = probe(with_value(path, x + EPS * v))
        down, down_picks = probe(with_value(path, x - EPS * v))
        equal = all(np.array_equal(a, b) for a, b in zip(up_picks, down_picks))
        checks.append(dict(name=".".join(map(str, path)), ad=float(np.sum(np.asarray(grad_of[path].get_value()) * v)),
                           fd=float((up - down) / (2 * EPS)), picks_equal=bool(equal)))
    loss, _ = jax.jit(loss_and_routing)(params)
    print(json.dumps(dict(checks=checks, loss=float(loss), loss_probe=float(probe(params)[0]),
                          loss_dtype=str(loss.dtype))))


if __name__ == "__main__":
    main()
