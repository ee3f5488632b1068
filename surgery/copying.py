"""Moving byte ranges between files without them entering Python memory.

The chain: `os.copy_file_range` (in-kernel, may reflink), then `os.sendfile`, then a fixed-size buffer.
A method that the kernel or filesystem refuses for any reason but a real I/O failure, or that stops early,
hands the rest to the next one (macOS has no copy_file_range, and its sendfile fails with ENOTSOCK).

On reflink filesystems (XFS, btrfs, ZFS >= 2.2, bcachefs) copy_file_range shares the source's blocks instead of
copying them, but only for whole blocks at offsets that agree modulo the block size: a copy whose source and
destination agree modulo BLOCK is split into a head (up to the destination's next BLOCK boundary), the aligned
middle (one call, remapped) and the tail. Elsewhere the split changes nothing but the number of calls. Inside
`share_blocks(False)`, copies skip copy_file_range and are real copies of the same bytes.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from contextvars import ContextVar

from .errors import SurgeryError

BUFFER_BYTES = 4 << 20
#: one call moves at most this much, so a refused or interrupted call wastes little
CALL_BYTES = 1 << 30
#: failures of the disk itself: another method would meet them too, so they end the copy
IO_FAILURES = {errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG}
#: the block size copies are split on: fixed, so outputs laid out for it are the same on every filesystem
BLOCK = 4096
_SHARE: ContextVar[bool] = ContextVar("surgery_share", default=True)


@contextlib.contextmanager
def share_blocks(enabled: bool) -> Iterator[None]:
    """Within the block, copies may share blocks with their source (`enabled`) or are always real copies."""
    token = _SHARE.set(enabled)
    try:
        yield
    finally:
        _SHARE.reset(token)


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int, dst_offset: int | None = None) -> None:
    """Copy `length` bytes of `src_fd` starting at `offset` to `dst_fd` at `dst_offset` (default: at its current
    position, which then moves past them)."""
    append = dst_offset is None
    if append:
        dst_offset = os.lseek(dst_fd, 0, os.SEEK_CUR)
    if _SHARE.get():
        for src, dst, n in split(offset, dst_offset, length):
            _copy(src_fd, dst_fd, src, n, dst, (_copy_file_range, _sendfile, _buffered))
    else:
        _copy(src_fd, dst_fd, offset, length, dst_offset, (_sendfile, _buffered))
    if append:
        os.lseek(dst_fd, dst_offset + length, os.SEEK_SET)


def sharing() -> bool:
    """Whether copies may share blocks here (see `share_blocks`)."""
    return _SHARE.get()


def split(offset: int, dst_offset: int, length: int) -> list[tuple[int, int, int]]:
    """(source offset, destination offset, length) pieces of a copy: head, BLOCK-aligned middle, tail when source
    and destination agree modulo BLOCK and the middle holds a whole block; else the copy itself."""
    head = -dst_offset % BLOCK
    middle = max(0, (length - head) // BLOCK * BLOCK)
    if (offset - dst_offset) % BLOCK or not middle:
        return [(offset, dst_offset, length)]
    pieces = [(offset, dst_offset, head), (offset + head, dst_offset + head, middle),
              (offset + head + middle, dst_offset + head + middle, length - head - middle)]
    return [piece for piece in pieces if piece[2]]


def _copy(src_fd: int, dst_fd: int, offset: int, length: int, dst_offset: int, methods: tuple) -> None:
    """Copy with the first of `methods`, handing what it leaves to the next."""
    done = 0
    for method in methods:
        done += method(src_fd, dst_fd, offset + done, length - done, dst_offset + done)
        if done == length:
            return
    raise SurgeryError(f"source file ended {length - done} bytes early while copying (was it truncated?)")


def _copy_file_range(src_fd: int, dst_fd: int, offset: int, length: int, dst_offset: int) -> int:
    delta = dst_offset - offset
    return _loop(lambda pos, n: os.copy_file_range(src_fd, dst_fd, n, pos, pos + delta), offset, length)


def _sendfile(src_fd: int, dst_fd: int, offset: int, length: int, dst_offset: int) -> int:
    def step(pos: int, n: int) -> int:
        os.lseek(dst_fd, pos + delta, os.SEEK_SET)
        return os.sendfile(dst_fd, src_fd, pos, n)

    delta = dst_offset - offset
    return _loop(step, offset, length)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _buffered(src_fd: int, dst_fd: int, offset: int, length: int, dst_offset: int) -> int:
    def step(pos: int, n: int) -> int:
        data = memoryview(os.pread(src_fd, min(n, BUFFER_BYTES), pos))
        target = pos + delta
        while data:
            written = os.pwrite(dst_fd, data, target)
            data, target = data[written:], target + written
        return target - pos - delta

    delta = dst_offset - offset
    return _loop(step, offset, length, fallback=False)


def _loop(call, offset: int, length: int, fallback: bool = True) -> int:
    """Run `call(position, count)` until `length` bytes moved; stop early on a zero count, or on a refusal
    when there is a `fallback` to hand over to (the buffered copy, the last resort, raises instead)."""
    done = 0
    while done < length:
        try:
            moved = call(offset + done, min(length - done, CALL_BYTES))
        except AttributeError:  # the platform lacks this call
            return done
        except OSError as exc:
            if fallback and exc.errno not in IO_FAILURES:
                return done
            raise
        if moved <= 0:
            return done
        done += moved
    return done
