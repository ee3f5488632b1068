"""Opening a checkpoint: headers, config and side files only; no tensor data is read here."""

from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import SurgeryError, os_error
from .header import FileHeader, header_length, parse_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: files of a model folder that travel with the weights (tokenizer, generation settings, templates)
SIDE_FILE_PATTERNS = (
    "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
    "vocab.*", "merges.txt", "chat_template.*", "*.tiktoken", "spiece.model", "preprocessor_config.json",
)


@dataclass(frozen=True)
class TensorInfo:
    """Where one source tensor lives: `offset` is absolute within `file`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class FileStore(Protocol):
    """Where a checkpoint's files come from: a local folder, or a remote repository fetched on demand.

    Stores must be hashable: writers key open files by (store, file name).
    """

    def fetch(self, name: str) -> Path:
        """Make a file available locally and return its path."""

    def release(self, name: str) -> None:
        """Tell the store a file is no longer needed (a remote store may evict it)."""

    def roots(self) -> list[Path]:
        """Folders an output must neither be, hold, nor lie inside (e.g. a download cache)."""

    def local_path(self, name: str) -> Path | None:
        """Where a file already is on this machine without fetching it; None for a remote file."""

    @property
    def key(self) -> str:
        """Names the store among the sources of one plan (reads are ordered by it, then by file and offset)."""


@dataclass(frozen=True)
class LocalFiles:
    folder: Path

    def fetch(self, name: str) -> Path:
        return self.folder / name

    def release(self, name: str) -> None:
        pass

    def roots(self) -> list[Path]:
        return []

    def local_path(self, name: str) -> Path | None:
        return self.folder / name

    @property
    def key(self) -> str:
        return str(self.folder)


@dataclass
class Checkpoint:
    """A source checkpoint: every tensor's location, the config, and the side files to carry over."""

    location: str
    tensors: dict[str, TensorInfo]
    config: dict
    side_files: list[str]
    files: FileStore
    revision: str | None = None

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def file_names(self) -> list[str]:
        """Every file of the checkpoint that is used: weight shards, side files, config and index."""
        return sorted({t.file for t in self.tensors.values()} | set(self.side_files) | {"config.json", INDEX_NAME})

    def protected_paths(self) -> list[Path]:
        """Real paths (links resolved) of the source folder and the files read from it: an output must not be or
        hold any of them."""
        local = [self.files.local_path(name) for name in self.file_names()]
        folders = {path.parent for path in local if path is not None}
        return sorted({p.resolve() for p in folders | {p for p in local if p is not None}})

    def check_readable(self) -> None:
        """Fail now, before anything is written, if a local weight or side file cannot be opened."""
        for name in sorted({t.file for t in self.tensors.values()} | set(self.side_files)):
            path = self.files.local_path(name)
            if path is None:
                continue
            try:
                os.close(os.open(path, os.O_RDONLY))
            except OSError as exc:
                raise os_error(exc, path) from None

    def identity(self) -> list[tuple[str, int, int]]:
        """(name, size, mtime) of every local weight file: tells whether the source changed between two runs."""
        out = []
        for name in sorted({t.file for t in self.tensors.values()}):
            path = self.files.local_path(name)
            if path is not None:
                st = os.stat(path)
                out.append((name, st.st_size, st.st_mtime_ns))
        return out

    @property
    def dominant_dtype(self) -> str:
        """The dtype holding the most bytes: the model's working precision."""
        totals: dict[str, int] = {}
        for t in self.tensors.values():
            totals[t.dtype] = totals.get(t.dtype, 0) + t.nbytes
        return max(sorted(totals), key=totals.__getitem__) if totals else "F32"


