"""Quantised weights at load: each paired with its scale (checked from the headers before any data is read)
and streamed one stored tensor at a time, kept as released (a QuantArray on the host) or dequantised to fp32."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from . import quantization
from .errors import CheckpointError
from .names import canonical_name, weight_of_scale
from .quant_array import QuantArray
from .safetensors_io import StoredTensor, read_tensor

FP8_DTYPE = "F8_E4M3"
FP4_DTYPES = ("I8", "F4")  # released FP4 experts are int8; F4 is the same bytes under torch's float4 dtype
SCALE_DTYPES = ("F8_E8M0", "F32", "BF16")  # ue8m0 (DeepSeek); fp32 (transformers' weight_scale_inv)


def _expected_scale_shape(w: StoredTensor) -> tuple[int, ...]:
    if w.dtype == FP8_DTYPE:
        return quantization.fp8_scale_shape(w.shape)
    logical = w.shape if w.dtype == "F4" else (*w.shape[:-1], 2 * w.shape[-1])
    if logical[-1] % quantization.FP4_BLOCK:
        raise CheckpointError(f"FP4 weight {w.name} in {w.file.name} has {logical[-1]} input columns, not a "
                              f"multiple of the {quantization.FP4_BLOCK}-column scale block")
    return quantization.fp4_scale_shape(logical)


def pair_scales(stored: dict[str, StoredTensor]) -> dict[str, StoredTensor]:
    """Quantised weight name -> its scale, checked from the headers before any data is read.

    Errors: a scale without its weight, a scale of an unquantised weight, two scales for one weight,
    a quantised weight without a scale, a scale of the wrong shape or dtype, ue8m0 bytes used as a weight.
    """
    scale_of: dict[str, StoredTensor] = {}
    for name, s in stored.items():
        weight = weight_of_scale(name)
        if weight is None:
            continue
        where = f"{name} in {s.file.name}"
        w = stored.get(weight)
        if w is None:
            raise CheckpointError(f"quantisation scale {where} has no weight {weight} in the checkpoint")
        if w.dtype != FP8_DTYPE and w.dtype not in FP4_DTYPES:
            raise CheckpointError(f"quantisation scale {where} belongs to {weight}, which is stored as {w.dtype}, "
                                  f"not quantised ({FP8_DTYPE} or FP4 {'/'.join(FP4_DTYPES)})")
        if weight in scale_of:
            raise CheckpointError(f"weight {weight} has two quantisation scales: {scale_of[weight].name} and {name}")
        if s.dtype not in SCALE_DTYPES:
            raise CheckpointError(f"quantisation scale {where} has dtype {s.dtype}; expected one of "
                                  f"{', '.join(SCALE_DTYPES)}")
        want = _expected_scale_shape(w)
        if s.shape != want:
            raise CheckpointError(f"quantisation scale {where} has shape {s.shape} but its {w.dtype} weight "
                                  f"{weight} {w.shape} needs {want}")
        scale_of[weight] = s
    for name, w in stored.items():
        if name in scale_of or weight_of_scale(name) is not None:
            continue
        if w.dtype == FP8_DTYPE or w.dtype in FP4_DTYPES:
            raise CheckpointError(f"quantised weight {name} ({w.dtype}) in {w.file.name} has no scale "
                                  f"({name.removesuffix('.weight')}.scale or {name}_scale_inv)")
        if w.dtype == "F8_E8M0":
            raise CheckpointError(f"tensor {name} in {w.file.name} has the scale dtype F8_E8M0 but is not named "
                                  "as a quantisation scale (X.scale or X.weight_scale_inv)")
    return scale_of


def released_names(stored: dict[str, StoredTensor]) -> dict[str, tuple[int, int]]:
    """Canonical parameter name -> its quantisation block (FP8_BLOCK_SHAPE / FP4_BLOCK_SHAPE), for every
    parameter ``stored`` (safetensors_io.catalog's entries) holds quantised; a per-expert tensor names its stack."""
    return {canonical_name(name)[0]: quantization.FP8_BLOCK_SHAPE if stored[name].dtype == FP8_DTYPE
            else quantization.FP4_BLOCK_SHAPE for name in pair_scales(stored)}


def iter_tensors(stored: dict[str, StoredTensor], dequantize: bool = True):
    """Yield (name, value, file) for each of ``stored`` (safetensors_io.catalog's entries), one at a time.

    A quantised weight is read together with its scale wherever that is stored (scales themselves are not
    yielded) and comes back dequantised (fp32, same [out, in] as the parameter), or with ``dequantize=False``
    as released: a QuantArray of host arrays (``_released``)."""
    scale_of = pair_scales(stored)
    for name, t in stored.items():
        if weight_of_scale(name) is not None:
            continue
        array = read_tensor(t)
        if name in scale_of:
            scale = read_tensor(scale_of[name])
            if not dequantize:
                array = _released(name, t, array, scale)
            elif t.dtype == FP8_DTYPE:
                array = quantization.dequantise_fp8(array, scale)
            else:
                array = quantization.dequantise_fp4(array, scale)
        yield name, array, t.file


def _released(name: str, t: StoredTensor, codes: np.ndarray, scale: np.ndarray) -> QuantArray:
    """A stored quantised weight as a host QuantArray with ue8m0 scales. Scales stored as fp32 / bf16
    (transformers' ``weight_scale_inv``) must be powers of two that ue8m0 holds exactly; others are an error."""
    if scale.dtype != ml_dtypes.float8_e8m0fnu:
        s = scale.astype(np.float32)
        e8 = s.astype(ml_dtypes.float8_e8m0fnu)
        if not np.array_equal(e8.astype(np.float32), s):
            bad = s[e8.astype(np.float32) != s].reshape(-1)[0]
            raise CheckpointError(f"quantisation scale of {name} in {t.file.name} holds {bad}, not a power of two "
                                  "(ue8m0); load it dequantised (dequantize=True)")
        scale = e8
    if t.dtype == FP8_DTYPE:
        return QuantArray(codes, scale, quantization.FP8_BLOCK_SHAPE)
    return QuantArray(codes.view(np.int8), scale, quantization.FP4_BLOCK_SHAPE)
