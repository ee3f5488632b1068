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
    """Split greedily in order, exactly as huggingface_hub's split_torch_state_dict_into_shards does."""
    shards: list[list[OutputTensor]] = []
    current: list[OutputTensor] = []
    size = 0
    for t in tensors:
        if t.nbytes > max_shard_bytes:  # as huggingface_hub: alone, before the shard being filled
            shards.append([t])
            continue
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

    Every shard's header is written first (it is known from the plan); then tensors are written into
    their places in the order their source bytes are stored, so each source file is read in one
    stretch and can be released (evicted) right after. Shards carry a temporary name until all are
    complete; the index comes last. On any exception every file this call created is removed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = shard_layout(tensors, max_shard_bytes)
    names = shard_names(len(shards))
    temps = [folder / (name + TEMP_SUFFIX) for name in names]
    sources = Sources([t.producer for t in tensors])
    created: list[Path] = []  # removed again on failure
    fds: list[int] = []
    try:
        slots = []
        for temp, shard in zip(temps, shards):
            created.append(temp)
            fds.append(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            slots += _write_header(fds[-1], data_order(shard))
        for tensor, fd, offset in sorted(slots, key=lambda slot: read_position(slot[0])):
            _write_tensor(tensor, fd, offset, sources)
            progress(tensor.nbytes)
        while fds:
            os.close(fds.pop())
        for i, (temp, name) in enumerate(zip(temps, names)):
            os.replace(temp, folder / name)
            created[i] = folder / name
        if len(shards) > 1:
            created.append(folder / INDEX_NAME)
            _write_index(folder / INDEX_NAME, shards, names)
        return [p.name for p in created]
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise
    finally:
        for fd in fds:
            os.close(fd)
        sources.close()


def read_position(tensor: OutputTensor) -> tuple[str, int]:
    """Where a tensor's first source bytes are stored; tensors made from nothing come first."""
    inputs = tensor.producer.inputs
    return (inputs[0].file, inputs[0].offset) if inputs else ("", 0)


def _write_header(fd: int, tensors: list[OutputTensor]) -> list[tuple[OutputTensor, int, int]]:
    """Write a shard's header; return each tensor with the file offset its bytes go to."""
    header = build_header([(t.name, t.dtype, t.shape, t.nbytes) for t in tensors], {"format": "pt"})
    write_all(fd, header)
    slots, offset = [], len(header)
    for t in tensors:
        slots.append((t, fd, offset))
        offset += t.nbytes
    return slots


def _write_tensor(tensor: OutputTensor, fd: int, offset: int, sources: Sources) -> None:
    os.lseek(fd, offset, os.SEEK_SET)
    tensor.producer.write(fd, sources)
    written = os.lseek(fd, 0, os.SEEK_CUR) - offset
    if written != tensor.nbytes:
        raise AssertionError(f"{tensor.name}: producer wrote {written} bytes, expected {tensor.nbytes}")
    sources.finished(tensor.producer)


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
