"""What an output tensor is: a tree of nodes over source tensors and new values, evaluated a box at a time.

Leaves are `Source` tensors (bytes in a file) and `Init` tensors (drawn from a seeded stream). Layout nodes
(`Slice`, `Take`, `Concat`, `Stack`) only rearrange elements: they are described by `Piece`s (views of bases
placed in the output), so a tree of them over sources is a byte copy. Value nodes (`Scale`, `Add`, `Mean`, `Cast`,
`Noise`, `Reinit`) compute float values for any box of their output, from their children's values for that box.
Every node is immutable; what a run accumulates (open random streams, statistics) lives in its `Context`.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from . import dtypes
from .checkpoint import FileStore, TensorInfo
from .errors import SurgeryError
from .layout import Piece, View, c_strides, intersect, runs, slice_pieces, take_pieces
from .randomness import RandomStream

Box = tuple[tuple[int, int], ...]

#: elements per computed box: bounds the memory of every computation (4 MiB as float32)
CHUNK_ELEMENTS = 1 << 20
#: a source run shorter than this is read as part of one covering read, not by its own system call
SMALL_RUN = 512


class Context:
    """One evaluation of a tree: the open source files, and each node's state (random streams, statistics)."""

    def __init__(self, sources: object):
        self.sources = sources
        self.state: dict[int, dict] = {}

    def of(self, node: Node) -> dict:
        return self.state.setdefault(id(node), {})


