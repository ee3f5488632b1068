"""safetensors dtypes: their widths, and float conversions done with numpy alone (bf16 as uint16 words)."""

from __future__ import annotations

import numpy as np

from .errors import SurgeryError

#: bits per element of every dtype the safetensors format defines
BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

#: dtypes the engine can compute with (read to fp32, write back)
FLOATS = ("F64", "F32", "F16", "BF16")

#: names used in config.json ("dtype" / "torch_dtype") for the float dtypes
TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}

_ALIASES = {
    "bf16": "BF16", "bfloat16": "BF16",
    "fp16": "F16", "f16": "F16", "float16": "F16", "half": "F16",
    "fp32": "F32", "f32": "F32", "float32": "F32", "float": "F32",
    "fp64": "F64", "f64": "F64", "float64": "F64",
}


def parse_float_dtype(text: str) -> str:
    """Map a user-facing spelling ("bf16", "float16", "F32", ...) to a safetensors float dtype."""
    name = _ALIASES.get(text.lower(), text.upper())
    if name not in FLOATS:
        raise SurgeryError(f"unsupported dtype {text!r}: use one of bf16, fp16, fp32, fp64")
    return name


def nbytes(dtype: str, numel: int) -> int:
    """Bytes taken by `numel` elements of `dtype` (sub-byte dtypes must fill whole bytes)."""
    bits = BITS[dtype] * numel
    if bits % 8:
        raise SurgeryError(f"{numel} elements of {dtype} do not fill a whole number of bytes")
    return bits // 8


def itemsize(dtype: str) -> int:
    """Alignment unit of a dtype in bytes (1 for sub-byte dtypes)."""
    return max(1, BITS[dtype] // 8)


def to_f32(raw: bytes | bytearray | memoryview, dtype: str) -> np.ndarray:
    """Decode little-endian bytes of a float dtype into a float32 array."""
    if dtype == "BF16":
        words = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
        words <<= 16  # in place: no second full-size array
        return words.view(np.float32)
    if dtype in ("F16", "F32", "F64"):
        return np.frombuffer(raw, dtype=_NUMPY[dtype]).astype(np.float32)
    raise SurgeryError(f"cannot compute with dtype {dtype}: only {', '.join(FLOATS)} are supported")


def from_f32(values: np.ndarray, dtype: str) -> memoryview:
    """Encode a float32 array as little-endian bytes of `dtype`; bf16 rounds to nearest even."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "BF16":
        words = values.view(np.uint32)
        rounded = (words + (((words >> 16) & 1) + 0x7FFF)) >> 16
        quiet_nan = (words >> 16) | 0x0040
        return memoryview(np.where(np.isnan(values), quiet_nan, rounded).astype("<u2")).cast("B")
    if dtype in ("F16", "F32", "F64"):
        return memoryview(values.astype(_NUMPY[dtype], copy=False)).cast("B")
    raise SurgeryError(f"cannot write computed values as {dtype}: only {', '.join(FLOATS)} are supported")


_NUMPY = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
