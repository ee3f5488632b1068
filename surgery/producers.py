"""Producers write one output tensor's bytes: byte copies of source ranges, or values computed a box at a time.

`produce(node, dtype)` picks the cheapest: a tree of layout ops over sources of the output's dtype is a `Copy`
(strided `copy_file_range` runs; nothing enters Python memory) unless its runs are tiny, then a `Gather` (source
words rearranged in memory); anything with values to compute or a dtype to change is a `Compute`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from . import dtypes
from .checkpoint import FileStore
from .copying import BLOCK, copy_range, sharing
from .errors import SurgeryError
from .layout import Run, c_strides, runs
from .values import Context, Node, Source, assemble, boxes, evaluate, flat_start

#: a layout whose runs average fewer bytes than this is gathered in memory rather than copied run by run
MIN_COPY_RUN = 1024
#: a copied range shorter than this is never cloned from an earlier copy of it (too few blocks to be worth noting)
CLONE_MIN = 16 * BLOCK


@dataclass(frozen=True)
class Segment:
    """A byte range of a source file (a tensor a producer reads)."""

    store: FileStore
    file: str
    offset: int
    length: int


class Sources:
    """Open source files on first use; close and release each after the last producer that reads it."""

    def __init__(self, producers: list[Producer]):
        self._uses = Counter(key for p in producers for key in {(s.store, s.file) for s in p.inputs})
        self._fds: dict[tuple[FileStore, str], int] = {}
        #: per open source file, where its byte ranges that could not share blocks with it were copied to:
        #: (offset, length) -> (output file's (device, inode), offset there)
        self._copied: dict[tuple[FileStore, str], dict[tuple[int, int], tuple[tuple[int, int], int]]] = {}

    def copy(self, store: FileStore, file: str, offset: int, length: int, fd: int, dst: int) -> None:
        """Copy a source byte range to `dst` of the output file `fd`. Where the range went into this same output
        file before at an offset that agrees with `dst` modulo the block size, and the source does not, the earlier
        copy is cloned instead: on reflink filesystems the later copies of a tensor (e.g. further experts) then
        share blocks even where its first copy could not share with the source. Only ranges of CLONE_MIN bytes or
        more are remembered, until their source file is closed: a column slice's many short rows are not."""
        unaligned = (offset - dst) % BLOCK != 0
        if not (sharing() and unaligned and length >= CLONE_MIN):
            copy_range(self.fd_for(store, file), fd, offset, length, dst)
            return
        target = os.fstat(fd)
        identity = (target.st_dev, target.st_ino)
        copied = self._copied.setdefault((store, file), {})
        earlier = copied.get((offset, length))
        if earlier is not None and earlier[0] == identity and (earlier[1] - dst) % BLOCK == 0:
            copy_range(fd, fd, earlier[1], length, dst)
            return
        copy_range(self.fd_for(store, file), fd, offset, length, dst)
        copied.setdefault((offset, length), (identity, dst))

    def fd_for(self, store: FileStore, file: str) -> int:
        key = (store, file)
        if key not in self._fds:
            path = store.fetch(file)
            try:
                self._fds[key] = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise SurgeryError(f"{path}: source shard disappeared while writing") from None
        return self._fds[key]

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
        self._copied.pop(key, None)
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)


@dataclass(frozen=True)
class Copy:
    """Bytes taken verbatim from source files: strided runs, moved in the kernel (`copy_file_range`)."""

    node: Node
    runs: tuple[tuple[Source, Run], ...]

    @property
    def inputs(self) -> tuple[Segment, ...]:
        return _inputs(self.node)

    def write(self, fd: int, offset: int, sources: Sources) -> None:
        for source, run in self.runs:
            for k in range(run.count):
                try:
                    sources.copy(source.store, source.info.file, run.src + k * run.src_step, run.length, fd,
                                 offset + run.dst + k * run.dst_step)
                except SurgeryError as exc:
                    raise SurgeryError(f"{source.info.file}: {exc}") from None

    def iter_bytes(self, sources: Sources) -> Iterator[tuple[int, bytes]]:
        """The same bytes as `write`, each with its place in the tensor, read into memory (for verification)."""
        for source, run in self.runs:
            fd = sources.fd_for(source.store, source.info.file)
            for k in range(run.count):
                data = os.pread(fd, run.length, run.src + k * run.src_step)
                if len(data) != run.length:
                    raise SurgeryError(f"{source.info.file}: ended early while reading (was it truncated?)")
                yield run.dst + k * run.dst_step, data

    def describe(self) -> str:
        return f"copy of {self.node.describe()}"


@dataclass(frozen=True)
class Compute:
    """Values made a box at a time and encoded to `dtype` (`raw`: source words rearranged, no float conversion)."""

    node: Node
    dtype: str
    raw: bool = False

    @property
    def inputs(self) -> tuple[Segment, ...]:
        return _inputs(self.node)

    def write(self, fd: int, offset: int, sources: Sources) -> None:
        for position, data in self.iter_bytes(sources):
            _write_at(fd, data, offset + position)
            del data  # let the chunk go before the next one is made: bounds peak memory

    def iter_bytes(self, sources: Sources) -> Iterator[tuple[int, memoryview]]:
        ctx, itemsize = Context(sources), dtypes.itemsize(self.dtype)
        pieces = self.node.pieces() if self.raw else None
        for box in boxes(self.node.shape):
            if pieces is not None:
                data = memoryview(np.ascontiguousarray(assemble(pieces, box, ctx, raw=True))).cast("B")
            else:
                data = dtypes.encode(evaluate(self.node, box, ctx), self.dtype)
            yield flat_start(box, self.node.shape) * itemsize, data
            del data

    def describe(self) -> str:
        what = self.node.describe()
        return f"gather of {what}" if self.raw else (what if self.node.dtype == self.dtype else f"{what} as {self.dtype}")


Producer = Copy | Compute


def produce(node: Node, dtype: str) -> Producer:
    """The producer of `node`'s values stored as `dtype`: a copy where the bytes allow, else a computation."""
    if node.computed() or node.dtype != dtype:
        if dtype not in dtypes.FLOATS or any(leaf.dtype not in dtypes.FLOATS for leaf in node.leaves()):
            raise SurgeryError(f"{node.describe()}: values can only be computed for float tensors, not {dtype}")
        return Compute(node, dtype)
    nbytes = dtypes.nbytes(dtype, node.numel)
    if isinstance(node, Source):
        return Copy(node, ((node, Run(node.info.offset, 0, nbytes, 1, 0, 0)),) if nbytes else ())
    if dtypes.BITS[dtype] % 8:
        raise SurgeryError(f"{node.describe()}: {dtype} tensors can be copied whole, not sliced or stacked")
    pieces = node.pieces()
    itemsize = dtypes.itemsize(dtype)
    out_strides = c_strides(node.shape, itemsize)
    copies = tuple(
        (piece.view.base, run)
        for piece in pieces
        for run in runs(piece.view, piece.view.base.info.offset, piece.view.base.strides, itemsize,
                        sum(a * s for a, s in zip(piece.at, out_strides)), out_strides)
    )
    count = sum(run.count for _, run in copies)
    if count and nbytes / count < MIN_COPY_RUN and count > 16:
        return Compute(node, dtype, raw=True)
    return Copy(node, copies)


def _inputs(node: Node) -> tuple[Segment, ...]:
    return tuple(Segment(leaf.store, leaf.info.file, leaf.info.offset, leaf.info.nbytes) for leaf in node.leaves())


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written