class Node:
    """An output value: its shape and dtype; `pieces()` says where its elements come from."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def pieces(self) -> list[Piece]:
        return [Piece(View.whole(self, self.shape), (0,) * len(self.shape))]

    def children(self) -> tuple[Node, ...]:
        return ()

    def leaves(self) -> list[Source]:
        """The source tensors this value reads, in tree order."""
        out: list[Source] = []
        for child in self.children():
            out += [leaf for leaf in child.leaves() if leaf not in out]
        return out

    def computed(self) -> bool:
        """Whether any value is made in Python (else the output is source bytes, rearranged)."""
        return any(child.computed() for child in self.children())

    def describe(self) -> str:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------- leaves


@dataclass(frozen=True, eq=False)
class Source(Node):
    """A source tensor, read from its file."""

    info: TensorInfo
    store: FileStore = field(repr=False)

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.info.shape

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.info.dtype

    @property
    def strides(self) -> tuple[int, ...]:
        return c_strides(self.shape, dtypes.itemsize(self.dtype))

    def leaves(self) -> list[Source]:
        return [self]

    def computed(self) -> bool:
        return False

    def describe(self) -> str:
        return self.info.name


class Computed(Node):
    """A base whose values are made in Python, for any box of its output."""

    def computed(self) -> bool:
        return True

    def compute(self, box: Box, ctx: Context) -> np.ndarray:
        raise NotImplementedError


class _OneChild(Node):
    """A node over one `child`, with its shape and dtype unless it says otherwise."""

    child: Node

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.child.shape

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.child.dtype

    def children(self) -> tuple[Node, ...]:
        return (self.child,)


class _Parts(Node):
    """A node over several `parts` of one dtype, shaped like the first unless it says otherwise."""

    parts: tuple[Node, ...]

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.parts[0].shape

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.parts[0].dtype

    def children(self) -> tuple[Node, ...]:
        return self.parts


@dataclass(frozen=True, eq=False)
class Init(Computed):
    """A new tensor: zeros, normal(0, scale), uniform(-scale, scale), or orthogonal (orthogonal rows of norm
    scale * sqrt(columns), like normal rows'), drawn from the stream of (seed, key)."""

    kind: str
    shape: tuple[int, ...]
    dtype: str
    scale: float
    seed: int
    key: str

    def compute(self, box: Box, ctx: Context) -> np.ndarray:
        if self.kind == "zeros":
            return np.zeros(_box_shape(box), dtype=np.float32)
        if self.kind == "orthogonal":
            state = ctx.of(self)
            if "matrix" not in state:
                draws = RandomStream(self.seed, self.key).normal(self.numel).reshape(self.shape)
                state["matrix"] = orthonormal_rows(draws) * (self.scale * math.sqrt(self.shape[1]))
            return state["matrix"][tuple(slice(a, b) for a, b in box)]
        values = _draw_box(self, box, ctx, self.kind, self.seed, self.key)
        if self.kind == "uniform":
            values = values * 2.0 - 1.0  # exact: uniform in [-1, 1)
        return values * self.scale

    def describe(self) -> str:
        return "zeros" if self.kind == "zeros" else f"{self.kind}({self.scale:g}, key {self.key!r})"


# ----------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True, eq=False)
class Slice(_OneChild):
    """Elements start, start + step, ... (< stop) along dim."""

    child: Node
    dim: int
    start: int
    stop: int
    step: int = 1

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        shape = list(self.child.shape)
        shape[self.dim] = len(range(self.start, self.stop, self.step))
        return tuple(shape)

    def pieces(self) -> list[Piece]:
        return slice_pieces(self.child.pieces(), self.dim, self.start, self.stop, self.step)

    def describe(self) -> str:
        step = f":{self.step}" if self.step != 1 else ""
        return f"slice({self.child.describe()}, dim {self.dim}, {self.start}:{self.stop}{step})"


@dataclass(frozen=True, eq=False)
class Take(_OneChild):
    """Output element j along dim is input element indices[j] (rows picked, reordered or repeated); with a single
    integer `index` instead, that element alone and the dim removed."""

    child: Node
    dim: int
    indices: tuple[int, ...] = ()
    index: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        shape = list(self.child.shape)
        if self.index is not None:
            del shape[self.dim]
        else:
            shape[self.dim] = len(self.indices)
        return tuple(shape)

    def pieces(self) -> list[Piece]:
        if self.index is None:
            return take_pieces(self.child.pieces(), self.dim, list(self.indices))
        picked = slice_pieces(self.child.pieces(), self.dim, self.index, self.index + 1)
        return [Piece(p.view.drop(self.dim), p.at[:self.dim] + p.at[self.dim + 1:]) for p in picked]

    def describe(self) -> str:
        which = self.index if self.index is not None else _short_list(self.indices)
        return f"take({self.child.describe()}, dim {self.dim}, {which})"


@dataclass(frozen=True, eq=False)
class Concat(_Parts):
    parts: tuple[Node, ...]
    dim: int

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        shape = list(self.parts[0].shape)
        shape[self.dim] = sum(p.shape[self.dim] for p in self.parts)
        return tuple(shape)

    def pieces(self) -> list[Piece]:
        out, offset = [], 0
        for part in self.parts:
            out += [p.shift(self.dim, offset) for p in part.pieces()]
            offset += part.shape[self.dim]
        return out

    def describe(self) -> str:
        return f"concat(dim {self.dim}: {', '.join(p.describe() for p in self.parts)})"


@dataclass(frozen=True, eq=False)
class Stack(_Parts):
    """A new leading dim: element i is parts[i] (e.g. one per expert: a fused [E, ...] layout)."""

    parts: tuple[Node, ...]
    label: str = "stack"

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (len(self.parts), *self.parts[0].shape)

    def pieces(self) -> list[Piece]:
        return [Piece(p.view.insert(0), (i, *p.at)) for i, part in enumerate(self.parts) for p in part.pieces()]

    def describe(self) -> str:
        return f"{self.label}({self.parts[0].describe()}, ... {len(self.parts)} parts)"


# ----------------------------------------------------------------------------------------------- values


@dataclass(frozen=True, eq=False)
class Scale(_OneChild, Computed):
    child: Node
    factor: float

    def compute(self, box: Box, ctx: Context) -> np.ndarray:
        values = evaluate(self.child, box, ctx)
        if values.dtype == np.float32 and not exact_in_float32(self.factor, self.child.dtype):
            values = values.astype(np.float64)  # so the product is rounded once, when encoded
        values *= values.dtype.type(self.factor)
        return values

    def describe(self) -> str:
        return f"scale({self.child.describe()}, {self.factor:g})"


@dataclass(frozen=True, eq=False)
class Add(_Parts, Computed):
    parts: tuple[Node, ...]

    def compute(self, box: Box, ctx: Context) -> np.ndarray:
        total = evaluate(self.parts[0], box, ctx).astype(np.float64)
        for part in self.parts[1:]:
            total += evaluate(part, box, ctx)
        return total

    def describe(self) -> str:
        return f"add({', '.join(p.describe() for p in self.parts)})"


@dataclass(frozen=True, eq=False)
class Mean(Add):
    """The mean of its parts (e.g. over experts), summed in float64 and rounded once when encoded."""

    label: str = "mean"

    def compute(self, box: Box, ctx: Context) -> np.ndarray:
        total = super().compute(box, ctx)
        total /= len(self.parts)
        return total

    def describe(self) -> str:
        return f"{self.label}({self.parts[0].describe()}, ... {len(self.parts)} parts)"


@dataclass(frozen=True, eq=False)
class Cast(_OneChild, Computed):
    """The child's values rounded to dtype `to` (as a stored tensor of that dtype would hold them)."""

    child: Node
    to: str

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.to

    def compute(self, box: Box, ctx: Context) -> np.ndarray:
        return dtypes.decode(dtypes.encode(evaluate(self.child, box, ctx), self.dtype), self.dtype).reshape(
            _box_shape(box)
        )

    def describe(self) -> str:
        return f"cast({self.child.describe()}, {self.dtype})"


@dataclass(frozen=True, eq=False)
class Noise(_OneChild, Computed):
    """The child plus Gaussian noise of std `std` (times the child's own std if `relative`), from (seed, key)."""

    child: Node
    std: float
    relative: bool
    seed: int
    key: str

    def compute(self, box: Box, ctx: Context) -> np.ndarray:
        std = self.std * (statistics(self.child, ctx)[1] if self.relative else 1.0)
        values = evaluate(self.child, box, ctx).astype(np.float64)
        values += _draw_box(self, box, ctx, "normal", self.seed, self.key) * std
        return values

    def describe(self) -> str:
        return f"noise({self.child.describe()}, std {self.std:g}{' relative' if self.relative else ''})"


@dataclass(frozen=True, eq=False)
class Reinit(_OneChild, Computed):
    """Drop-Upcycling's masked re-initialisation of a matrix: floor(fraction * n) of the n rows (dim 0) or columns
    (dim 1), chosen by the stream of (seed, key) (so tensors sharing a key share the choice), are re-drawn from a
    normal with the mean and std of the entries they replace; every other entry is kept."""

    child: Node
    dim: int
    fraction: float
    seed: int
    key: str
    draw_key: str

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.child.shape

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.child.dtype

    @property
    def count(self) -> int:
        return math.floor(self.fraction * self.shape[self.dim])

    def children(self) -> tuple[Node, ...]:
        return (self.child,)

    def chosen(self, ctx: Context) -> np.ndarray:
        """The re-drawn rows or columns, sorted: the first `count` of a random permutation."""
        state = ctx.of(self)
        if "chosen" not in state:
            state["chosen"] = np.sort(chosen_indices(self.seed, self.key, self.shape[self.dim], self.count))
        return state["chosen"]

    def compute(self, box: Box, ctx: Context) -> np.ndarray:
        rows, cols = self.shape
        cover = ((box[0][0], box[0][1]), (0, cols))  # whole rows: the draws are in row-major order
        values = evaluate(self.child, cover, ctx).astype(np.float64)
        chosen, (mean, std) = self.chosen(ctx), self._statistics(ctx)
        (r0, r1), _ = cover
        if self.dim == 0:
            picked = chosen[(chosen >= r0) & (chosen < r1)]
            before = int(np.searchsorted(chosen, r0)) * cols
            draws = _draws(self, ctx, "normal", self.seed, self.draw_key, before, picked.size * cols)
            values[picked - r0] = draws.reshape(picked.size, cols) * std + mean
        else:
            draws = _draws(self, ctx, "normal", self.seed, self.draw_key, r0 * chosen.size, (r1 - r0) * chosen.size)
            values[:, chosen] = draws.reshape(r1 - r0, chosen.size) * std + mean
        return values[:, box[1][0]:box[1][1]]

    def _statistics(self, ctx: Context) -> tuple[float, float]:
        state = ctx.of(self)
        if "stats" not in state:
            state["stats"] = statistics(self.child, ctx, self.dim, self.chosen(ctx))
        return state["stats"]

    def describe(self) -> str:
        what = "rows" if self.dim == 0 else "columns"
        return f"reinit({self.child.describe()}, {self.count} {what}, key {self.key!r})"


# ----------------------------------------------------------------------------------------------- evaluation


def evaluate(node: Node, box: Box, ctx: Context) -> np.ndarray:
    """The float values of `box` of `node`'s output (float64 where a single rounding needs it, else float32)."""
    if isinstance(node, Computed):
        return node.compute(box, ctx)
    return assemble(node.pieces(), box, ctx, raw=False)


def assemble(pieces: list[Piece], box: Box, ctx: Context, raw: bool) -> np.ndarray:
    """The elements of `box` from `pieces`: raw element words of sources (`raw`), or float values."""
    parts = [(p.box(), read(p.view, ctx, raw)) for p in (intersect(piece, box) for piece in pieces) if p is not None]
    shape = _box_shape(box)
    if len(parts) == 1 and parts[0][1].shape == shape:
        return parts[0][1]
    dtype = np.result_type(*(values.dtype for _, values in parts)) if parts else np.float32
    out = np.empty(shape, dtype=dtype)
    for region, values in parts:
        out[tuple(slice(a, b) for a, b in region)] = values
    return out


def read(view: View, ctx: Context, raw: bool) -> np.ndarray:
    """The elements of a view: from a source's bytes (raw words, or decoded), or from computed values."""
    base = view.base
    if isinstance(base, Source):
        words = read_words(view, base, ctx)
        return words if raw else dtypes.decode(words, base.dtype).reshape(view.shape)
    cover = view.cover(len(base.shape))
    return _pick(base.compute(cover, ctx), view, cover)


def read_words(view: View, source: Source, ctx: Context) -> np.ndarray:
    """A source view's elements as little-endian unsigned words (one per element), read run by run."""
    itemsize = dtypes.itemsize(source.dtype)
    words = np.empty(view.shape, dtype=f"<u{itemsize}")
    out = memoryview(words.reshape(-1).view(np.uint8))
    fd = ctx.sources.fd_for(source.store, source.info.file)
    for run in runs(view, source.info.offset, source.strides, itemsize, 0, c_strides(view.shape, itemsize)):
        if run.count > 1 and run.length < SMALL_RUN and run.src_step <= 8 * run.length:
            _read_covering(fd, run, out, source.info.file)
            continue
        for k in range(run.count):
            _read_exactly(fd, out[run.dst + k * run.dst_step:][:run.length], run.src + k * run.src_step,
                          source.info.file)
    return words


def _read_covering(fd: int, run, out: memoryview, file: str) -> None:
    """Small strided runs: one read of the whole span, then the runs picked out of it with numpy."""
    span = run.src_step * (run.count - 1) + run.length
    buffer = bytearray(span)
    _read_exactly(fd, memoryview(buffer), run.src, file)
    source = np.frombuffer(buffer, dtype=np.uint8)
    picked = np.lib.stride_tricks.as_strided(source, (run.count, run.length), (run.src_step, 1))
    target = np.frombuffer(out, dtype=np.uint8)
    np.lib.stride_tricks.as_strided(target[run.dst:], (run.count, run.length), (run.dst_step, 1))[...] = picked


def _read_exactly(fd: int, into: memoryview, offset: int, file: str) -> None:
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], offset + done)
        if n == 0:
            raise SurgeryError(f"{file}: ended early while reading (was it truncated?)")
        done += n


