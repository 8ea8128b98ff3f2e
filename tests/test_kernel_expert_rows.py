"""Each row against its own expert matrix (kernels_pallas/expert_rows.py) against the gathered einsum, and the
MoE layer's one-token path that uses it against the XLA path.

CPU: Pallas interpret mode into poisoned outputs on fresh random inputs (6 distinct experts as in a decode
step, repeated experts, a single row, rows past one 16-row tile; one x row for every output row), bad
shapes, a CUDA lowering check at the Flash shapes. FP4 weights (every code, scales over six powers of two, ue8m0
and fp32) the same way, and their kernel compiled for sm_90. GPU (skipped elsewhere): the compiled kernel at the
Flash sizes, bf16 and FP4.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax import ops
from kernels_pallas import expert_rows as er
from kernels_pallas.testing import compile_for_h100, lower_for_h100
from scripts import kernel_cases
from test_kernel_grouped_matmul import assert_fp4_ptx_equals_bit_arithmetic, write_counts

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (runs the compiled kernel)")
SMALL = er.TuningConfig(block_n=32, block_k=32)
FP4_SMALL = er.TuningConfig(block_n=32, block_k=64)  # two K steps at K = 128
SCALE_DTYPES = pytest.mark.parametrize("scale_dtype", [jnp.float8_e8m0fnu, jnp.float32], ids=["ue8m0", "fp32"])


def inputs(seed, ids, G, N, K, dtype=jnp.bfloat16):
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (len(ids), K), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (G, N, K), jnp.float32) / np.sqrt(K)).astype(dtype)
    return x, w, jnp.asarray(ids, jnp.int32)


def fp4_inputs(seed, ids, G, N, K, scale_dtype):
    """x bf16 [len(ids), K]; FP4 w [G, N, K/2], w_scales [G, N, K/32] (kernel_cases.fp4_experts); ids int32."""
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (len(ids), K), jnp.float32).astype(jnp.bfloat16)
    return x, *kernel_cases.fp4_experts(kw, G, N, K, scale_dtype), jnp.asarray(ids, jnp.int32)


# The kernel in CPU interpret mode against the reference: measured 0 on every case (bf16 outputs of the same fp32
# sums), so the floor. The model paths and the GPU keep 2^-7.
CPU_TOL = 1e-6


def assert_close(got, want, tol=2 ** -7):
    g, w = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(g).all(), f"{np.sum(~np.isfinite(g))} unwritten or non-finite outputs"
    # both round the same fp32 sums to the output dtype; the sums' order differs
    err = np.abs(g - w).max() / np.abs(w).max()
    print(f"max abs err / max |ref| {err:.3g}")
    assert err <= tol


@pytest.mark.parametrize("ids", [[3, 0, 7, 1, 6, 2], [4, 4, 1, 4], [5], list(range(8)) * 3])
@pytest.mark.parametrize("shared_x", [False, True])
def test_interpret_matches_reference(ids, shared_x):
    """shared_x: x has one row, every output row's (a token against its k experts)."""
    x, w, idx = inputs(len(ids) + 10 * shared_x, ids, 8, 64, 96)
    x = x[:1] if shared_x else x
    assert_close(er.expert_rows(x, w, idx, interpret=True, poison_outputs=True, tuning=SMALL), er.reference(x, w, idx),
                 CPU_TOL)


def test_one_matrix_one_row_at_the_smallest_blocks():
    """G = 1, M = 1 (a dense layer's GEMV, the bench's "dense" cases) at block_n = block_k = 16."""
    x, w, idx = inputs(9, [0], 1, 64, 96)
    smallest = er.TuningConfig(block_n=16, block_k=16)
    assert_close(er.expert_rows(x, w, idx, tuning=smallest, interpret=True, poison_outputs=True),
                 er.reference(x, w, idx), CPU_TOL)


