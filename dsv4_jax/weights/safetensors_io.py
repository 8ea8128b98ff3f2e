"""safetensors files: a checkpoint directory's files (from its index when there is one) and their tensors.

Headers are parsed here and checked against the file (dtype, size, offsets); tensor bytes are read one
tensor at a time and viewed as numpy arrays, FP8 and ue8m0 included (through ml_dtypes).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_dtypes
import numpy as np

from .errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, from its index when there is one."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint index {index} is corrupt: {e}") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"checkpoint index {index} names {f.name}, which does not exist")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in checkpoint directory {path}")
    return files


# safetensors dtype tag -> numpy dtype. FP8 and ue8m0 come from ml_dtypes (safetensors' numpy reader has no
# such dtypes, so every tensor is read from its bytes here). "F4" (torch's float4_e2m1fn_x2) holds the
# same packed bytes as the released int8 FP4 experts, with the logical (unpacked) shape in the header.
_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
           "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
           "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype(bool),
           "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
           "F4": np.dtype("i1")}
_MAX_HEADER = 100 << 20


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor's entry in a safetensors header: where its bytes are and what they hold."""

    name: str
    file: Path
    dtype: str  # safetensors tag, e.g. "BF16", "F8_E4M3"
    shape: tuple[int, ...]  # as stored; for "F4" the logical shape (two values per byte)
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def packed_shape(self) -> tuple[int, ...]:
        """The shape of the bytes read back: F4's last axis holds two values per byte."""
        return (*self.shape[:-1], self.shape[-1] // 2) if self.dtype == "F4" else self.shape


def _corrupt(f: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint file {f} is corrupt or unreadable: {why}")


def read_header(f: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, from its header only (no tensor data is read)."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as handle:
            head = handle.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise _corrupt(f, f"header length {n} does not fit the file of {size} bytes")
            header = json.loads(handle.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(f, str(e)) from None
    if not isinstance(header, dict):
        raise _corrupt(f, "the header is not a JSON object")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(f, f"tensor {name} has a malformed header entry {entry!r}") from None
        t = StoredTensor(name, f, dtype, shape, 8 + n + int(start), 8 + n + int(end))
        if dtype not in _DTYPES:
            raise CheckpointError(f"tensor {name} in {f.name} has dtype {dtype}, which a DeepSeek-V4 checkpoint "
                                  f"does not use; expected one of {', '.join(_DTYPES)}")
        want = int(np.prod(t.packed_shape)) * _DTYPES[dtype].itemsize
        if t.end - t.start != want or t.end > size or t.start < 8 + n:
            raise _corrupt(f, f"tensor {name} {dtype}{list(shape)} claims bytes [{start}, {end}) of the data, "
                              f"which does not match its size {want} or lies outside the file")
        tensors[name] = t
    return tensors


def read_tensor(t: StoredTensor) -> np.ndarray:
    """The stored array of one tensor (F4: the packed int8 bytes [..., in/2])."""
    try:
        with open(t.file, "rb") as handle:
            handle.seek(t.start)
            data = handle.read(t.end - t.start)
    except OSError as e:
        raise _corrupt(t.file, str(e)) from None
    if len(data) != t.end - t.start:
        raise _corrupt(t.file, f"tensor {t.name} is cut short")
    return np.frombuffer(data, _DTYPES[t.dtype]).reshape(t.packed_shape)


def catalog(files: list[Path]) -> dict[str, StoredTensor]:
    """Every stored tensor of the checkpoint by name (headers only); a name stored twice is an error."""
    stored: dict[str, StoredTensor] = {}
    for f in files:
        for name, t in read_header(f).items():
            if name in stored:
                raise CheckpointError(f"tensor {name} appears twice (again in {f.name}, first in "
                                      f"{stored[name].file.name})")
            stored[name] = t
    return stored