def statistics(node: Node, ctx: Context, dim: int | None = None, chosen: np.ndarray | None = None
               ) -> tuple[float, float]:
    """(mean, std) of a node's values, or of the rows (dim 0) / columns (dim 1) `chosen` of a matrix: one
    streaming pass, float64 sums."""
    state = ctx.of(node)
    key = ("stats", dim, None if chosen is None else chosen.tobytes())
    if key not in state:
        count, mean, m2 = 0, 0.0, 0.0  # combined box by box (Chan et al.): accurate for any size
        for box in boxes(node.shape):
            values = evaluate(node, box, ctx).astype(np.float64)
            if dim == 0:
                values = values[chosen[(chosen >= box[0][0]) & (chosen < box[0][1])] - box[0][0]]
            elif dim == 1:
                values = values[:, chosen]
            if not values.size:
                continue
            box_mean = float(values.mean())
            box_m2 = float(np.square(values - box_mean).sum())
            total = count + values.size
            delta = box_mean - mean
            mean += delta * values.size / total
            m2 += box_m2 + delta * delta * count * values.size / total
            count = total
        state[key] = (mean, math.sqrt(m2 / count) if count else 0.0)
    return state[key]


def orthonormal_rows(matrix: np.ndarray) -> np.ndarray:
    """Modified Gram-Schmidt on the rows (no more rows than columns), with every dot product summed exactly
    (math.fsum): the same bits on every machine, unlike a BLAS or LAPACK routine."""
    rows = np.array(matrix, dtype=np.float64)
    for i in range(rows.shape[0]):
        for j in range(i):
            rows[i] -= math.fsum(rows[i] * rows[j]) * rows[j]
        norm = math.sqrt(math.fsum(rows[i] * rows[i]))
        if norm == 0:
            raise SurgeryError("orthogonal init: a random row is a combination of the others; change the seed")
        rows[i] /= norm
    return rows


