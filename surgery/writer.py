"""Writing planned tensors as Hugging Face safetensors shards, each header known before its data."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import dtypes
from .checkpoint import INDEX_NAME, SINGLE_NAME
from .copying import write_all
from .header import build_header
from .producers import Producer, Sources

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
TEMP_SUFFIX = ".partial"


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
    """Split greedily in order, as Hugging Face does; a tensor larger than the max gets a shard of its own."""
    shards: list[list[OutputTensor]] = []
    current: list[OutputTensor] = []
    size = 0
    for t in tensors:
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def data_order(shard: list[OutputTensor]) -> list[OutputTensor]:
    """Order within a shard: widest dtype first, so every tensor starts aligned to its element size."""
    return sorted(shard, key=lambda t: -dtypes.itemsize(t.dtype))


def write_checkpoint(
    tensors: list[OutputTensor],
    folder: str | os.PathLike,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[int], None] = lambda n: None,
) -> list[str]:
    """Write `tensors` into `folder` as shards plus, if several, the index; return the files written.

    Each shard is written under a temporary name and renamed once complete; the index comes last.
    On any exception every file this call created is removed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = shard_layout(tensors, max_shard_bytes)
    names = shard_names(len(shards))
    written: list[Path] = []
    sources = Sources([t.producer for t in tensors])
    try:
        for name, shard in zip(names, shards):
            temp = folder / (name + TEMP_SUFFIX)
            written.append(temp)
            _write_shard(temp, data_order(shard), sources, progress)
            os.replace(temp, folder / name)
            written[-1] = folder / name
        if len(shards) > 1:
            index = folder / INDEX_NAME
            written.append(index)
            _write_index(index, shards, names)
        return [p.name for p in written]
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    finally:
        sources.close()


def _write_shard(path: Path, tensors: list[OutputTensor], sources: Sources, progress: Callable[[int], None]) -> None:
    header = build_header([(t.name, t.dtype, t.shape, t.nbytes) for t in tensors], {"format": "pt"})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, header)
        for t in tensors:
            start = os.lseek(fd, 0, os.SEEK_CUR)
            t.producer.write(fd, sources)
            written = os.lseek(fd, 0, os.SEEK_CUR) - start
            if written != t.nbytes:
                raise AssertionError(f"{t.name}: producer wrote {written} bytes, expected {t.nbytes}")
            sources.finished(t.producer)
            progress(t.nbytes)
    finally:
        os.close(fd)


def _write_index(path: Path, shards: list[list[OutputTensor]], names: list[str]) -> None:
    weight_map = {t.name: name for name, shard in zip(names, shards) for t in shard}
    index = {
        "metadata": {
            "total_size": sum(t.nbytes for shard in shards for t in shard),
            "total_parameters": sum(t.numel for shard in shards for t in shard),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    temp = path.with_name(path.name + TEMP_SUFFIX)
    temp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(temp, path)
