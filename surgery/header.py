"""safetensors headers: validating untrusted header bytes, and building the header of a shard we write."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from . import dtypes
from .errors import SurgeryError, first_line

MAX_HEADER_BYTES = 100_000_000
U64_MAX = 2**64 - 1


@dataclass(frozen=True)
class TensorHeader:
    """One tensor entry of a safetensors header; `begin`/`end` are relative to the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FileHeader:
    """A validated header: tensors in file order, metadata, and where the data buffer starts."""

    tensors: tuple[TensorHeader, ...]
    metadata: dict[str, str]
    data_start: int


def header_length(first8: bytes, file_size: int, where: str) -> int:
    """Validate the 8-byte length prefix of a safetensors file and return the header length N."""
    if file_size < 8 or len(first8) < 8:
        raise SurgeryError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    n = int.from_bytes(first8[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise SurgeryError(f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > file_size:
        raise SurgeryError(f"{where}: header length {n} runs past the end of the {file_size}-byte file")
    return n


def parse_header(raw: bytes, file_size: int, where: str) -> FileHeader:
    """Validate header JSON bytes (the N bytes after the prefix) against the file size."""
    data_size = file_size - 8 - len(raw)
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_int=_parse_int)
    except UnicodeDecodeError:
        raise SurgeryError(f"{where}: header is not valid UTF-8") from None
    except UnicodeEncodeError:
        raise SurgeryError(f"{where}: header has a string with a lone surrogate escape (not valid Unicode)") from None
    except _DuplicateKey as dup:
        raise SurgeryError(f"{where}: header has duplicate key {dup.args[0]!r}") from None
    except (ValueError, RecursionError) as exc:
        raise SurgeryError(f"{where}: header is not valid JSON ({first_line(exc)})") from None
    if not isinstance(obj, dict):
        raise SurgeryError(f"{where}: header is not a JSON object")
    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SurgeryError(f"{where}: __metadata__ must map strings to strings")
    tensors = [_tensor_entry(name, entry, where) for name, entry in obj.items()]
    _check_layout(tensors, data_size, where)
    return FileHeader(tuple(tensors), metadata, 8 + len(raw))


def build_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """Serialise a header for (name, dtype, shape, nbytes) entries laid out in the given order.

    Returns the whole prefix: the 8-byte length plus the JSON padded with spaces to a multiple of 8.
    """
    obj: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, size in entries:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class _DuplicateKey(ValueError):
    pass


def _parse_int(text: str) -> int | float:
    """JSON integers, except `-0`, which the reference reader takes for a float."""
    return float(text) if text == "-0" else int(text)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        for text in (key, value):
            if isinstance(text, str):
                text.encode("utf-8")  # raises UnicodeEncodeError on a lone surrogate such as "\ud800"
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out



def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_entry(name: str, entry: object, where: str) -> TensorHeader:
    at = f"{where}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise SurgeryError(f"{at}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in dtypes.BITS:
        raise SurgeryError(f"{at}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= U64_MAX for d in shape):
        raise SurgeryError(f"{at}: shape must be a list of integers from 0 to 2**64-1, got {_short(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise SurgeryError(f"{at}: data_offsets must be two non-negative integers, got {_short(offsets)}")
    begin, end = offsets
    if end < begin:
        raise SurgeryError(f"{at}: data_offsets end {end} is before begin {begin}")
    numel = 1
    for d in shape:  # step by step: a product of huge numbers is slow, and any partial overflow is an error
        numel *= d
        if numel > U64_MAX:
            raise SurgeryError(f"{at}: its {len(shape)}-dimensional shape has more than 2**64-1 elements")
    bits = dtypes.BITS[dtype] * numel
    if bits % 8 or bits // 8 != end - begin:
        raise SurgeryError(
            f"{at}: {dtype} shape {_short(shape)} needs {bits / 8} bytes but data_offsets span {end - begin}"
        )
    return TensorHeader(name, dtype, tuple(shape), begin, end)


def _check_layout(tensors: list[TensorHeader], data_size: int, where: str) -> None:
    position = 0
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.begin != position:
            problem = "overlaps the previous tensor" if t.begin < position else f"leaves a gap at byte {position}"
            raise SurgeryError(f"{where}: tensor {t.name!r} {problem} (data_offsets start at {t.begin})")
        position = t.end
    if position != data_size:
        problem = "runs past the end of the file" if position > data_size else "is followed by trailing bytes"
        raise SurgeryError(f"{where}: tensor data ends at byte {position} of a {data_size}-byte buffer: {problem}")
