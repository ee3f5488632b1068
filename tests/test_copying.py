"""The copy chain copy_file_range -> sendfile -> buffered: each fallback exercised with the faster paths failing."""

from __future__ import annotations

import errno
import os
from collections import Counter

import pytest

import surgery.copying as copying
from surgery.copying import copy_range
from surgery.errors import SurgeryError

SOURCE_BYTES = 50_000
PREFIX = b"already-in-destination:"

REAL_CFR = os.copy_file_range
REAL_SENDFILE = os.sendfile
REAL_PREAD = os.pread


@pytest.fixture
def source(tmp_path):
    data = os.urandom(SOURCE_BYTES)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


@pytest.fixture
def dest(tmp_path):
    path = tmp_path / "dst.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, PREFIX)  # the copy must append at the current position
    yield fd, path
    os.close(fd)


@pytest.fixture
def small_calls(monkeypatch):
    """Small buffers and per-call limits, so every method loops and lengths cross BUFFER_BYTES."""
    monkeypatch.setattr(copying, "BUFFER_BYTES", 4096)
    monkeypatch.setattr(copying, "CALL_BYTES", 7000)


def behaviour(real, kind: str, calls: Counter, key: str):
    """A stand-in for os.copy_file_range / os.sendfile: `kind` says how it misbehaves."""
    state = {"n": 0}

    def fake(*args, **kwargs):
        calls[key] += 1
        state["n"] += 1
        if state["n"] > MAX_CALLS:  # a method that keeps retrying a refusing call would hang the suite
            raise AssertionError(f"{key} called {state['n']} times: the chain is looping")
        if kind == "real":
            return real(*args, **kwargs)
        if kind.startswith("errno:"):
            raise OSError(getattr(errno, kind[6:]), os.strerror(getattr(errno, kind[6:])))
        if kind == "zero":
            return 0
        if kind == "short-then-zero":  # one real but short transfer, then "nothing more"
            if state["n"] == 1:
                return real(*shorten(args, kwargs, key))
            return 0
        if kind == "short-then-error":
            if state["n"] == 1:
                return real(*shorten(args, kwargs, key))
            raise OSError(errno.EXDEV, "cross-device")
        raise AssertionError(kind)

    return fake


#: far more calls than any copy here needs (30,000 bytes in 7,000-byte calls)
MAX_CALLS = 1000


def shorten(args, kwargs, key):
    """Argument tuple of a real call that moves at most 1234 bytes (kwargs folded in positionally)."""
    if key == "copy_file_range":
        src, dst, count, offset_src, offset_dst = args
        return (src, dst, min(count, 1234), offset_src, offset_dst)
    out_fd, in_fd, offset, count = args
    return (out_fd, in_fd, offset, min(count, 1234))


def install(monkeypatch, cfr: str, sendfile: str) -> Counter:
    calls: Counter = Counter()
    if cfr == "missing":
        monkeypatch.delattr(os, "copy_file_range")
    else:
        monkeypatch.setattr(os, "copy_file_range", behaviour(REAL_CFR, cfr, calls, "copy_file_range"))
    if sendfile == "missing":
        monkeypatch.delattr(os, "sendfile")
    else:
        monkeypatch.setattr(os, "sendfile", behaviour(REAL_SENDFILE, sendfile, calls, "sendfile"))

    def counting_pread(*args):
        calls["pread"] += 1
        if calls["pread"] > MAX_CALLS:
            raise AssertionError("pread called too often: the chain is looping")
        return REAL_PREAD(*args)

    monkeypatch.setattr(os, "pread", counting_pread)
    return calls


FAILURES = ["errno:EXDEV", "errno:EOPNOTSUPP", "errno:ENOSYS", "errno:EINVAL", "errno:ENOTSOCK", "errno:EPERM",
            "errno:EACCES", "zero", "short-then-zero", "short-then-error", "missing"]


def check_copy(source, dest, offset, length):
    src_fd, data = source
    dst_fd, path = dest
    copy_range(src_fd, dst_fd, offset, length)
    assert path.read_bytes() == PREFIX + data[offset:offset + length]
    assert os.lseek(dst_fd, 0, os.SEEK_CUR) == len(PREFIX) + length


@pytest.mark.parametrize("offset, length", [(0, SOURCE_BYTES), (1, 4095), (3, 4097), (777, 20_001), (0, 0),
                                            (SOURCE_BYTES - 5, 5)])
def test_fast_path_alone(monkeypatch, small_calls, source, dest, offset, length):
    calls = install(monkeypatch, "real", "real")
    check_copy(source, dest, offset, length)
    if length:
        assert calls["copy_file_range"] >= 1
    assert calls["sendfile"] == 0 and calls["pread"] == 0


