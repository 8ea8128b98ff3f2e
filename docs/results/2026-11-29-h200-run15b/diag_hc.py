# Run 15b's diagnostic, as it ran at 0903cd0 (it imports kernels_pallas/hc_post.py and tests/test_kernel_hc_post.py,
# both removed by the revert 38fb664): which side of the hc_post GPU test was off, the kernel or XLA's fp32 dot?
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from kernels_pallas import hc_post as hq
import sys; sys.path.insert(0, "tests")
from test_kernel_hc_post import inputs

def f64_partials(new, fn):
    x = np.asarray(new, np.float64).reshape(new.shape[0], -1)
    return x @ np.asarray(fn, np.float64).T, (x * x).sum(-1)

def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())

for T in (1, 16, 128, 1000):
    args = inputs(T, (T,), 4, 4096, jnp.bfloat16)
    kn, kraw, ksq = hq.hc_post(*args)
    rn, rraw, rsq = jax.jit(hq.reference)(*args)
    kn, rn = np.asarray(kn, np.float32), np.asarray(rn, np.float32)
    k64, ksq64 = f64_partials(kn, args[4]); r64, rsq64 = f64_partials(rn, args[4])
    print(f"T={T}: new streams differ at {(kn != rn).sum()} of {kn.size}; kernel raw vs f64(own new) "
          f"{rel(np.asarray(kraw).sum(0), k64):.2e}, sq {rel(np.asarray(ksq).sum(0), ksq64):.2e}; "
          f"XLA raw vs f64(own new) {rel(np.asarray(rraw)[0], r64):.2e}, sq {rel(np.asarray(rsq)[0], rsq64):.2e}; "
          f"f64 kernel-new vs ref-new {rel(k64, r64):.2e}", flush=True)
    flat = jnp.asarray(rn.reshape(T, -1)); fn = args[4]
    for name, prec in (("HIGHEST", jax.lax.Precision.HIGHEST), ("F32_F32_F32", jax.lax.DotAlgorithmPreset.F32_F32_F32),
                       ("DEFAULT", jax.lax.Precision.DEFAULT)):
        with jax.default_matmul_precision("default"):
            out = jax.jit(lambda a, b: jnp.dot(a, b.T, precision=prec))(flat, fn)
        print(f"   XLA dot [{T},16384]x[16384,24] {name}: {rel(out, r64):.2e}", flush=True)
