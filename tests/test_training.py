"""dsv4_jax.train.trainer: gradients (float64 finite differences, the PyTorch reference's autograd), a short
training run, and the auxiliary-loss-free router bias update."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import dsv4_jax
from conftest import tiny
from dsv4_jax.runtime import demo
from dsv4_jax.train import trainer as training
from dsv4_jax.weights.names import canonical_name
from dsv4_jax.model.config import CSA, HASH_MOE, HCA, MOE, SLIDING
from dsv4_jax.model.transformer import DeepseekV4ForCausalLM
from dsv4_jax.runtime.tokenizer import ByteTokenizer
from reference import build_reference, topk_boundary_gap

# Every attention type and both MoE kinds in three layers (compiling a train step is the slow part).
CFG = tiny(num_hidden_layers=3, layer_types=(SLIDING, CSA, HCA), mlp_layer_types=(HASH_MOE, MOE, MOE),
           hca_compress_rate=8)
PAD = 2  # the byte tokenizer's padding id


def named(state: nnx.State) -> dict[str, np.ndarray]:
    """Canonical name (params.param_table's spelling) -> array, for a state tree."""
    return {".".join(map(str, path)): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(state)}


def padded_batch(rng, batch: int, seq: int, real_lens) -> tuple[np.ndarray, np.ndarray]:
    """Random ids [B, S] right-padded after real_lens[b] tokens, and the mask [B, S] (1 = real)."""
    ids = rng.randint(3, CFG.vocab_size, (batch, seq))
    mask = (np.arange(seq)[None, :] < np.asarray(real_lens)[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, PAD), mask


def test_gradients_match_float64_finite_differences():
    """tests/x64_finite_differences.py: for every parameter tensor, the autodiff directional derivative
    along a random unit direction equals the float64 central difference (eps 1e-4) to 1e-5 relative,
    with no routing or indexer pick flipping between the two points. Measured: <= 1e-6 relative; the
    indexer's parameters (they only choose entries) have gradient and difference both exactly 0."""
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("x64_finite_differences.py"))],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loss_dtype"] == "float64" and result["loss"] == result["loss_probe"]
    checks = result["checks"]
    assert len(checks) > 80  # every parameter tensor of the three layers
    for c in checks:
        assert c["picks_equal"], c["name"]
        assert abs(c["fd"] - c["ad"]) <= 1e-5 * abs(c["ad"]) + 1e-12, c
    zero = [c["name"] for c in checks if c["ad"] == 0.0]
    assert zero and all(".indexer." in name for name in zero)


def test_gradients_match_pytorch_reference(tmp_path):
    """The train step's loss (fp32 compute) differentiated by JAX equals transformers' DeepseekV4ForCausalLM
    loss (labels, -100 at padding) differentiated by torch autograd, on the same weights, for every
    parameter: max |g - g_ref| / max |g_ref| < 5e-5 per tensor (measured: median 1.5e-6, worst 1.9e-5 on an
    mHC scale, three numbers each summed over every token and stream); parameters torch
    leaves without a gradient (the indexer's) get exactly 0. The routing the step hands to the bias
    update equals the reference routers' picks."""
    ref = build_reference(CFG, seed=11)
    ref.save_pretrained(tmp_path)
    rng = np.random.RandomState(4)
    for _ in range(20):  # inputs whose indexer top-k has no tie at the boundary
        ids, mask = padded_batch(rng, 2, 45, [45, 31])
        if topk_boundary_gap(ref, ids, CFG) > 1e-6:
            break
    picks = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o, n=n: picks.__setitem__(n, o[2]))
             for n, layer in enumerate(ref.model.layers)]
    labels = torch.as_tensor(np.where(mask == 1, ids, -100))
    with torch.enable_grad():
        ref_loss = ref(input_ids=torch.as_tensor(ids), labels=labels, use_cache=False).loss
        ref_loss.backward()
    for h in hooks:
        h.remove()

    model = dsv4_jax.from_pretrained(tmp_path, dtype="float32")
    graphdef, dtypes = training.compute_view(CFG, jnp.float32)
    _, params, buffers = training.split_model(model)

    def loss_fn(p):
        return training.loss_and_routing(p, buffers, jnp.asarray(ids), jnp.asarray(mask), graphdef=graphdef,
                                         dtypes=dtypes)

    (loss, routing), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    ref_loss = float(ref_loss.detach())
    assert abs(float(loss) - ref_loss) <= 1e-5 * ref_loss

    ours = named(grads)
    seen, errors = set(), {}
    for name, p in ref.named_parameters():
        key, slot = canonical_name(name)
        assert slot is None and key in ours, name
        seen.add(key)
        g = ours[key]
        if p.grad is None:
            assert not g.any(), f"{key}: the reference has no gradient, ours is nonzero"
            continue
        g_ref = p.grad.numpy()
        errors[key] = np.abs(g - g_ref).max() / np.abs(g_ref).max()
    worst = max(errors, key=errors.get)
    print(f"worst relative gradient error: {errors[worst]:.2e} ({worst}), median {np.median(list(errors.values())):.1e}")
    assert errors[worst] < 5e-5, worst
    assert seen == set(ours)

    for layer, idx in routing.items():
        ref_idx = picks[layer].numpy().reshape(*ids.shape, -1)
        real = mask == 1
        np.testing.assert_array_equal(np.sort(np.asarray(idx), -1)[real], np.sort(ref_idx, -1)[real])


