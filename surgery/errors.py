"""The one exception type the tool raises for bad input, and one-line messages for operating-system errors."""

from __future__ import annotations

import errno
import os


class SurgeryError(Exception):
    """A user-facing error: the message says what is wrong and, where possible, what to do."""


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message (its type's name if it has none): for one-line errors
    that quote a library's exception."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


#: what to do about the OS errors a long write meets
_ADVICE = {
    errno.ENOSPC: "the disk is full: free space or choose a DST on another disk",
    errno.EDQUOT: "the disk quota is exceeded: free space or choose a DST elsewhere",
    errno.EFBIG: "the file is larger than the file-size limit (`ulimit -f`) or the filesystem allows: "
                 "pass a smaller --max-shard-size",
    errno.EROFS: "the filesystem is read-only: choose a DST on a writable disk",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EMFILE: "too many open files: raise the limit with `ulimit -n`",
    errno.ENFILE: "the system has too many open files",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EIO: "the disk reported an I/O error",
    errno.ENAMETOOLONG: "the path is too long",
}


def os_error(exc: OSError, path: str | os.PathLike | None = None) -> SurgeryError:
    """A one-line SurgeryError for `exc`, naming the file (`path` if the exception does not name one)."""
    where = exc.filename if exc.filename is not None else path
    reason = _ADVICE.get(exc.errno or 0) or exc.strerror or str(exc)
    return SurgeryError(f"{os.fsdecode(where)}: {reason}" if where is not None else reason)