@pytest.mark.parametrize("cfr", FAILURES)
def test_sendfile_takes_over(monkeypatch, small_calls, source, dest, cfr):
    calls = install(monkeypatch, cfr, "real")
    check_copy(source, dest, 333, 30_000)
    if cfr != "missing":
        assert calls["copy_file_range"] >= 1
    if cfr.startswith("short"):
        assert calls["copy_file_range"] == 2
    assert calls["sendfile"] >= 1
    assert calls["pread"] == 0


@pytest.mark.parametrize("sendfile", FAILURES)
@pytest.mark.parametrize("cfr", FAILURES)
def test_buffered_takes_over(monkeypatch, small_calls, source, dest, cfr, sendfile):
    calls = install(monkeypatch, cfr, sendfile)
    check_copy(source, dest, 333, 30_000)
    if cfr != "missing":
        assert calls["copy_file_range"] >= 1
    if sendfile != "missing":
        assert calls["sendfile"] >= 1
    # what the fast paths did not move, the buffered path moves in BUFFER_BYTES reads
    moved_fast = 1234 * cfr.startswith("short") + 1234 * sendfile.startswith("short")
    assert calls["pread"] >= -(-(30_000 - moved_fast) // 4096)


def test_buffered_reads_in_buffer_sized_pieces(monkeypatch, small_calls, source, dest):
    install(monkeypatch, "errno:ENOSYS", "errno:ENOSYS")
    sizes = []

    def pread(fd, n, offset):
        sizes.append(n)
        return REAL_PREAD(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    check_copy(source, dest, 10, 4096 * 3 + 1)
    assert max(sizes) <= 4096
    assert len(sizes) == 4


def test_default_buffer_is_bounded():
    assert 0 < copying.BUFFER_BYTES <= 64 << 20


# ----------------------------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("cfr, sendfile", [("real", "real"), ("errno:EXDEV", "real"), ("errno:ENOSYS", "errno:EINVAL"),
                                           ("short-then-zero", "short-then-zero")])
@pytest.mark.parametrize("offset, length", [(SOURCE_BYTES - 100, 101), (SOURCE_BYTES - 100, 20_000),
                                            (SOURCE_BYTES, 1), (SOURCE_BYTES + 10, 5)])
def test_truncated_source(monkeypatch, small_calls, source, dest, cfr, sendfile, offset, length):
    calls = install(monkeypatch, cfr, sendfile)
    with pytest.raises(SurgeryError) as info:
        copy_range(source[0], dest[0], offset, length)
    assert "\n" not in str(info.value)
    assert calls["pread"] >= 1  # every method was tried before giving up


def test_source_truncated_after_open(tmp_path, dest):
    path = tmp_path / "shrinks.bin"
    path.write_bytes(os.urandom(10_000))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.truncate(path, 4_000)
        with pytest.raises(SurgeryError):
            copy_range(fd, dest[0], 0, 10_000)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- real errors


@pytest.mark.parametrize("where", ["copy_file_range", "sendfile", "pread"])
@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_disk_failures_propagate(monkeypatch, small_calls, source, dest, where, code):
    calls = install(monkeypatch, "errno:ENOSYS" if where != "copy_file_range" else "real",
                    "errno:ENOSYS" if where == "pread" else "real")

    def failing(*args, **kwargs):
        calls[where] += 1
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, where, failing)
    with pytest.raises(OSError) as info:
        copy_range(source[0], dest[0], 0, 10_000)
    assert info.value.errno == code
    assert not isinstance(info.value, SurgeryError)


def test_write_error_in_buffered_path_propagates(monkeypatch, small_calls, source, dest):
    install(monkeypatch, "errno:ENOSYS", "errno:ENOSYS")

    def failing_write(fd, data, offset):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "pwrite", failing_write)
    with pytest.raises(OSError) as info:
        copy_range(source[0], dest[0], 0, 10_000)
    assert info.value.errno == errno.EIO


def test_unwritable_destination_is_not_blamed_on_the_source(tmp_path, source):
    """A destination opened read-only: every method fails with EBADF.

    copy_file_range and sendfile may hand over to the next method on EBADF, but the buffered path is the last
    resort: its os.write error must propagate, not be reported as "source file ended early (truncated?)".
    """
    path = tmp_path / "readonly.bin"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            copy_range(source[0], fd, 0, 1000)
        assert info.value.errno == errno.EBADF
    finally:
        os.close(fd)
