"""Flash-width slice in fp32 on the CPU: pallas (interpret) vs xla decode logits (logic check at real shapes)."""
import sys, time
sys.path.insert(0, "/work/main/tests"); sys.path.insert(0, "/work/main")
import jax, jax.numpy as jnp, numpy as np
from test_kernels_in_model import decode_logits
from dsv4_jax.config import CSA, HASH_MOE, HCA, SLIDING, DeepseekV4Config
from dsv4_jax.random_weights import random_model
E = int(sys.argv[1]) if len(sys.argv) > 1 else 8
P = int(sys.argv[2]) if len(sys.argv) > 2 else 2300
cfg = DeepseekV4Config.flash(num_hidden_layers=3, layer_types=(SLIDING, CSA, HCA), mlp_layer_types=(HASH_MOE,) * 3,
                             n_routed_experts=E)
model = random_model(cfg, jnp.float32)
rng = np.random.RandomState(0)
prompt, steps = rng.randint(0, cfg.vocab_size, (2, P)), rng.randint(0, cfg.vocab_size, (2, 5))
t = time.time()
ref = decode_logits(model, prompt, steps, P + 100, "xla"); print("xla", time.time() - t, flush=True)
got = decode_logits(model, prompt, steps, P + 100, "pallas"); print("pallas", time.time() - t, flush=True)
err = np.abs(got - ref).max(axis=-1) / np.abs(ref).max(axis=-1)
print("per row/step rel err", err)
