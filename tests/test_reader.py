"""Reading checkpoints: compatibility with the reference writer, index validation, pickle refusal, header-only reads."""

from __future__ import annotations

import builtins
import io
import json
import mmap
import os
import pickle
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from surgery.checkpoint import open_checkpoint
from surgery.errors import SurgeryError

#: torch dtype -> safetensors dtype string, as the format spec names them
TORCH_TO_ST = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.int64: "I64",
    torch.uint64: "U64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size(),),
                        dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return (raw[: torch.Size(shape).numel()] & 1).bool().reshape(shape)
    n = torch.Size(shape).numel()
    return raw.view(dtype)[:n].reshape(shape).clone()


def raw_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of a tensor, computed by torch (not by the code under test)."""
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


SHAPES = [(), (0,), (3, 0), (1,), (5,), (2, 3), (2, 1, 3)]


def test_reference_file_with_every_torch_dtype(tmp_path):
    tensors = {}
    for i, (dtype, _) in enumerate(TORCH_TO_ST.items()):
        for j, shape in enumerate(SHAPES):
            tensors[f"t.{str(dtype).removeprefix('torch.')}.{j}"] = sample(dtype, shape, seed=100 * i + j)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    content = path.read_bytes()

    ckpt = open_checkpoint(tmp_path)
    assert set(ckpt.tensors) == set(tensors)
    for name, t in tensors.items():
        info = ckpt.tensors[name]
        assert info.dtype == TORCH_TO_ST[t.dtype], name
        assert info.shape == tuple(t.shape), name
        assert info.numel == t.numel()
        assert info.nbytes == t.numel() * t.element_size(), name
        assert info.file == "model.safetensors"
        assert content[info.offset:info.offset + info.nbytes] == raw_bytes(t), name
    assert ckpt.num_parameters == sum(t.numel() for t in tensors.values())


def test_reference_file_opened_directly(tmp_path):
    tensors = {"w": sample(torch.bfloat16, (4, 3), 1), "s": sample(torch.float8_e4m3fn, (), 2)}
    path = tmp_path / "weights.safetensors"
    save_file(tensors, str(path))
    for source in (path, tmp_path):  # a single non-standard name in a folder is accepted too
        ckpt = open_checkpoint(source)
        assert {n: (i.dtype, i.shape, i.file) for n, i in ckpt.tensors.items()} == {
            "w": ("BF16", (4, 3), "weights.safetensors"), "s": ("F8_E4M3", (), "weights.safetensors")}
        content = path.read_bytes()
        for name, t in tensors.items():
            info = ckpt.tensors[name]
            assert content[info.offset:info.offset + info.nbytes] == raw_bytes(t)


def test_dominant_dtype_and_config(tmp_path):
    save_file({"a": torch.zeros(10, dtype=torch.bfloat16), "b": torch.zeros(3, dtype=torch.float32)},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", "hidden_size": 8}))
    (tmp_path / "tokenizer.json").write_text("{}")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.dominant_dtype == "BF16"  # 20 bytes of BF16 against 12 of F32
    assert ckpt.config == {"model_type": "mistral", "hidden_size": 8}
    assert "tokenizer.json" in ckpt.side_files


# ----------------------------------------------------------------------------------------------- sharded folders


def make_sharded(folder: Path, shards: dict[str, dict[str, torch.Tensor]], weight_map: dict[str, str] | None = None,
                 index: dict | None = None) -> Path:
    """Shard files as given and an index (by default the truthful one)."""
    folder.mkdir(parents=True, exist_ok=True)
    for file, tensors in shards.items():
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
    if weight_map is None:
        weight_map = {name: file for file, tensors in shards.items() for name in tensors}
    if index is None:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


A = "model-00001-of-00002.safetensors"
B = "model-00002-of-00002.safetensors"


def two_shards():
    return {
        A: {"x": sample(torch.float32, (2, 3), 1), "y": sample(torch.bfloat16, (4,), 2)},
        B: {"z": sample(torch.float16, (3,), 3)},
    }


def test_sharded_folder_reads(tmp_path):
    shards = two_shards()
    folder = make_sharded(tmp_path / "m", shards)
    ckpt = open_checkpoint(folder)
    assert {n: i.file for n, i in ckpt.tensors.items()} == {"x": A, "y": A, "z": B}
    for file, tensors in shards.items():
        content = (folder / file).read_bytes()
        for name, t in tensors.items():
            info = ckpt.tensors[name]
            assert content[info.offset:info.offset + info.nbytes] == raw_bytes(t)


def expect_error(source: Path, *fragments: str) -> str:
    with pytest.raises(SurgeryError) as info:
        open_checkpoint(source)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("bad", ["../x.safetensors", "sub/x.safetensors", "x.bin", "/abs/x.safetensors",
                                 "sub\\x.safetensors", "x.safetensors.bak", "x.pt", ".."])
def test_index_rejects_non_plain_shard_names(tmp_path, bad):
    shards = two_shards()
    (tmp_path / "sub").mkdir()
    save_file({"w": torch.zeros(1)}, str(tmp_path / "sub" / "x.safetensors"))  # the target would exist
    save_file({"w": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    weight_map = {"x": A, "y": A, "z": bad}
    folder = make_sharded(tmp_path / "m", shards, weight_map)
    expect_error(folder, "model.safetensors.index.json", repr(bad), "'z'")


@pytest.mark.parametrize("index", [{}, {"weight_map": {}}, {"weight_map": []}, {"weight_map": {"x": 3}},
                                   {"weight_map": {"x": None}}, []])
def test_index_malformed(tmp_path, index):
    folder = make_sharded(tmp_path / "m", two_shards(), index=index)
    expect_error(folder, "model.safetensors.index.json")


def test_index_not_json(tmp_path):
    folder = make_sharded(tmp_path / "m", two_shards())
    (folder / "model.safetensors.index.json").write_text("{not json")
    expect_error(folder, "model.safetensors.index.json")


def test_index_lists_tensor_under_wrong_shard(tmp_path):
    folder = make_sharded(tmp_path / "m", two_shards(), {"x": A, "y": B, "z": B})
    message = expect_error(folder, "'y'")
    assert A in message and B in message


def test_tensor_in_two_shards(tmp_path):
    shards = two_shards()
    shards[B]["x"] = sample(torch.float32, (2, 3), 9)
    for listed in (A, B):
        folder = make_sharded(tmp_path / f"m{listed[6:11]}", shards, {"x": listed, "y": A, "z": B})
        message = expect_error(folder, "'x'")
        assert A in message and B in message


def test_tensor_in_shard_but_missing_from_index(tmp_path):
    folder = make_sharded(tmp_path / "m", two_shards(), {"x": A, "z": B})
    message = expect_error(folder, "'y'", A)
    assert "index" in message


def test_index_lists_tensor_no_shard_holds(tmp_path):
    folder = make_sharded(tmp_path / "m", two_shards(), {"x": A, "y": A, "z": B, "ghost": B})
    expect_error(folder, "'ghost'", B)


def test_missing_shard_file(tmp_path):
    folder = make_sharded(tmp_path / "m", two_shards())
    (folder / B).unlink()
    message = expect_error(folder, B)
    assert "missing" in message


def test_shard_name_is_a_folder(tmp_path):
    folder = make_sharded(tmp_path / "m", two_shards())
    (folder / B).unlink()
    (folder / B).mkdir()
    expect_error(folder, B)


def test_several_safetensors_without_index(tmp_path):
    save_file({"a": torch.zeros(1)}, str(tmp_path / "one.safetensors"))
    save_file({"b": torch.zeros(1)}, str(tmp_path / "two.safetensors"))
    expect_error(tmp_path, "one.safetensors", "two.safetensors")


def test_empty_folder_and_missing_path(tmp_path):
    expect_error(tmp_path, str(tmp_path))
    expect_error(tmp_path / "nope", "nope")


# ----------------------------------------------------------------------------------------------- pickles


class _Boom:
    """Unpickling this creates the marker file: proof that someone unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def guard(monkeypatch):
    """`guard()` makes every unpickling entry point fail loudly and returns the list of files opened from then on."""

    def start() -> list[str]:
        opened: list[str] = []

        def forbid(*args, **kwargs):
            raise AssertionError("unpickling attempted")

        for module, attr in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
            monkeypatch.setattr(module, attr, forbid)
        real_open, real_os_open = builtins.open, os.open

        def recording_open(file, *args, **kwargs):
            opened.append(os.fspath(file) if not isinstance(file, int) else str(file))
            return real_open(file, *args, **kwargs)

        def recording_os_open(path, *args, **kwargs):
            opened.append(os.fspath(path))
            return real_os_open(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", recording_open)
        monkeypatch.setattr(io, "open", recording_open)
        monkeypatch.setattr(os, "open", recording_os_open)
        return opened

    return start


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_only_folder_is_refused(tmp_path, guard, name):
    marker = tmp_path / "unpickled"
    (tmp_path / name).write_bytes(pickle.dumps(_Boom(str(marker))))
    (tmp_path / "config.json").write_text("{}")
    opened = guard()
    message = expect_error(tmp_path, name)
    assert "convert" in message.lower() and "safe" in message.lower(), message
    assert not marker.exists()
    assert not any(p.endswith(name) for p in opened), opened


def test_pickle_only_folder_with_garbage(tmp_path, guard):
    (tmp_path / "pytorch_model.bin").write_bytes(os.urandom(256))
    os.chmod(tmp_path / "pytorch_model.bin", 0)
    opened = guard()
    message = expect_error(tmp_path, "pytorch_model.bin")
    assert "safetensors" in message or "safe_serialization" in message
    assert not any(p.endswith(".bin") for p in opened)


def test_pickle_file_given_directly_is_refused(tmp_path, guard):
    marker = tmp_path / "unpickled"
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(pickle.dumps(_Boom(str(marker))))
    opened = guard()
    message = expect_error(path, "pytorch_model.bin")
    assert "convert" in message.lower()
    assert not marker.exists()
    assert not any(p.endswith(".bin") for p in opened)


def test_boom_pickle_would_be_noticed(tmp_path):
    """The marker trick works: unpickling the payload does create the marker."""
    marker = tmp_path / "unpickled"
    pickle.loads(pickle.dumps(_Boom(str(marker)))).close()
    assert marker.exists()


# ----------------------------------------------------------------------------------------------- header-only


def huge_sparse_shard(path: Path, data_bytes: int, dtype: str = "U8") -> int:
    """A shard whose header describes `data_bytes` bytes of data that is one sparse hole; returns the data start."""
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "big": {"dtype": dtype, "shape": [data_bytes], "data_offsets": [0, data_bytes]}}).encode()
    header += b" " * (-len(header) % 8)
    with builtins.open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
    os.truncate(path, 8 + len(header) + data_bytes)
    return 8 + len(header)


