"""Writing planned tensors as Hugging Face safetensors shards, each header known before its data."""

from __future__ import annotations

import json
import math
import os
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from . import dtypes
from .checkpoint import INDEX_NAME, SINGLE_NAME
from .copying import share_blocks, write_all
from .errors import SurgeryError, os_error
from .header import build_header
from .producers import Copy, Producer, Sources
from .sharing import ALIGN, BLOCK, Item, arrange, phase_weights, shareable_bytes
from .workers import balanced, run_split

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
TEMP_SUFFIX = ".partial"
#: a phase class gets shards of its own only with this many shareable bytes (at most 1/8 of a shard)
CLASS_MIN_BYTES = 64 * 2**20


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: its name, dtype, shape and how its bytes are produced."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    producer: Producer

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return dtypes.nbytes(self.dtype, self.numel)


def shard_layout(tensors: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """The output's shards: `split` by size and phase class (see `phase_classes`)."""
    classes = phase_classes(tensors, min(CLASS_MIN_BYTES, max_shard_bytes // 8))
    return [[tensors[i] for i in shard] for shard in split([t.nbytes for t in tensors], classes, max_shard_bytes)]


def split(sizes: list[int], classes: list[int | None], max_shard_bytes: int) -> list[list[int]]:
    """Indices of items split greedily in order, as huggingface_hub's split_torch_state_dict_into_shards does, but
    with one shard being filled per class: copies from source files whose data sit at unrelated offsets modulo
    BLOCK cannot all share blocks in one file (see `sharing`), so they go to different shards. An item without a
    class (None) joins the shard of the item before it; a shard is closed when full, or when the next item has
    another class and none of its own are left.

    With one class or none this is exactly huggingface_hub's split."""
    last = {c: i for i, c in enumerate(classes)}  # where each class's last item is
    shards: list[list[int]] = []
    filling: dict[int | None, list[int]] = {}  # class -> the shard being filled
    filled: dict[int | None, int] = {}  # class -> its bytes
    current: int | None = None
    for i, (size, cls) in enumerate(zip(sizes, classes)):
        if size > max_shard_bytes:  # as huggingface_hub: alone, before the shard being filled
            shards.append([i])
            continue
        if cls is not None and cls != current:
            if current is None and None in filling:  # items without a class came first: theirs is this one
                filling[cls], filled[cls] = filling.pop(None), filled.pop(None)
            elif current in filling and last[current] < i:  # nothing of its class is left: close it
                shards.append(filling.pop(current))
            current = cls
        if filling.get(current) and filled[current] + size > max_shard_bytes:
            shards.append(filling.pop(current))
        if current not in filling:
            filling[current], filled[current] = [], 0
        filling[current].append(i)
        filled[current] += size
    return shards + list(filling.values()) or [[]]


def phase_classes(tensors: list[OutputTensor], least: int) -> list[int | None]:
    """Each tensor's phase class: the phases (starts modulo BLOCK, see `copy_phases`) at which copies share blocks,
    joined when copies from one source file share at both (`sharing.arrange` can line up one file's tensors in one
    shard with that file's odd-sized ones between them), named by their smallest. None for a tensor that shares
    nothing, or whose class holds fewer than `least` shareable bytes in the whole output."""
    parent: dict[int, int] = {}

    def root(phase: int) -> int:
        while parent.setdefault(phase, phase) != phase:
            phase = parent[phase]
        return phase

    best: list[tuple[int, int] | None] = []
    file_phase: dict[tuple[str, str], int] = {}
    for t in tensors:
        usable = {p: n for p, n in copy_phases(t).items() if p % ALIGN == 0}
        if not usable or t.nbytes % ALIGN:
            best.append(None)
            continue
        best.append(min(usable.items(), key=lambda pn: (-pn[1], pn[0])))
        for source, _ in t.producer.runs:
            a, b = root(best[-1][0]), root(file_phase.setdefault((source.store.key, source.info.file), best[-1][0]))
            parent[max(a, b)] = min(a, b)
    totals: dict[int, int] = {}
    for b in filter(None, best):
        totals[root(b[0])] = totals.get(root(b[0]), 0) + b[1]
    return [root(b[0]) if b and totals[root(b[0])] >= least else None for b in best]


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def data_order(shard: list[OutputTensor]) -> list[OutputTensor]:
    """Order within a shard: widest dtype first, so every tensor starts aligned to its element size."""
    return sorted(shard, key=lambda t: -dtypes.itemsize(t.dtype))


def file_order(shard: list[OutputTensor]) -> tuple[list[OutputTensor], int | None]:
    """The order of a shard's tensors in its file and where its data should start modulo BLOCK (None: anywhere),
    so that as many copied bytes as possible sit at their source's offsets modulo BLOCK (see sharing.arrange).

    Without copies that could share blocks, this is `data_order` and no padding."""
    widest_first = data_order(shard)
    order, phase = arrange([Item(t.nbytes, copy_phases(t), read_position(t)) for t in widest_first])
    return [widest_first[i] for i in order], phase


def copy_phases(tensor: OutputTensor) -> dict[int, int]:
    """For each start of `tensor` modulo BLOCK, how many of its bytes could then share blocks with the source."""
    return phase_weights(tensor.producer.runs) if isinstance(tensor.producer, Copy) else {}


def pad_header(header: bytes, data_phase: int | None) -> bytes:
    """`header` with its JSON right-padded with spaces so that the data starts at `data_phase` modulo BLOCK."""
    if data_phase is None:
        return header
    text = header[8:] + b" " * ((data_phase - len(header)) % BLOCK)
    return len(text).to_bytes(8, "little") + text


@dataclass(frozen=True)
class Shard:
    """One output file: its name, its tensors in file order, and its header bytes (known before any data)."""

    name: str
    tensors: tuple[OutputTensor, ...]
    header: bytes

    @property
    def offsets(self) -> list[int]:
        """Where each tensor's bytes start in the file."""
        starts, position = [], len(self.header)
        for t in self.tensors:
            starts.append(position)
            position += t.nbytes
        return starts

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def size(self) -> int:
        return len(self.header) + self.nbytes

    @property
    def shareable(self) -> int:
        """Bytes of copies at their source's offsets modulo BLOCK, in whole blocks: what a reflink filesystem can
        share with the source instead of writing."""
        return shareable_bytes([copy_phases(t) for t in self.tensors], self.offsets)


def plan_shards(tensors: list[OutputTensor], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Shard]:
    """The output files for `tensors`: Hugging Face's greedy split, one shard filled per phase class (see
    `shard_layout`), names, and each file's tensor order and header, padded so that copies can share blocks with
    their source on reflink filesystems (see `file_order`)."""
    layout = shard_layout(tensors, max_shard_bytes)
    shards = []
    for name, members in zip(shard_names(len(layout)), layout):
        ordered, phase = file_order(members)
        header = build_header([(t.name, t.dtype, t.shape, t.nbytes) for t in ordered], {"format": "pt"})
        shards.append(Shard(name, tuple(ordered), pad_header(header, phase)))
    return shards


def write_checkpoint(
    tensors: list[OutputTensor],
    folder: str | os.PathLike,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[int], None] = lambda n: None,
) -> list[str]:
    """Write `tensors` into `folder` as shards plus, if several, the index; return the files written.

    On any exception every file this call created is removed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(tensors, max_shard_bytes)
    try:
        write_shards(shards, folder, progress)
        if len(shards) > 1:
            write_index(folder, shards)
    except BaseException:
        for name in [s.name for s in shards] + [s.name + TEMP_SUFFIX for s in shards] + [INDEX_NAME]:
            (folder / name).unlink(missing_ok=True)
        raise
    return [s.name for s in shards] + ([INDEX_NAME] if len(shards) > 1 else [])


def write_shards(shards: list[Shard], folder: Path, progress: Callable[[int], None] = lambda n: None,
                 share: bool = True, jobs: int = 1) -> None:
    """Write `shards` into `folder`; each takes its final name as soon as its last tensor is in.

    Every shard's header is written first (it is known from the plan); then tensors are written into their
    places in the order their source bytes are stored, so each source file is read in one stretch and can be
    released (evicted) right after. With `jobs` > 1 that order is cut into as many stretches of about equal bytes,
    each written by a forked process (see `workers`). Until complete, a shard has a temporary name; on any
    exception the temporary files are removed (complete shards stay: a resumed run keeps them). Without `share`,
    copies are real copies even where the filesystem could share blocks with the source.
    """
    files = _ShardFiles(folder)
    try:
        with share_blocks(share):
            slots = _start(shards, files)
            remaining = Counter(shard.name for _, shard, _ in slots)

            def done(k: int) -> None:
                tensor, shard, _ = slots[k]
                progress(tensor.nbytes)
                remaining[shard.name] -= 1
                if remaining[shard.name] == 0:
                    files.complete(shard)

            def work(group: list[int], report: Callable[[int], None]) -> None:
                sources = Sources([slots[k][0].producer for k in group])
                try:
                    for k in group:
                        tensor, shard, offset = slots[k]
                        _write_tensor(tensor, files.fd(shard), offset, sources, files.temp(shard))
                        report(k)
                finally:
                    sources.close()

            run_split(balanced([t.nbytes for t, _, _ in slots], jobs), work, done)
    except BaseException:
        files.discard()
        raise
    finally:
        files.close()


def _start(shards: list[Shard], files: _ShardFiles) -> list[tuple[OutputTensor, Shard, int]]:
    """Every shard's file with its header (empty shards complete); their tensors' places, in source read order."""
    slots = []
    for shard in shards:
        files.create(shard)
        slots += [(t, shard, offset) for t, offset in zip(shard.tensors, shard.offsets)]
        if not shard.tensors:
            files.complete(shard)
    return sorted(slots, key=lambda slot: read_position(slot[0]))


class _ShardFiles:
    """The temporary files of shards being written, with at most `MAX_OPEN` of them open at a time."""

    MAX_OPEN = 32

    def __init__(self, folder: Path):
        self.folder = folder
        self.open: OrderedDict[str, int] = OrderedDict()
        self.temps: list[Path] = []

    def temp(self, shard: Shard) -> Path:
        return self.folder / (shard.name + TEMP_SUFFIX)

    def create(self, shard: Shard) -> None:
        path = self.temp(shard)
        self.temps.append(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)  # read too: copies may clone earlier ones
            self._keep(shard.name, fd)
            write_all(fd, shard.header)
        except OSError as exc:
            raise os_error(exc, path) from None

    def fd(self, shard: Shard) -> int:
        if shard.name in self.open:
            self.open.move_to_end(shard.name)
            return self.open[shard.name]
        try:
            fd = os.open(self.temp(shard), os.O_RDWR)
        except OSError as exc:
            raise os_error(exc, self.temp(shard)) from None
        self._keep(shard.name, fd)
        return fd

    def complete(self, shard: Shard) -> None:
        fd = self.open.pop(shard.name, None)
        if fd is not None:
            os.close(fd)
        os.replace(self.temp(shard), self.folder / shard.name)
        self.temps.remove(self.temp(shard))

    def discard(self) -> None:
        self.close()
        for path in self.temps:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        while self.open:
            os.close(self.open.popitem()[1])

    def _keep(self, name: str, fd: int) -> None:
        self.open[name] = fd
        while len(self.open) > self.MAX_OPEN:
            os.close(self.open.popitem(last=False)[1])


def read_position(tensor: OutputTensor) -> tuple[str, str, int]:
    """Where a tensor's first source bytes are stored (source, file, offset); tensors made from nothing come first."""
    inputs = tensor.producer.inputs
    return (inputs[0].store.key, inputs[0].file, inputs[0].offset) if inputs else ("", "", 0)


def _write_tensor(tensor: OutputTensor, fd: int, offset: int, sources: Sources, path: Path) -> None:
    try:
        tensor.producer.write(fd, offset, sources)
    except SurgeryError as exc:
        raise SurgeryError(f"{tensor.name}: {exc}") from None
    except OSError as exc:
        raise os_error(exc, path) from None
    sources.finished(tensor.producer)


def shard_is_complete(shard: Shard, path: Path, sources: Sources | None = None) -> bool:
    """Whether `path` holds `shard`: the same header and size, and with `sources` also every tensor's bytes."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != shard.size or f.read(len(shard.header)) != shard.header:
                return False
            return sources is None or all(
                holds(f, offset, t, sources) for t, offset in zip(shard.tensors, shard.offsets)
            )
    except FileNotFoundError:
        return False


def holds(f: BinaryIO, offset: int, tensor: OutputTensor, sources: Sources) -> bool:
    """Whether the open file `f` holds `tensor`'s planned bytes at `offset` (read a chunk at a time)."""
    try:
        for position, chunk in tensor.producer.iter_bytes(sources):
            f.seek(offset + position)
            if f.read(len(chunk)) != chunk:
                return False
        return True
    finally:
        sources.finished(tensor.producer)


def write_index(folder: Path, shards: list[Shard]) -> None:
    """model.safetensors.index.json for `shards`, written under a temporary name and renamed."""
    weight_map = {t.name: s.name for s in shards for t in s.tensors}
    index = {
        "metadata": {
            "total_size": sum(s.nbytes for s in shards),
            "total_parameters": sum(t.numel for s in shards for t in s.tensors),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    path = folder / INDEX_NAME
    temp = path.with_name(path.name + TEMP_SUFFIX)
    temp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(temp, path)