def chosen_indices(seed: int, key: str, n: int, count: int) -> np.ndarray:
    """The first `count` of a random permutation of range(n), from the stream of (seed, key)."""
    order = np.argsort(RandomStream(seed, key).uniform(n), kind="stable")
    return order[:count]


def boxes(shape: tuple[int, ...], limit: int | None = None) -> Iterator[Box]:
    """Boxes covering an array in C order, each contiguous and of at most `limit` (default CHUNK_ELEMENTS)
    elements, or one row of the innermost dim."""
    limit = limit or CHUNK_ELEMENTS
    if not shape:
        yield ()
        return
    k = 0
    while k < len(shape) - 1 and math.prod(shape[k + 1:]) > limit:
        k += 1
    inner = math.prod(shape[k + 1:])
    rows = max(1, limit // max(inner, 1))
    for outer in itertools.product(*(range(n) for n in shape[:k])):
        for a in range(0, shape[k], rows):
            yield tuple((i, i + 1) for i in outer) + ((a, min(a + rows, shape[k])),) + tuple((0, n) for n in shape[k + 1:])


def flat_start(box: Box, shape: tuple[int, ...]) -> int:
    """Flat (C-order) index of a box's first element."""
    return sum(begin * stride for (begin, _), stride in zip(box, c_strides(shape, 1)))


def exact_in_float32(factor: float, dtype: str) -> bool:
    """Whether x * factor is exact in float32 for every x of `dtype`, so the product is rounded once, on encoding."""
    if not math.isfinite(factor) or factor == 0:
        return factor == 0
    mantissa, _ = math.frexp(abs(factor))
    bits = len(bin(int(mantissa * 2**53)).rstrip("0")) - 2  # significant bits of the factor
    return bits + {"BF16": 8, "F16": 11, "F32": 24}.get(dtype, 53) <= 24


def _draw_box(node: Node, box: Box, ctx: Context, kind: str, seed: int, key: str) -> np.ndarray:
    """The draws of a random stream that fall in `box` of `node`'s output, element i of the output taking draw i.

    A small output's draws are made once and kept, so that reading its rows in any order costs nothing more.
    """
    if node.numel <= CHUNK_ELEMENTS:
        state = ctx.of(node)
        if ("all", key) not in state:
            state[("all", key)] = getattr(RandomStream(seed, key), kind)(node.numel).reshape(node.shape)
        return state[("all", key)][tuple(slice(a, b) for a, b in box)]
    cover = _contiguous_cover(box, node.shape)
    start = flat_start(cover, node.shape)
    draws = _draws(node, ctx, kind, seed, key, start, math.prod(_box_shape(cover))).reshape(_box_shape(cover))
    return draws[tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(box, cover))]


