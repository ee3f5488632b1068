"""The output folder during a run: safety checks, a lock beside it, the staging folder, and the final atomic swap.

Nothing is written into DST itself: the output is assembled in a hidden staging folder beside it and swapped in
at the end, so an interrupt at any moment leaves the old output (or nothing) or the complete new one. A lock file
beside DST keeps two runs apart; leftovers of a run that was killed are recognised and removed by the next one.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from .checkpoint import Checkpoint
from .errors import SurgeryError, os_error
from .signals import signals_deferred

STAGING_SUFFIX = ".surgery-partial"
OLD_SUFFIX = ".surgery-old"
LOCK_SUFFIX = ".surgery-lock"
#: what a folder that `--overwrite` may replace holds at least one of
CHECKPOINT_MARKERS = ("config.json", "*.safetensors", "*.safetensors.index.json")


class Busy(SurgeryError):
    """Another run holds the lock on DST."""


def resolve_destination(dst: str | os.PathLike) -> Path:
    """The real folder DST names (symlinks followed), after refusing what cannot be a destination."""
    given = Path(dst)
    real = given.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise SurgeryError(f"{given}: is the current folder or contains it; name a new output folder (e.g. ./out)")
    for ancestor in real.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise SurgeryError(f"{given}: {ancestor} is a file, so no folder can be made below it")
            break
    if real.exists() and not real.is_dir():
        raise SurgeryError(f"{given}: exists and is not a folder")
    return real


def check_apart(real: Path, protected: Iterable[Path], areas: Iterable[Path], given: Path) -> None:
    """Refuse a DST that is or holds a `protected` path (the real paths of the source's folder and files), or that
    is, holds or lies inside one of the `areas` (a download cache)."""
    for path in protected:
        if path == real or real in path.parents:
            raise SurgeryError(
                f"{given}: is or holds the source's files ({path}); writing there would destroy them: choose an "
                "output folder outside the source"
            )
    for area in areas:
        if area == real or real in area.parents or area in real.parents:
            raise SurgeryError(f"{given}: lies in the source's cache ({area}); choose an output folder outside it")


def looks_like_checkpoint(folder: Path) -> bool:
    """True for a folder that holds a config.json or safetensors files, and no visible subfolders."""
    entries = list(folder.iterdir())
    if any(p.is_dir() and not p.name.startswith(".") for p in entries):
        return False
    return any(p.match(pattern) for p in entries for pattern in CHECKPOINT_MARKERS)


def listing(folder: Path) -> frozenset[tuple] | None:
    """A cheap fingerprint of a folder's entries (names, inodes, sizes, times); None if it does not exist."""
    try:
        with os.scandir(folder) as entries:
            stats = [(e.name, e.stat(follow_symlinks=False)) for e in entries]
        own = os.stat(folder)
    except FileNotFoundError:
        return None
    return frozenset([("", own.st_ino), *((n, s.st_ino, s.st_size, s.st_mtime_ns) for n, s in stats)])


def sibling(path: Path, suffix: str) -> Path:
    """A hidden name beside `path` for the run's own files: `.NAME.surgery-...`."""
    return path.with_name(f".{path.name}{suffix}")


class Lock:
    """An flock on a file beside DST: exclusive for a run, shared for the workers of a split run."""

    def __init__(self, path: Path, shared: bool = False):
        self.path, self.shared, self.fd = path, shared, -1

    def acquire(self, what: str) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise Busy(
                    f"{what}: another surgery run (pid {holder}) is writing it (lock {self.path}); wait for it to end"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:  # not a lock file that its holder deleted while we waited for it
                break
            os.close(fd)
        self.fd = fd
        if not self.shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd < 0:
            return
        if not self.shared:
            self.path.unlink(missing_ok=True)  # while still holding it: see the samestat check above
        os.close(self.fd)
        self.fd = -1


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(a))


class Destination:
    """DST for one run, used as a context manager around the work.

    On entry: parent folders made, the lock taken, leftovers of killed runs cleared, DST's state checked and
    remembered. `commit()` swaps the staging folder in, after checking that nobody changed DST meanwhile. On
    exit the lock is released, and after a failure the parent folders this run made are removed again.
    """

    def __init__(self, dst: str | os.PathLike, sources: Iterable[Checkpoint], overwrite: bool, shared: bool = False):
        self.given = Path(dst)
        self.path = resolve_destination(dst)
        for source in sources:
            check_apart(self.path, source.protected_paths(), source.files.roots(), self.given)
        self.overwrite, self.shared = overwrite, shared
        self.staging = sibling(self.path, STAGING_SUFFIX)
        self.old = sibling(self.path, OLD_SUFFIX)
        self.lock = Lock(sibling(self.path, LOCK_SUFFIX), shared)
        self.made_parents: list[Path] = []
        self.snapshot: frozenset[tuple] | None = None

    def __enter__(self) -> Destination:
        try:
            self._make_parents()
            self.lock.acquire(str(self.given))
            if not self.shared:
                self._clear_leftovers()
            self._check_state()
            self.snapshot = listing(self.path)
        except BaseException as exc:
            self.__exit__(type(exc), exc, None)
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        with signals_deferred():
            self.lock.release()
            if exc_type is not None:
                self.remove_made_parents()

    def remove_made_parents(self) -> None:
        """Remove the parent folders this run created, if they are empty (nothing of ours is left in them)."""
        for folder in reversed(self.made_parents):
            try:
                folder.rmdir()
            except OSError:
                break
        self.made_parents = []

    def reset_staging(self) -> None:
        """Remove the staging folder (a previous run's, or this one's after a failure)."""
        with signals_deferred():
            shutil.rmtree(self.staging, ignore_errors=True)

    def commit(self) -> None:
        """Swap the complete staging folder in as DST; the old DST (if any) is removed after the swap."""
        with signals_deferred():
            if listing(self.path) != self.snapshot:
                raise SurgeryError(
                    f"{self.given}: changed while this run was writing (another program wrote into it); "
                    "nothing was replaced: check what is there and run again"
                )
            try:
                if self.snapshot is None:
                    os.rename(self.staging, self.path)
                elif exchange(self.staging, self.path):
                    os.rename(self.staging, self.old)
                else:  # no atomic exchange here: old aside, new in; a kill in between is repaired by the next run
                    os.rename(self.path, self.old)
                    os.rename(self.staging, self.path)
            except OSError as exc:
                raise os_error(exc, self.path) from None
            self.made_parents = []
        shutil.rmtree(self.old, ignore_errors=True)

    def _make_parents(self) -> None:
        missing = [p for p in reversed(self.path.parents) if not p.exists()]
        for folder in missing:
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise os_error(exc, folder) from None
            self.made_parents.append(folder)

    def _clear_leftovers(self) -> None:
        """Holding the exclusive lock, any `.surgery-old` beside DST belongs to a run that was killed mid-swap."""
        if self.old.exists():
            if self.path.exists():
                shutil.rmtree(self.old)
            else:
                os.rename(self.old, self.path)

    def _check_state(self) -> None:
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise SurgeryError(f"{self.given}: exists and is not a folder")
        if not any(self.path.iterdir()):
            return
        if not self.overwrite:
            raise SurgeryError(f"{self.given}: folder is not empty; pass --overwrite (overwrite=True) to replace it")
        if not looks_like_checkpoint(self.path):
            raise SurgeryError(
                f"{self.given}: does not look like a checkpoint (no config.json or .safetensors file, or it has "
                "subfolders), so --overwrite will not replace it; remove it yourself or choose another folder"
            )