def test_open_reads_headers_only_sparse_10gb(tmp_path):
    size = 10 * 2**30
    start_a = huge_sparse_shard(tmp_path / A, size)
    save_file({"small": torch.arange(4, dtype=torch.float32)}, str(tmp_path / B))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"big": A, "small": B}}))
    assert os.stat(tmp_path / A).st_blocks * 512 < 1 << 20  # really a hole

    t0 = time.monotonic()
    ckpt = open_checkpoint(tmp_path)
    assert time.monotonic() - t0 < 1.0
    big = ckpt.tensors["big"]
    assert (big.dtype, big.shape, big.file, big.offset, big.nbytes) == ("U8", (size,), A, start_a, size)
    assert ckpt.tensors["small"].shape == (4,)


def test_open_reads_no_tensor_bytes(tmp_path, monkeypatch):
    """Count every byte read through Python file objects; forbid os-level reads and mmap."""
    shards = two_shards()
    shards[B]["big"] = torch.zeros(300_000, dtype=torch.float32)
    folder = make_sharded(tmp_path / "m", shards)
    header_bytes = {f: 8 + struct.unpack("<Q", (folder / f).read_bytes()[:8])[0] for f in shards}

    read: dict[str, int] = {}
    real_open = builtins.open

    class Counting:
        def __init__(self, f, name):
            self._f, self._name = f, name

        def read(self, n=-1):
            data = self._f.read(n)
            read[self._name] = read.get(self._name, 0) + len(data)
            return data

        def __getattr__(self, attr):
            return getattr(self._f, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def counting_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        name = os.fspath(file) if not isinstance(file, int) else ""
        return Counting(f, os.path.basename(name)) if "b" in mode and name.endswith(".safetensors") else f

    def forbidden(*args, **kwargs):
        raise AssertionError("open_checkpoint must not read tensor data")

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr(os, "pread", forbidden)
    monkeypatch.setattr(os, "read", forbidden)
    monkeypatch.setattr(mmap, "mmap", forbidden)

    ckpt = open_checkpoint(folder)
    assert set(ckpt.tensors) == {"x", "y", "z", "big"}
    assert read, "the counting hook saw no reads at all"
    for file, n in read.items():
        assert n <= header_bytes[file], (file, n, header_bytes[file])
