"""Layout: which elements of a base (a source tensor, or computed values) an output's elements are, as views.

A `View` maps its coordinates onto a base, numpy-style: along each view axis, a step along one base dimension (or a
new axis of length 1). Slices, index lists, repeats, concatenations and stacks only move views around (`Piece`s:
a view and where it sits in the output), so any tree of them over source tensors ends as a few views per output
tensor, and each view compiles to strided byte copies: `Run`s of `length` bytes, `count` times, stepping through
source and destination. A column slice or an expert stack stays a handful of runs, never one per element.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Axis:
    """One axis of a view: `size` elements `step` apart along base dimension `dim` (None: an inserted axis)."""

    dim: int | None
    step: int
    size: int


@dataclass(frozen=True)
class View:
    """Elements of `base`: view coordinate i is base coordinate start + sum of steps along each axis's dim."""

    base: object
    start: tuple[int, ...]
    axes: tuple[Axis, ...]

    @classmethod
    def whole(cls, base: object, shape: tuple[int, ...]) -> View:
        return cls(base, (0,) * len(shape), tuple(Axis(d, 1, n) for d, n in enumerate(shape)))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.size for a in self.axes)

    def slice(self, d: int, start: int, stop: int, step: int = 1) -> View:
        """Elements start, start + step, ... (< stop) along axis d."""
        axis = self.axes[d]
        size = len(range(start, stop, step))
        begin = list(self.start)
        if axis.dim is not None:
            begin[axis.dim] += start * axis.step
        axes = list(self.axes)
        axes[d] = Axis(axis.dim, axis.step * step if size > 1 else axis.step, size)
        return View(self.base, tuple(begin), tuple(axes))

    def drop(self, d: int) -> View:
        """Remove axis d, which must have length 1."""
        assert self.axes[d].size == 1
        return View(self.base, self.start, self.axes[:d] + self.axes[d + 1:])

    def insert(self, d: int) -> View:
        """A new axis of length 1 at position d."""
        return View(self.base, self.start, self.axes[:d] + (Axis(None, 0, 1),) + self.axes[d:])

    def permute(self, order: tuple[int, ...]) -> View:
        return View(self.base, self.start, tuple(self.axes[i] for i in order))

    def cover(self, ndim: int) -> tuple[tuple[int, int], ...]:
        """The smallest box of the base (a (begin, end) per base dimension) holding every element of the view."""
        low, high = list(self.start), [s + 1 for s in self.start]
        for axis in self.axes:
            if axis.dim is not None and axis.size > 1:
                span = axis.step * (axis.size - 1)
                low[axis.dim] += min(span, 0)
                high[axis.dim] += max(span, 0)
        return tuple(zip(low, high))[:ndim]


@dataclass(frozen=True)
class Piece:
    """A view placed in an output: its element (0, ..., 0) is output coordinate `at`."""

    view: View
    at: tuple[int, ...]

    def slice(self, d: int, start: int, stop: int, step: int = 1) -> Piece | None:
        """The part of this piece that output elements start, start + step, ... (< stop) along axis d take, placed
        where those elements go in the sliced output; None if it has none of them."""
        first, size = self.at[d], self.view.axes[d].size
        low = max(first, start)
        low = start + -(-(low - start) // step) * step  # the first selected coordinate inside the piece
        high = min(first + size, stop)
        if low >= high:
            return None
        count = len(range(low, high, step))
        view = self.view.slice(d, low - first, low - first + (count - 1) * step + 1, step)
        at = self.at[:d] + ((low - start) // step,) + self.at[d + 1:]
        return Piece(view, at)

    def shift(self, d: int, by: int) -> Piece:
        return Piece(self.view, self.at[:d] + (self.at[d] + by,) + self.at[d + 1:])

    def box(self) -> tuple[tuple[int, int], ...]:
        return tuple((a, a + n) for a, n in zip(self.at, self.view.shape))


def slice_pieces(pieces: list[Piece], d: int, start: int, stop: int, step: int = 1) -> list[Piece]:
    return [p for p in (piece.slice(d, start, stop, step) for piece in pieces) if p is not None]


def take_pieces(pieces: list[Piece], d: int, indices: list[int]) -> list[Piece]:
    """Output element j along axis d is input element indices[j]: runs of consecutive indices stay one piece each."""
    out: list[Piece] = []
    j = 0
    while j < len(indices):
        end = j + 1
        while end < len(indices) and indices[end] == indices[end - 1] + 1:
            end += 1
        out += [p.shift(d, j) for p in slice_pieces(pieces, d, indices[j], indices[end - 1] + 1)]
        j = end
    return out


def intersect(piece: Piece, box: tuple[tuple[int, int], ...]) -> Piece | None:
    """The part of a piece inside an output box, placed relative to the box's corner."""
    for d, (begin, end) in enumerate(box):
        piece = piece.slice(d, begin, end)
        if piece is None:
            return None
    return piece


@dataclass(frozen=True)
class Run:
    """`count` copies of `length` bytes: the k-th from src + k * src_step to dst + k * dst_step."""

    src: int
    dst: int
    length: int
    count: int
    src_step: int
    dst_step: int

    @property
    def nbytes(self) -> int:
        return self.length * self.count


def c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Byte strides of a C-contiguous array of `shape`."""
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def runs(view: View, base_offset: int, base_strides: tuple[int, ...], itemsize: int, dst: int,
         dst_strides: tuple[int, ...]) -> list[Run]:
    """Strided byte copies moving `view` of a base laid out with `base_strides` (bytes, from `base_offset`) to a
    destination laid out with `dst_strides` (one per view axis, from `dst`)."""
    shape = view.shape
    if 0 in shape:
        return []
    src, src_strides, inner, k = _contiguous_tail(view, base_offset, base_strides, itemsize, dst_strides)
    if k < 0:
        return [Run(src, dst, inner, 1, 0, 0)]
    out = []
    for outer in itertools.product(*(range(n) for n in shape[:k])):
        s = src + sum(i * st for i, st in zip(outer, src_strides))
        t = dst + sum(i * st for i, st in zip(outer, dst_strides))
        out.append(Run(s, t, inner, shape[k], src_strides[k], dst_strides[k]))
    return out


def count_runs(view: View, base_strides: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    """(number of byte ranges, bytes each) that copying `view` into a C-contiguous destination takes."""
    shape = view.shape
    if 0 in shape:
        return 0, 0
    _, _, inner, k = _contiguous_tail(view, 0, base_strides, itemsize, c_strides(shape, itemsize))
    return math.prod(shape[:k + 1]), inner


def _contiguous_tail(view: View, base_offset: int, base_strides: tuple[int, ...], itemsize: int,
                     dst_strides: tuple[int, ...]) -> tuple[int, list[int], int, int]:
    """(source offset of element 0, source byte strides per axis, bytes of the contiguous tail, last axis before
    it): trailing axes that are contiguous in both source and destination are copied as one run."""
    src_strides = [0 if a.dim is None else a.step * base_strides[a.dim] for a in view.axes]
    src = base_offset + sum(s * base_strides[d] for d, s in enumerate(view.start))
    inner, k = itemsize, len(view.axes) - 1
    while k >= 0 and (view.axes[k].size == 1 or (src_strides[k] == inner and dst_strides[k] == inner)):
        inner *= view.axes[k].size
        k -= 1
    return src, src_strides, inner, k