@SCALE_DTYPES
@pytest.mark.parametrize("ids,shared_x", [([3, 0, 7, 1, 6, 2], True), ([4, 4, 1, 4], False), ([5], False)])
def test_fp4_interpret_matches_reference(ids, shared_x, scale_dtype):
    """FP4 weights (every code, scales 2^-8 .. 2^-3 per 1 x 32 block) dequantised in the kernel against the
    reference's whole dequantised matrices: the same bf16 weights, so the same fp32 sums (measured 0 apart)."""
    x, w, w_scales, idx = fp4_inputs(len(ids) + 10 * shared_x, ids, 8, 64, 128, scale_dtype)
    x = x[:1] if shared_x else x
    got = er.expert_rows(x, w, idx, w_scales=w_scales, interpret=True, poison_outputs=True, tuning=FP4_SMALL)
    assert got.dtype == jnp.bfloat16
    assert_close(got, er.reference(x, w, idx, w_scales), CPU_TOL)


@pytest.mark.parametrize("shared_x", [False, True])
def test_interpret_writes_every_output_once(monkeypatch, shared_x):
    """Each output element is written by exactly one program (a row's own, through the one live row of its
    16-row tile)."""
    x, w, idx = inputs(3, [3, 0, 7, 1, 6, 2], 8, 64, 96)
    x = x[:1] if shared_x else x
    assert (write_counts(monkeypatch, er, er.expert_rows, x, w, idx, tuning=SMALL) == 1).all()


def test_fp4_interpret_writes_every_output_once(monkeypatch):
    x, w, w_scales, idx = fp4_inputs(3, [3, 0, 7, 1, 6, 2], 8, 64, 128, jnp.float8_e8m0fnu)
    assert (write_counts(monkeypatch, er, er.expert_rows, x, w, idx, w_scales=w_scales, tuning=FP4_SMALL) == 1).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_moe_one_token_path_matches_xla(seed):
    """routed_experts at T = 1 under ops.use("pallas") (expert_rows) against the gathered XLA path; the bf16
    SwiGLU activation between the two products may round one ulp apart (3.4-3.7e-3 measured)."""
    E, d, F, k = 16, 64, 32, 6
    kx, ku, kd, kw = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(kx, (1, d), jnp.float32).astype(jnp.bfloat16)
    gate_up = (jax.random.normal(ku, (E, 2 * F, d)) / np.sqrt(d)).astype(jnp.bfloat16)
    down = (jax.random.normal(kd, (E, d, F)) / np.sqrt(F)).astype(jnp.bfloat16)
    idx = jax.random.permutation(kw, E)[None, :k].astype(jnp.int32)
    weights = jax.nn.softmax(jax.random.normal(kw, (1, k)))
    with ops.use("pallas"):
        got = ops.routed_experts(x, idx, weights, gate_up, down, 7.0)
    with ops.use("xla"):
        want = ops.routed_experts(x, idx, weights, gate_up, down, 7.0)
    assert got.shape == want.shape == (1, d)
    assert_close(got, want)


