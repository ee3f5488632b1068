"""Sharing blocks with the source on reflink filesystems (XFS, btrfs, ZFS >= 2.2, bcachefs).

There `copy_file_range` makes the destination share the source's blocks instead of copying them, but only for
whole blocks whose source and destination offsets agree modulo the block size. This module says which copied
bytes can share (`phase_weights`, `shareable_bytes`), chooses the tensor order and data start of a shard that
align as many of them as possible (`arrange`), and measures what did share once written (`SpaceProbe`: the
extent map's shared flags, else free space before and after).

The modulus is a fixed 4096 bytes (the block size of XFS, btrfs, ext4 and ZFS defaults), never the detected
one, so an output's bytes are the same on every filesystem.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path

from .copying import BLOCK
from .layout import Run

#: every tensor start stays a multiple of this (the reference writer's header padding; the widest element size)
ALIGN = 8


# ----------------------------------------------------------------------------------------------- what can share


def aligned_bytes(start: int, length: int) -> int:
    """Bytes of the range [start, start + length) that lie in whole BLOCK-aligned blocks."""
    return max(0, (length - (-start % BLOCK)) // BLOCK * BLOCK)


def phase_weights(runs: Iterable[tuple[object, Run]]) -> dict[int, int]:
    """For each start of a tensor modulo BLOCK, how many bytes of its copy `runs` would then share blocks with the
    source (a run's `src` is absolute in its file, its `dst` relative to the tensor's start)."""
    weights: Counter[int] = Counter()
    for _, run in runs:
        if run.length < BLOCK:
            continue
        period = BLOCK // gcd(BLOCK, run.src_step % BLOCK, run.dst_step % BLOCK)  # rows repeat their phases
        for k in range(min(run.count, period)):
            src, dst = run.src + k * run.src_step, run.dst + k * run.dst_step
            rows = (run.count - k + period - 1) // period
            weights[(src - dst) % BLOCK] += rows * aligned_bytes(src, run.length)
    return {phase: n for phase, n in weights.items() if n}


@dataclass(frozen=True)
class Item:
    """What the layout of a shard needs to know about one tensor: its size, `weights` (see phase_weights), and
    `origin`, where its bytes come from (sortable: source file and offset)."""

    size: int
    weights: Mapping[int, int] = field(default_factory=dict)
    origin: tuple = ()


@dataclass
class _Group:
    """Items that share at the same phase: `body` (sizes multiples of BLOCK), then optionally one `tail`."""

    origin: tuple
    body: list[int] = field(default_factory=list)
    body_weight: int = 0
    tail: int | None = None
    tail_weight: int = 0

    @property
    def weight(self) -> int:
        return self.body_weight + self.tail_weight

    @property
    def members(self) -> list[int]:
        return self.body + ([self.tail] if self.tail is not None else [])


@dataclass
class _Walk:
    """Groups placed one after the other from a data start (`start`, modulo BLOCK), with spacers between them."""

    start: int
    order: list[int] = field(default_factory=list)
    weight: int = 0


def arrange(items: Sequence[Item]) -> tuple[list[int], int | None]:
    """The file order of a shard's items (indices) and the offset its data should start at modulo BLOCK (None: no
    preference), so that as many bytes as possible can share blocks with the source. `items` come in the reference
    order (widest dtype first).

    Items are grouped by the phase they share best at: a group is its items whose sizes are multiples of BLOCK,
    which keep the phase, then at most one other item, which shifts it. The first group's phase is set by the data
    start (header padding); each further group follows if some unused items whose sizes are not multiples of BLOCK
    (spacers, preferably those stored between the two groups in the source) shift the position to its phase, and
    is left out otherwise. Both walks start with the heaviest group; one visits the others by weight, the other in
    source order from there (which reproduces the source's own spacing when its odd-sized tensors are copied too);
    the walk that aligns more bytes wins. Everything else follows in the reference order, so every item starts at
    a multiple of its element size: before it, every size is a multiple of ALIGN.
    """
    reference = range(len(items))
    groups = _groups(items)
    if not groups:
        return list(reference), None
    by_weight = sorted(groups, key=lambda p: (-groups[p].weight, p))
    by_origin = sorted(groups, key=lambda p: (groups[p].origin, p))
    first = by_origin.index(by_weight[0])
    by_origin = by_origin[first:] + by_origin[:first]
    best = max((_walk(items, groups, visits) for visits in (by_weight, by_origin)), key=lambda walk: walk.weight)
    placed = set(best.order)
    return best.order + [i for i in reference if i not in placed], best.start


def shareable_bytes(weights: Sequence[Mapping[int, int]], starts: Sequence[int]) -> int:
    """Bytes that can share blocks with the source when tensors with these `weights` start at `starts`."""
    return sum(w.get(start % BLOCK, 0) for w, start in zip(weights, starts))


def _spacer(item: Item) -> bool:
    return item.size % ALIGN == 0 and item.size % BLOCK != 0


def _groups(items: Sequence[Item]) -> dict[int, _Group]:
    """Items by the phase (a multiple of ALIGN) they share most bytes at; items sharing nothing are in none."""
    groups: dict[int, _Group] = {}
    for i, item in enumerate(items):
        usable = {p: n for p, n in item.weights.items() if p % ALIGN == 0}
        if not usable or item.size % ALIGN:
            continue
        phase = min(usable, key=lambda p: (-usable[p], p))
        group = groups.setdefault(phase, _Group(item.origin))
        group.origin = min(group.origin, item.origin)
        if item.size % BLOCK == 0:
            group.body.append(i)
            group.body_weight += usable[phase]
        elif usable[phase] > group.tail_weight:
            group.tail, group.tail_weight = i, usable[phase]
    return groups


def _walk(items: Sequence[Item], groups: dict[int, _Group], visits: list[int]) -> _Walk:
    """Place the groups in the order of their `visits` (phases), each that spacers can reach."""
    tails = {g.tail for g in groups.values()}
    spacers = [i for i, item in enumerate(items) if _spacer(item) and i not in tails]
    walk = _Walk(visits[0])
    position, after = visits[0], ()
    for phase in visits:
        group = groups[phase]
        between = sorted(spacers, key=lambda i: not after <= items[i].origin < group.origin)
        route = _route(between, items, (phase - position) % BLOCK)
        if route is None:
            continue
        spacers = [i for i in spacers if i not in route]
        walk.order += route + group.members
        walk.weight += group.weight
        position = (phase + sum(items[i].size for i in group.members)) % BLOCK
        after = group.origin
    return walk


def _route(spacers: list[int], items: Sequence[Item], shift: int) -> list[int] | None:
    """Some of `spacers` whose sizes add up to `shift` modulo BLOCK (a subset sum over residues); None if none do."""
    steps = BLOCK // ALIGN
    target = shift // ALIGN
    came_from: dict[int, tuple[int, int] | None] = {0: None}
    useless: set[int] = set()
    for i in spacers:
        if target in came_from:
            break
        step = items[i].size // ALIGN % steps
        if step in useless:
            continue
        new = {(r + step) % steps: (i, r) for r in came_from if (r + step) % steps not in came_from}
        if not new:
            useless.add(step)
        came_from.update(new)
    if target not in came_from:
        return None
    route, r = [], target
    while came_from[r] is not None:
        i, r = came_from[r]
        route.append(i)
    return sorted(route, key=spacers.index)


# ----------------------------------------------------------------------------------------------- what did share


FS_IOC_FIEMAP = 0xC020660B
FIEMAP_MAX_OFFSET = (1 << 64) - 1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
_HEADER = struct.Struct("=QQIIII")  # struct fiemap: start, length, flags, mapped extents, extent count, reserved
_EXTENT = struct.Struct("=QQQ16xI12x")  # struct fiemap_extent: logical, physical, length, (reserved), flags
_BATCH = 256


def shared_extent_bytes(path: str | os.PathLike) -> int:
    """Bytes of the file at `path` in extents the extent map (FIEMAP) flags as shared with other files.

    Raises OSError where the filesystem has no extent map (ENOTTY, EOPNOTSUPP)."""
    shared = 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for logical, length, flags in _extents(f.fileno()):
            if flags & FIEMAP_EXTENT_SHARED:
                shared += max(0, min(logical + length, size) - logical)
    return shared


def _extents(fd: int) -> Iterator[tuple[int, int, int]]:
    """(logical offset, length, flags) of every extent of the open file `fd`, from the FIEMAP ioctl."""
    start = 0
    while True:
        buf = bytearray(_HEADER.pack(start, FIEMAP_MAX_OFFSET - start, 0, 0, _BATCH, 0) + bytes(_EXTENT.size * _BATCH))
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        mapped = _HEADER.unpack_from(buf)[3]
        if not mapped:
            return
        for k in range(mapped):
            logical, _, length, flags = _EXTENT.unpack_from(buf, _HEADER.size + k * _EXTENT.size)
            yield logical, length, flags
            if flags & FIEMAP_EXTENT_LAST:
                return
        start = logical + length


@dataclass(frozen=True)
class Written:
    """What a run wrote: `written` bytes of shards, `shared` of them sharing blocks with the source (None: unknown),
    measured `how` ("extent map" or "free space")."""

    written: int
    shared: int | None
    how: str

    def describe(self) -> str:
        """One line for the command line."""
        from .report import human_bytes

        if self.shared is None:
            return f"{human_bytes(self.written)} of shards written"
        share = f"{100 * self.shared / self.written:.1f}%" if self.written else "0%"
        return (f"{human_bytes(self.written)} of shards written, {human_bytes(self.shared)} ({share}) sharing blocks "
                f"with the source, {human_bytes(self.written - self.shared)} new ({self.how})")


class SpaceProbe:
    """Measures how much of what is written into `folder` shares blocks with other files: from the extent map where
    the filesystem has one, else from its free space before (when made) and after (`measure`). Measuring never
    fails a run: what cannot be measured is None."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.free = self._free()

    def measure(self, paths: Sequence[Path]) -> Written:
        written = sum(p.stat().st_size for p in paths)
        try:
            return Written(written, sum(shared_extent_bytes(p) for p in paths), "extent map")
        except OSError:
            pass
        if self.free is None or (free := self._free()) is None:
            return Written(written, None, "unknown")
        return Written(written, min(written, max(0, written - (self.free - free))), "free space")

    def _free(self) -> int | None:
        try:
            stat = os.statvfs(self.folder)
        except (OSError, AttributeError):
            return None
        return stat.f_bavail * stat.f_frsize