def open_checkpoint(src: str | os.PathLike) -> Checkpoint:
    """Open a local checkpoint folder or a single .safetensors file, reading headers only."""
    path = Path(src)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SurgeryError(f"{path}: not a .safetensors file" + _pickle_hint(path.name))
        folder, weight_files = path.parent, [path.name]
        index = None
    elif path.is_dir():
        folder = path
        index, weight_files = _weight_files(folder)
    else:
        raise SurgeryError(f"{path}: no such file or folder")
    headers = {name: read_header(folder / name) for name in weight_files}
    tensors = tensors_from_headers(headers, index, str(path))
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    side = sorted(p.name for p in folder.iterdir() if p.is_file() and is_side_file(p.name))
    return Checkpoint(str(path), tensors, config, side, LocalFiles(folder))


def is_side_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in SIDE_FILE_PATTERNS)


def read_header(path: Path) -> FileHeader:
    """Read and validate the header of a local safetensors file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = header_length(f.read(8), size, str(path))
            return parse_header(f.read(n), size, str(path))
    except FileNotFoundError:
        raise SurgeryError(f"{path}: shard is missing") from None
    except IsADirectoryError:
        raise SurgeryError(f"{path}: is a folder, expected a .safetensors file") from None


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SurgeryError(f"{path}: cannot read JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise SurgeryError(f"{path}: expected a JSON object")
    return obj


def parse_index(index: dict, where: str) -> dict[str, str]:
    """Validate a model.safetensors.index.json object and return its weight_map."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SurgeryError(f"{where}: weight_map must be a non-empty object")
    for tensor, file in weight_map.items():
        if not isinstance(file, str) or not _plain_shard_name(file):
            raise SurgeryError(f"{where}: tensor {tensor!r} points at {file!r}, not a plain *.safetensors file name")
    return weight_map


def tensors_from_headers(
    headers: dict[str, FileHeader], weight_map: dict[str, str] | None, where: str
) -> dict[str, TensorInfo]:
    """Merge shard headers into one tensor table, cross-checked against the index when there is one."""
    tensors: dict[str, TensorInfo] = {}
    for file, header in headers.items():
        for t in header.tensors:
            if t.name in tensors:
                raise SurgeryError(f"{where}: tensor {t.name!r} is in both {tensors[t.name].file} and {file}")
            if weight_map is not None and weight_map.get(t.name) != file:
                listed = weight_map.get(t.name)
                problem = "is missing from the index" if listed is None else f"is listed under {listed}"
                raise SurgeryError(f"{where}: tensor {t.name!r} in {file} {problem}")
            tensors[t.name] = TensorInfo(t.name, t.dtype, t.shape, file, header.data_start + t.begin, t.end - t.begin)
    for name, file in (weight_map or {}).items():
        if name not in tensors:
            raise SurgeryError(f"{where}: index lists tensor {name!r} in {file}, but that shard does not hold it")
    return tensors


def _plain_shard_name(name: str) -> bool:
    return (
        name.endswith(".safetensors") and "/" not in name and "\\" not in name
        and name not in (".safetensors",) and not name.startswith("..") and "\x00" not in name
    )


def _weight_files(folder: Path) -> tuple[dict[str, str] | None, list[str]]:
    if (folder / INDEX_NAME).is_file():
        weight_map = parse_index(read_json(folder / INDEX_NAME), str(folder / INDEX_NAME))
        return weight_map, sorted(set(weight_map.values()))
    if (folder / SINGLE_NAME).is_file():
        return None, [SINGLE_NAME]
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    found = [n for n in names if n.endswith(".safetensors")]
    if len(found) == 1:
        return None, found
    if found:
        raise SurgeryError(
            f"{folder}: several .safetensors files ({', '.join(found)}) but no {INDEX_NAME} to say which to use"
        )
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise SurgeryError(f"{folder}: holds only pickle weights ({pickles[0]})" + _pickle_hint(pickles[0]))
    raise SurgeryError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME} found")


def _pickle_hint(name: str) -> str:
    if not name.endswith(PICKLE_SUFFIXES):
        return ""
    return (
        "; surgery never unpickles. If you trust the file, convert it with transformers: "
        "AutoModelForCausalLM.from_pretrained(SRC).save_pretrained(DST, safe_serialization=True)"
    )