def test_bad_shapes_are_errors():
    x, w, idx = inputs(0, [1, 2], 4, 64, 96)
    with pytest.raises(ValueError, match="multiples"):
        er.expert_rows(x, w, idx, tuning=er.TuningConfig(block_k=64), interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        er.TuningConfig(block_n=48)
    with pytest.raises(ValueError, match="num_warps=0: expected a positive int"):
        er.TuningConfig(num_warps=0)
    with pytest.raises(ValueError, match="expected x"):
        er.expert_rows(x.astype(jnp.float32), w, idx, interpret=True)
    with pytest.raises(ValueError, match=r"ids \(1,\), x \(2, 96\): expected ids \[M\] and x \[M or 1, K\]"):
        er.expert_rows(x, w, idx[:1], interpret=True)


def test_fp4_bad_inputs_are_errors():
    x, w, w_scales, idx = fp4_inputs(0, [1, 2], 4, 64, 128, jnp.float8_e8m0fnu)
    expected = r"expected x \[M, K\] bfloat16 \(K a multiple of 32\), w \[G, N, K/2\] int8 and w_scales \[G, N, K/32\]"
    with pytest.raises(ValueError, match=r"x \(2, 128\) bfloat16, w \(4, 64, 32\) int8, w_scales \(4, 64, 4\) "
                       r"float8_e8m0fnu: " + expected):
        er.expert_rows(x, w[:, :, :32], idx, w_scales=w_scales, interpret=True)  # K/2 = 32 for K = 128
    with pytest.raises(ValueError, match=r"w_scales \(4, 64, 8\) float8_e8m0fnu: " + expected):
        er.expert_rows(x, w, idx, w_scales=jnp.concatenate([w_scales, w_scales], axis=2), interpret=True)
    with pytest.raises(ValueError, match=r"w_scales \(4, 64, 4\) bfloat16: " + expected):
        er.expert_rows(x, w, idx, w_scales=w_scales.astype(jnp.bfloat16), interpret=True)
    with pytest.raises(ValueError, match=r"x \(2, 128\) float32, w \(4, 64, 64\) int8"):
        er.expert_rows(x.astype(jnp.float32), w, idx, w_scales=w_scales, interpret=True)
    with pytest.raises(ValueError, match=r"w \(4, 64, 64\) uint8"):
        er.expert_rows(x, w.view(jnp.uint8), idx, w_scales=w_scales, interpret=True)
    with pytest.raises(ValueError, match="block_k=32 must be a power of two >= 64"):
        er.expert_rows(x, w, idx, w_scales=w_scales, tuning=SMALL, interpret=True)


@pytest.mark.parametrize("N,K,x_rows", [(4096, 4096, 1), (4096, 2048, 6)])
def test_lowers_for_h100(N, K, x_rows):
    S = jax.ShapeDtypeStruct
    assert "triton" in lower_for_h100(er.expert_rows, S((x_rows, K), jnp.bfloat16), S((256, N, K), jnp.bfloat16),
                                      S((6,), jnp.int32)).lower()


@SCALE_DTYPES
@pytest.mark.parametrize("case", ["fp4 gate_up T=1", "fp4 down T=1"])
def test_fp4_compiles_for_sm90(case, scale_dtype):
    """A cubin for sm_90 per static configuration of the FP4 kernel (one x row or k, ue8m0 or fp32 scales);
    bound 120 s as tests/test_kernels_compile.py's."""
    pytest.importorskip("triton")
    [c] = [c for c in kernel_cases.bench_cases("expert_rows") if c["name"] == case]
    x, w, ids, w_scales = jax.eval_shape(c["args"], jax.random.PRNGKey(0))
    w_scales = jax.ShapeDtypeStruct(w_scales.shape, scale_dtype)
    seconds = compile_for_h100(c["pallas"], x, w, ids, w_scales)
    print(f"{case} {jnp.dtype(scale_dtype)}: Triton compile for sm_90 {seconds}")
    assert seconds and max(seconds.values()) < 120


def run_fp4_ptx(word: int, scales: list[float], shifts: tuple[int, int]) -> list[int]:
    """common._FP4_PTX read as PTX and run on one 32-bit word of 4 bytes and their 4 fp32 scales (each a
    power of two times FP16_CODE_SCALE, as fp4_decode_ptx passes them): the bits of the 4 fp32 results rounded to
    bf16 (fp4_decode_ptx's astype). A small interpreter of the opcodes it uses, written from the PTX ISA: it
    checks the text's selectors, shifts, masks and lookup table, not the GPU (the GPU twin below does) nor how
    Triton packs the asm's operands (tests/test_fp4_ptx_lowering.py)."""
    import re
    from kernels_pallas import common

    regs: dict[str, int | float] = {"$4": word, **{f"${5 + i}": s for i, s in enumerate(scales)}}
    val = lambda a: int(a, 0) if re.fullmatch(r"(0x[0-9A-Fa-f]+|\d+)", a) else regs[a]
    f32 = lambda v: float(np.float32(v))
    text = "\n".join(line for line in common._FP4_PTX.format(*shifts).splitlines() if not line.startswith(".reg"))
    for op, operands in re.findall(r"([a-z][\w.]*) ([^;]*);", text):
        args = [a.strip() for a in operands.split(",")]
        if op == "prmt.b32":
            a, b, sel = val(args[1]), val(args[2]), val(args[3])
            pool = (a | b << 32).to_bytes(8, "little")
            regs[args[0]] = int.from_bytes(bytes(pool[(sel >> 4 * i) & 7] for i in range(4)), "little")
        elif op == "shl.b32":
            regs[args[0]] = (val(args[1]) << val(args[2])) & 0xFFFFFFFF
        elif op == "and.b32":
            regs[args[0]] = val(args[1]) & val(args[2])
        elif op == "lop3.b32":
            a, b, c, lut = (val(x) for x in args[1:])
            regs[args[0]] = sum(((lut >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1))) & 1) << i
                                for i in range(32))
        elif op == "mov.b32":  # {lo, hi}, w
            lo, hi = (r.strip("{} ") for r in args[:2])
            regs[lo], regs[hi] = val(args[2]) & 0xFFFF, val(args[2]) >> 16
        elif op == "cvt.f32.f16":
            regs[args[0]] = f32(np.uint16(val(args[1])).view(np.float16))
        elif op == "mul.f32":
            regs[args[0]] = f32(np.float32(regs[args[1]]) * np.float32(regs[args[2]]))
        else:
            raise AssertionError(f"the interpreter has no {op}")
    return [int(np.asarray(regs[f"${i}"], jnp.bfloat16).view(np.uint16)) for i in range(4)]