def test_training_run_lowers_the_loss():
    """60 bf16 steps on a repeated sentence: the loss falls from ~ln(V) to below 10% of it; parameters stay
    fp32; hash tables do not move; routing biases move in whole steps of the bias rate."""
    tc = training.TrainConfig(steps=60, learning_rate=1e-2, warmup_steps=10, router_bias_rate=1e-3)
    model = DeepseekV4ForCausalLM(CFG, rngs=nnx.Rngs(0))
    state = training.init_state(model, training.make_optimizer(tc))
    hash_before = {n: v for n, v in named(state.buffers).items() if "tid2eid" in n}
    step = training.make_train_step(CFG, tc)
    corpus = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 40, np.uint8).astype(np.int32) + 3
    rng = np.random.RandomState(0)
    B, S = 8, 32
    mask = jnp.ones((B, S), jnp.int32)
    losses = []
    for _ in range(tc.steps):
        starts = rng.randint(0, len(corpus) - S, B)
        state, metrics = step(state, jnp.asarray(np.stack([corpus[s:s + S] for s in starts])), mask)
        losses.append(float(metrics["loss"]))
        assert np.asarray(metrics["expert_load"]).sum() == 2 * B * S * CFG.num_experts_per_tok
    print(f"loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}")
    assert abs(losses[0] - np.log(CFG.vocab_size)) < 0.5
    assert np.mean(losses[-5:]) < 0.1 * losses[0]
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state.params))
    buffers = named(state.buffers)
    for name, table in hash_before.items():
        np.testing.assert_array_equal(buffers[name], table)
    for layer in training.learned_moe_layers(CFG):
        bias = buffers[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
        units = bias / tc.router_bias_rate
        assert np.abs(bias).max() > 0 and np.abs(units - np.round(units)).max() < 1e-2


def imbalance(load: np.ndarray) -> float:
    return float(load.max() / load.mean())


def test_router_bias_update_balances_the_load():
    """Start with every learned router biased towards experts 0 and 1 (+0.3), so they take nearly all
    tokens; bias updates alone (no gradient step) on a fixed batch bring max/mean load from ~4 to < 1.6.
    The first update is exactly rate * sign(mean load - load) with the load counted over real tokens only."""
    rate = 0.01
    model = DeepseekV4ForCausalLM(CFG, rngs=nnx.Rngs(1))
    for layer in training.learned_moe_layers(CFG):
        model.model.layers[layer].mlp.gate.e_score_correction_bias.set_value(
            jnp.zeros(CFG.n_routed_experts).at[:2].set(0.3))
    graphdef, state = nnx.split(model)
    ids, mask = padded_batch(np.random.RandomState(2), 4, 40, [40, 40, 33, 17])
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    @jax.jit
    def bias_step(state):
        m = nnx.merge(graphdef, state)
        _, routing = training.forward_with_routing(m, ids)
        loads = training.router_loads(routing, mask, CFG.n_routed_experts)
        training.update_router_biases(m, loads, rate)
        return nnx.state(m), routing, loads

    def bias(state, layer):
        return np.asarray(state["model"]["layers"][layer]["mlp"]["gate"]["e_score_correction_bias"].get_value())

    history = []
    for it in range(60):
        new_state, routing, loads = bias_step(state)
        if it == 0:
            for layer, idx in routing.items():
                real = np.asarray(mask, bool)
                counted = np.bincount(np.asarray(idx)[real].ravel(), minlength=CFG.n_routed_experts)
                np.testing.assert_array_equal(np.asarray(loads[layer]), counted)
                assert counted.sum() == real.sum() * CFG.num_experts_per_tok
                np.testing.assert_allclose(bias(new_state, layer) - bias(state, layer),
                                           rate * np.sign(counted.mean() - counted), atol=1e-7)
        history.append(max(imbalance(np.asarray(load)) for load in loads.values()))
        state = new_state
    print("max/mean load:", [round(h, 2) for h in history[::10]], round(history[-1], 2))
    assert history[0] > 3.5
    assert max(history[-10:]) < 1.6


@pytest.mark.parametrize("steps,warmup", [(100, 10), (5, 10)])
def test_lr_schedule_warms_up_then_decays(steps, warmup):
    tc = training.TrainConfig(steps=steps, learning_rate=1e-3, warmup_steps=warmup, final_lr_fraction=0.1)
    lr = training.lr_schedule(tc)
    w = min(warmup, steps - 1)
    assert float(lr(0)) == 0.0
    assert float(lr(w)) == pytest.approx(1e-3)
    assert float(lr(steps)) == pytest.approx(1e-4)
    values = [float(lr(i)) for i in range(w, steps + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_demo_weight_export_is_a_hugging_face_checkpoint(tmp_path):
    """save_demo_weights writes config.json + one model.safetensors (matrices bf16, fp32 where the bf16
    model keeps fp32): transformers loads it, and its fp32 logits equal ours on the loaded weights
    (1e-5 relative); every tensor is the trained value rounded to its stored dtype."""
    import transformers

    model = DeepseekV4ForCausalLM(CFG, rngs=nnx.Rngs(5))
    demo.save_demo_weights(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", demo.WEIGHTS_FILE]
    loaded = dsv4_jax.from_pretrained(tmp_path, dtype="float32")
    stored = named(nnx.state(dsv4_jax.from_pretrained(tmp_path, dtype="bfloat16")))
    for name, value in named(nnx.state(loaded)).items():
        original = named(nnx.state(model))[name]
        np.testing.assert_array_equal(value, original.astype(stored[name].dtype).astype(value.dtype), err_msg=name)
    ref = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = np.random.RandomState(6).randint(3, CFG.vocab_size, (1, 24))
    with torch.no_grad():
        ref_logits = ref(input_ids=torch.as_tensor(ids), use_cache=False).logits.numpy()
    ours = np.asarray(loaded(ids))
    assert np.abs(ours - ref_logits).max() / np.abs(ref_logits).max() < 1e-5


@pytest.mark.skipif(not demo.has_trained_weights(), reason="no trained demo weights in dsv4_jax/runtime/demo_weights")
def test_shipped_demo_model_predicts_english():
    """The shipped demo weights are trained: on an English sentence that is not in the training text the
    next-byte loss is far below a random model's ln(259) = 5.56 nats (the shipped weights: 1.36)."""
    model, tok = demo.demo_model()
    ids = np.asarray([tok.encode("It was a fine morning, and the two sisters walked together towards the "
                                 "village, talking of nothing but the ball of the evening before.")])
    loss = float(training.next_token_loss(model(ids), jnp.asarray(ids), jnp.ones(ids.shape)))
    print(f"shipped demo model: {loss:.3f} nats/byte")
    assert loss < 1.6


def test_train_script_end_to_end(tmp_path, capsys):
    """scripts/train.py on a tiny config and a small text: log rows with falling loss, held-out loss, a
    plot, an orbax checkpoint that generate's loader reads back with the trained buffers, tokens/s."""
    from scripts import train

    cfg = dataclasses.replace(CFG, vocab_size=ByteTokenizer.vocab_size)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "run"
    rc = train.main(["--config", str(tmp_path / "config.json"), "--data", str(tmp_path / "text.txt"),
                     "--steps", "40", "--batch", "4", "--seq-len", "32", "--lr", "1e-2", "--warmup", "5",
                     "--log-every", "10", "--eval-every", "20", "--eval-batches", "2", "--ckpt-every", "20",
                     "--out", str(out), "--plot", str(tmp_path / "curve.png"), "--sample-tokens", "0"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "tok/s" in err
    log = json.loads((out / "log.json").read_text())
    rows = log["rows"]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert rows[-1]["train_loss"] < 0.3 * rows[0]["train_loss"]
    assert rows[-1]["eval_loss"] < 1.0 and log["summary"]["tokens_per_s"] > 0
    assert (tmp_path / "curve.png").stat().st_size > 0
    restored = dsv4_jax.from_pretrained(out / "checkpoint", dtype="float32")
    bias = named(nnx.state(restored))["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert np.abs(bias).max() > 0  # the trained routing biases were saved with the weights


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "--steps 0 must be a positive integer"),
    (["--seq-len", "1"], "--seq-len 1 must be at least 2"),
    (["--eval-fraction", "1"], "--eval-fraction 1.0 must be between 0 and 1"),
    (["--data", "/nonexistent.txt"], "--data /nonexistent.txt is not a file"),
    (["--config", "/nonexistent.json"], "config file not found"),
])
def test_train_script_bad_arguments(args, message, capsys, tmp_path):
    from scripts import train

    text = tmp_path / "text.txt"  # a real text, so that only the bad argument is wrong (CI has no data/)
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    assert train.main(["--data", str(text), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err


def test_mtp_training_trains_the_block_and_leaves_the_trunk(tmp_path, capsys):
    """scripts/train.py --mtp on a tiny trunk: the block's loss on the token after next falls (by half a nat in
    30 steps), its held-out acceptance is logged, and the written checkpoint (loaded with mtp=True) holds the
    trunk's tensors bit for bit and a router bias the balancing moved."""
    from safetensors import safe_open

    from dsv4_jax.runtime.demo import save_demo_weights
    from scripts import train

    cfg = dataclasses.replace(CFG, vocab_size=ByteTokenizer.vocab_size)
    trunk = save_demo_weights(DeepseekV4ForCausalLM(cfg, rngs=nnx.Rngs(3)), tmp_path / "trunk")
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "run"
    rc = train.main(["--mtp", "--trunk", str(trunk), "--config", str(trunk / "config.json"), "--data",
                     str(tmp_path / "text.txt"), "--steps", "30", "--batch", "4", "--seq-len", "32", "--lr", "1e-2",
                     "--warmup", "5", "--log-every", "10", "--eval-every", "30", "--eval-batches", "2", "--out",
                     str(out), "--plot", str(tmp_path / "curve.png"), "--sample-tokens", "0"])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads((out / "log.json").read_text())["rows"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5 and 0 <= rows[-1]["eval_acceptance"] <= 1

    def tensors(directory):
        with safe_open(directory / "model.safetensors", "flax") as f:
            return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}

    before, after = tensors(trunk), tensors(out / "checkpoint")
    assert all(after[k].tobytes() == v.tobytes() for k, v in before.items())
    assert any(k.startswith("model.mtp.0.") for k in set(after) - set(before))
    model = dsv4_jax.from_pretrained(out / "checkpoint", dtype="float32", mtp=True)
    assert np.abs(np.asarray(model.model.mtp[0].mlp.gate.e_score_correction_bias[...])).max() > 0