def _draws(node: Node, ctx: Context, kind: str, seed: int, key: str, start: int, n: int) -> np.ndarray:
    """Draws start .. start + n of the stream of (seed, key): cheap when asked in order, as boxes are."""
    state = ctx.of(node).setdefault(("draws", key), {"stream": None, "at": 0})
    if state["stream"] is None or start < state["at"]:
        state["stream"], state["at"] = RandomStream(seed, key), 0
    stream = state["stream"]
    while state["at"] < start:
        skip = min(start - state["at"], CHUNK_ELEMENTS)
        getattr(stream, kind)(skip)
        state["at"] += skip
    state["at"] += n
    return getattr(stream, kind)(n)


def _contiguous_cover(box: Box, shape: tuple[int, ...]) -> Box:
    """The smallest box holding `box` that is contiguous in C order: every axis after the first that is not a single
    index taken whole."""
    out = list(box)
    for k, (a, b) in enumerate(box):
        if b - a != 1:
            out[k + 1:] = [(0, n) for n in shape[k + 1:]]
            break
    return tuple(out)


def _pick(values: np.ndarray, view: View, cover: Box) -> np.ndarray:
    """A view's elements out of its base's values for `cover`: strided picks, then axes in the view's order."""
    index: list[object] = []
    dims: list[int] = []
    for d, (begin, _) in enumerate(cover):
        axis = next((a for a in view.axes if a.dim == d and a.size > 1), None)
        first = view.start[d] - begin
        if axis is None:
            index.append(first)
        else:
            index.append(slice(first, first + axis.step * (axis.size - 1) + 1, axis.step))
            dims.append(d)
    picked = values[tuple(index)]
    order = [dims.index(a.dim) for a in view.axes if a.size > 1]
    return picked.transpose(order).reshape(view.shape)


def _box_shape(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def _short_list(values: tuple[int, ...]) -> str:
    return str(list(values)) if len(values) <= 8 else f"[{', '.join(map(str, values[:8]))}, ...]"