def test_fp4_ptx_text_computes_fp4_decode():
    """Every byte value, in each of the word's 4 places, with scales from 2^-12 to 2^3: the inline PTX's low
    and high nibbles give fp4_decode's bf16 bits (fp4_decode in plain JAX is the CPU path and the reference)."""
    from kernels_pallas import common

    rng = np.random.default_rng(0)
    byte_values = np.arange(256, dtype=np.uint8)
    for place in range(4):
        for scale_exp in (-12, -7, 0, 3):
            words = rng.integers(0, 256, (256, 4), dtype=np.uint8)
            words[:, place] = byte_values
            scales = np.full((256, 4), 2.0 ** scale_exp, np.float32)
            scales[:, (place + 1) % 4] = 2.0 ** -3  # neighbours with another block's scale
            packed = jnp.asarray(words.view(np.int8))
            want = [np.asarray(h).view(np.uint16) for h in common.fp4_decode(packed, jnp.asarray(scales))]
            for row in range(256):
                word = int.from_bytes(words[row].tobytes(), "little")
                for half, shifts in enumerate(((9, 12), (5, 8))):
                    got = run_fp4_ptx(word, [float(s) * common.FP16_CODE_SCALE for s in scales[row]], shifts)
                    assert got == want[half][row].tolist(), (row, place, scale_exp, half)


def test_fp4_ptx_in_interpret_mode_is_an_error():
    x, w, w_scales, ids = fp4_inputs(0, [1], 2, 32, 128, jnp.float8_e8m0fnu)
    with pytest.raises(ValueError, match="fp4_ptx=True .*needs a GPU"):
        er.expert_rows(x, w, ids, w_scales=w_scales, tuning=er.TuningConfig(block_k=64, fp4_ptx=True),
                       interpret=True)


@on_gpu
@pytest.mark.parametrize("case", [c for c in kernel_cases.bench_cases("expert_rows") if c["name"].startswith("fp4")],
                         ids=lambda c: c["name"])
def test_gpu_fp4_ptx_equals_bit_arithmetic(case):
    assert_fp4_ptx_equals_bit_arithmetic(case, er.reference, assert_close)


@on_gpu
@pytest.mark.parametrize("case", kernel_cases.bench_cases("expert_rows"), ids=lambda c: c["name"])
def test_gpu_bench_cases_match_reference(case):
    args = case["args"](jax.random.PRNGKey(0))
    out = jax.jit(functools.partial(case["pallas"], poison_outputs=True))(*args)
    assert_close(out, jax.jit(er.reference)(*args))
