"""Producers write one output tensor's bytes: copies of source byte ranges, or values computed in chunks."""

from __future__ import annotations

import math
import numbers
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from . import dtypes
from .checkpoint import FileStore
from .copying import copy_range, write_all
from .errors import SurgeryError
from .randomness import RandomStream, check_seed

#: elements per computed chunk: bounds the memory of every computation (16 MiB as fp32)
CHUNK_ELEMENTS = 4 << 20


@dataclass(frozen=True)
class Segment:
    """A byte range of a source file."""

    store: FileStore
    file: str
    offset: int
    length: int


class Sources:
    """Open source files on first use; close and release each after the last producer that reads it."""

    def __init__(self, producers: list[Producer]):
        self._uses = Counter(key for p in producers for key in {(s.store, s.file) for s in p.inputs})
        self._fds: dict[tuple[FileStore, str], int] = {}

    def fd(self, segment: Segment) -> int:
        key = (segment.store, segment.file)
        if key not in self._fds:
            path = segment.store.fetch(segment.file)
            try:
                self._fds[key] = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise SurgeryError(f"{path}: source shard disappeared while writing") from None
        return self._fds[key]

    def read(self, segment: Segment, start: int, length: int) -> bytes:
        data = os.pread(self.fd(segment), length, segment.offset + start)
        if len(data) != length:
            raise SurgeryError(f"{segment.file}: ended early while reading (was it truncated?)")
        return data

    def finished(self, producer: Producer) -> None:
        for key in {(s.store, s.file) for s in producer.inputs}:
            self._uses[key] -= 1
            if self._uses[key] == 0:
                self._close(key)
                key[0].release(key[1])

    def close(self) -> None:
        for key in list(self._fds):
            self._close(key)

    def _close(self, key: tuple[FileStore, str]) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)


@dataclass(frozen=True)
class Copy:
    """Bytes taken verbatim from source files: a copy, a stack or concatenation along dim 0, or leading rows."""

    inputs: tuple[Segment, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.length for s in self.inputs)

    def write(self, dst_fd: int, sources: Sources) -> None:
        for s in self.inputs:
            try:
                copy_range(sources.fd(s), dst_fd, s.offset, s.length)
            except SurgeryError as exc:
                raise SurgeryError(f"{s.file}: {exc}") from None

    def iter_bytes(self, sources: Sources) -> Iterator[bytes]:
        """The same bytes as `write`, read into memory a bounded chunk at a time (for verification)."""
        step = CHUNK_ELEMENTS
        for s in self.inputs:
            for start in range(0, s.length, step):
                yield sources.read(s, start, min(step, s.length - start))

    def describe(self) -> str:
        return "copy"


@dataclass(frozen=True)
class Compute:
    """Values made chunk by chunk, encoded to `dtype`; `chunks` yields float32 or float64 arrays in row-major order."""

    dtype: str
    numel: int
    chunks: Callable[[Sources], Iterator[np.ndarray]]
    label: str
    inputs: tuple[Segment, ...] = ()

    @property
    def nbytes(self) -> int:
        return dtypes.nbytes(self.dtype, self.numel)

    def write(self, dst_fd: int, sources: Sources) -> None:
        for chunk in self.iter_bytes(sources):
            write_all(dst_fd, chunk)
            del chunk  # let the chunk go before the next one is made: bounds peak memory

    def iter_bytes(self, sources: Sources) -> Iterator[memoryview]:
        produced = 0
        for values in self.chunks(sources):
            produced += values.size
            encoded = dtypes.encode(values, self.dtype)
            del values
            yield encoded
            del encoded
        if produced != self.numel:
            raise AssertionError(f"{self.label}: produced {produced} of {self.numel} elements")

    def describe(self) -> str:
        return self.label


Producer = Copy | Compute


def cast(segment: Segment, src_dtype: str, dst_dtype: str, numel: int) -> Compute:
    """Convert a source tensor to another float dtype, a chunk at a time."""
    step = dtypes.nbytes(src_dtype, CHUNK_ELEMENTS)

    def chunks(sources: Sources) -> Iterator[np.ndarray]:
        for start in range(0, segment.length, step):
            yield dtypes.decode(sources.read(segment, start, min(step, segment.length - start)), src_dtype)

    return Compute(dst_dtype, numel, chunks, f"cast {src_dtype}->{dst_dtype}", (segment,))


INITS = ("normal", "zeros", "uniform")


def random_init(kind: str, scale: float, dtype: str, numel: int, seed: int, key: str) -> Compute:
    """A new tensor: normal(0, scale), uniform(-scale, scale) or zeros, drawn from RandomStream(seed, key)."""
    if kind not in INITS:
        raise SurgeryError(f"unknown init {kind!r}: use one of {', '.join(INITS)}")
    try:
        check_seed(seed)
    except ValueError as exc:
        raise SurgeryError(str(exc)) from None
    if not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale >= 0):
        raise SurgeryError(f"{kind} init of {key!r}: the scale must be a finite number >= 0, got {scale!r}")
    scale = float(scale)

    def chunks(_: Sources) -> Iterator[np.ndarray]:
        stream = RandomStream(seed, key)
        for start in range(0, numel, CHUNK_ELEMENTS):
            yield _draw(stream, kind, scale, min(CHUNK_ELEMENTS, numel - start))

    label = "zeros" if kind == "zeros" else f"{kind}({scale:g})"
    return Compute(dtype, numel, chunks, label)


def _draw(stream: RandomStream, kind: str, scale: float, n: int) -> np.ndarray:
    """The next `n` values of an init (float64, rounded once when encoded)."""
    if kind == "zeros":
        return np.zeros(n, dtype=np.float32)
    if kind == "normal":
        values = stream.normal(n)
    else:
        values = stream.uniform(n)
        values *= 2.0
        values -= 1.0  # exact: uniform in [-1, 1)
    values *= scale
    return values
