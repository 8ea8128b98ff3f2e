"""Which implementation each accelerated op runs: a static, trace-time setting.

``Kernels`` names the choice (a default plus per-op overrides); ``use(choice)`` makes it current for the
code traced inside it, as ``jax.default_matmul_precision`` does for precision, and every op function reads
``current()`` while being traced. The engine traces its jitted steps inside ``use`` with the choice as a
static argument, so two choices never share a compiled step.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax

IMPLEMENTATIONS = ("xla", "pallas")
OPS = ("sparse_attention", "indexer_scores", "topk", "compressor_prefill", "compressor_decode_step", "hc_pre",
       "routed_experts", "linear")
# Implementations an op runs only when an override names them, never as a default: "fp8_gemm" for "linear" is
# "pallas" plus FP8 activations above the weight-only kernel's rows (ops/dense.py), until a GPU measurement
# decides whether it becomes the default.
OPT_IN = {"linear": ("fp8_gemm",)}


@dataclasses.dataclass(frozen=True)
class Kernels:
    """``default`` for every op, except those named in ``overrides`` ((op, implementation) pairs, where the
    implementation may also be one of the op's ``OPT_IN``), e.g. ``Kernels("pallas", overrides=(("routed_experts",
    "xla"),))`` or ``Kernels("pallas", overrides=(("linear", "fp8_gemm"),))``. Hashable: a static jit argument."""

    default: str = "xla"
    overrides: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        check_implementation(self.default)
        object.__setattr__(self, "overrides", tuple(tuple(pair) for pair in self.overrides))
        for op, impl in self.overrides:
            if op not in OPS:
                raise ValueError(f"kernels override names op {op!r}; expected one of {OPS}")
            check_implementation(impl, IMPLEMENTATIONS + OPT_IN.get(op, ()))

    def of(self, op: str) -> str:
        """The implementation ``op`` runs."""
        return dict(self.overrides).get(op, self.default)

    @classmethod
    def parse(cls, kernels: str | Kernels) -> Kernels:
        """A ``Kernels``, or an implementation name (the CLI's ``--kernels xla|pallas``) for every op."""
        return kernels if isinstance(kernels, Kernels) else cls(kernels)


def check_implementation(impl, allowed: tuple[str, ...] = IMPLEMENTATIONS) -> None:
    if impl not in allowed:
        raise ValueError(f"kernels {impl!r} is not one of {allowed}")


_CURRENT: contextvars.ContextVar[Kernels] = contextvars.ContextVar("dsv4_jax_kernels", default=Kernels())


@contextlib.contextmanager
def use(kernels: str | Kernels):
    """Within this context the op functions trace ``kernels``' implementations."""
    token = _CURRENT.set(Kernels.parse(kernels))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> Kernels:
    """The choice the op functions trace now (plain XLA outside any ``use``)."""
    return _CURRENT.get()


def pallas(op: str) -> bool:
    """Whether ``op`` runs its Pallas kernel under the current choice (an opt-in implementation is one)."""
    return _CURRENT.get().of(op) in ("pallas", *OPT_IN.get(op, ()))


def interpret() -> bool:
    """How a Pallas kernel runs: compiled on a GPU, or when traced for an abstract GPU (a compile-only
    H100 on a CPU host: kernels_pallas.testing.abstract_h100); in interpret mode elsewhere (the CPU tests)."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return jax.default_backend() != "gpu" and getattr(device, "platform", None) != "gpu"
