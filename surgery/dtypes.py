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


#: largest finite value of each float dtype; larger values round to inf
LARGEST = {
    "F16": 65504.0, "BF16": float.fromhex("0x1.fep127"),
    "F32": float(np.finfo(np.float32).max), "F64": float(np.finfo(np.float64).max),
}


def decode(raw: bytes | bytearray | memoryview, dtype: str) -> np.ndarray:
    """Decode little-endian bytes of a float dtype, exactly: float64 for F64, float32 for the narrower ones."""
    if dtype == "BF16":
        words = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
        words <<= 16  # in place: no second full-size array
        return words.view(np.float32)
    if dtype in _NUMPY:
        return np.frombuffer(raw, dtype=_NUMPY[dtype]).astype(np.float64 if dtype == "F64" else np.float32)
    raise SurgeryError(f"cannot compute with dtype {dtype}: only {', '.join(FLOATS)} are supported")


def encode(values: np.ndarray, dtype: str) -> memoryview:
    """Round float32 or float64 values once, to nearest even, to little-endian bytes of `dtype`.

    inf and NaN pass through; a finite value that would become inf raises SurgeryError.
    """
    if dtype not in FLOATS:
        raise SurgeryError(f"cannot write computed values as {dtype}: only {', '.join(FLOATS)} are supported")
    values = np.ascontiguousarray(values, dtype=np.float64 if values.dtype == np.float64 else np.float32).reshape(-1)
    if dtype == "BF16":
        encoded = _bf16_words(values)
    else:
        with np.errstate(over="ignore"):  # overflow is reported below, with what to do
            encoded = values.astype(_NUMPY[dtype], copy=False)  # numpy rounds float64 -> float16 directly
    if LARGEST[dtype] < float(np.finfo(values.dtype).max):  # else nothing can overflow
        _check_overflow(values, encoded, dtype)
    return memoryview(encoded).cast("B")


def _bf16_words(values: np.ndarray) -> np.ndarray:
    """bf16 bits as little-endian uint16, a block at a time: its temporaries stay small and in cache."""
    out = np.empty(values.size, dtype="<u2")
    for start in range(0, values.size, _BLOCK):
        out[start:start + _BLOCK] = _bf16_block(values[start:start + _BLOCK])
    return out


def _bf16_block(values: np.ndarray) -> np.ndarray:
    """Upper halves of float32 rounded to nearest even; NaN kept quiet."""
    words = _round_to_odd_f32(values) if values.dtype == np.float64 else values.view(np.uint32)
    rounded = (words + (((words >> 16) & 1) + 0x7FFF)) >> 16
    quiet_nan = (words >> 16) | 0x0040
    return np.where(np.isnan(words.view(np.float32)), quiet_nan, rounded)


def _round_to_odd_f32(values: np.ndarray) -> np.ndarray:
    """float32 bits of float64 values rounded to odd: truncated, the last bit set if inexact (or NaN).

    With 16 more bits than bf16, rounding this to nearest even rounds as if directly from float64.
    """
    with np.errstate(over="ignore"):
        narrow = values.astype(np.float32)
    wide = narrow.astype(np.float64)
    words = narrow.view(np.uint32)
    words -= np.where(np.signbit(values), wide < values, wide > values)  # rounded away from zero: step back
    words |= wide != values
    return words


def _check_overflow(values: np.ndarray, encoded: np.ndarray, dtype: str) -> None:
    """Raise SurgeryError if a finite value became inf; element by element only if some value exceeds the largest."""
    largest = LARGEST[dtype]
    if not values.size or (np.fmax.reduce(values) <= largest and np.fmin.reduce(values) >= -largest):
        return
    became_inf = (encoded & 0x7FFF) == 0x7F80 if dtype == "BF16" else np.isinf(encoded)
    overflow = values[became_inf & np.isfinite(values)]
    if overflow.size:
        worst = float(overflow[np.argmax(np.abs(overflow))])
        raise SurgeryError(
            f"values {'up' if worst > 0 else 'down'} to {worst:.3g} do not fit in {dtype} (largest {largest:.5g}); "
            "use a wider --dtype"
        )


_NUMPY = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
#: elements per block of a multi-step encoding
_BLOCK = 1 << 15
