"""Work split over forked processes (`jobs`): for recipes that compute (Drop-Upcycling, noise, --dtype, means),
whose speed is the CPU's, not the disk's.

`run_split` forks a worker per group of items; each worker does its items and reports each one done through a
pipe, where the caller (still the one process that holds the lock on DST, the staging folder and the swap) takes
it up. When a worker fails or the caller is interrupted, the other workers are stopped with SIGTERM and reaped
before the error goes on, so no process outlives the run.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
from collections.abc import Callable, Collection, Sequence

from .errors import SurgeryError
from .signals import Interrupted

_DONE, _ERROR = b"D", b"E"
_SIZE = struct.Struct("<q")


def check_jobs(jobs: object) -> int:
    """`jobs` as a positive int; SurgeryError otherwise, or where processes cannot be forked."""
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise SurgeryError(f"jobs must be a positive integer, got {jobs!r}")
    if jobs > 1 and not hasattr(os, "fork"):
        raise SurgeryError("jobs > 1 needs os.fork (Linux, macOS); run with one job")
    return jobs


def balanced(sizes: Sequence[int], parts: int) -> list[list[int]]:
    """Indices 0..len(sizes)-1 in at most `parts` runs of consecutive items with about equal total sizes."""
    total, runs, done = sum(sizes), [[] for _ in range(parts)], 0
    for i, size in enumerate(sizes):
        runs[min(parts - 1, done * parts // total) if total else i * parts // len(sizes)].append(i)
        done += size
    return [run for run in runs if run]


def run_split(groups: list[list[int]], work: Callable[[list[int], Callable[[int], None]], None],
              done: Callable[[int], None]) -> None:
    """`work(group, report)` for every group, each in a forked process (one group: in this one), where `report(i)`
    says item i is done; `done(i)` is then called here. Raises the first worker's error."""
    if len(groups) <= 1:
        for group in groups:
            work(group, done)
        return
    pipes: dict[int, int] = {}  # read end -> worker pid
    try:
        for group in groups:
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the worker: never returns into the caller's frames (their cleanup is the caller's)
                os.close(read)
                _work(work, group, write)
            os.close(write)
            pipes[read] = pid
        failure = _follow(pipes, done)
    except BaseException:
        _stop(pipes.values())
        raise
    finally:
        for read in pipes:
            os.close(read)
    if failure is not None:
        raise failure


def _work(work: Callable[[list[int], Callable[[int], None]], None], group: list[int], pipe: int) -> None:
    """A worker's life: do `group`, report on `pipe` each item done and any error, exit (an interrupted worker only
    exits: whoever sent the signal tells the run)."""
    code = 0
    try:
        work(group, lambda i: _send(pipe, _DONE, _SIZE.pack(i)))
    except Interrupted as exc:
        code = exc.exit_code
    except BaseException as exc:
        code = 1
        try:
            payload = pickle.dumps(exc)
            pickle.loads(payload)
        except Exception:
            payload = pickle.dumps(SurgeryError(f"a worker failed: {type(exc).__name__}: {exc}"))
        _send(pipe, _ERROR, payload)
    finally:
        os._exit(code)


def _send(pipe: int, kind: bytes, payload: bytes) -> None:
    data = memoryview(kind + _SIZE.pack(len(payload)) + payload)
    while data:
        data = data[os.write(pipe, data):]


def _follow(pipes: dict[int, int], done: Callable[[int], None]) -> BaseException | None:
    """Take up what the workers report until they all end; the first failure (the others are stopped then)."""
    buffers = {read: b"" for read in pipes}
    failure: BaseException | None = None
    while buffers:
        for read in select.select(list(buffers), [], [])[0]:
            data = os.read(read, 1 << 16)
            if not data:  # the worker is ending
                del buffers[read]
                status = os.waitpid(pipes[read], 0)[1]
                if failure is None and status != 0:
                    failure = SurgeryError(f"a worker process ended {_how(status)} before its work was done")
                    _stop([pipes[r] for r in buffers], wait=False)
                continue
            buffers[read] += data
            while len(buffers[read]) >= 1 + _SIZE.size:
                (size,) = _SIZE.unpack_from(buffers[read], 1)
                if len(buffers[read]) < 1 + _SIZE.size + size:
                    break
                kind, payload = buffers[read][:1], buffers[read][1 + _SIZE.size:1 + _SIZE.size + size]
                buffers[read] = buffers[read][1 + _SIZE.size + size:]
                if kind == _DONE:
                    if failure is None:
                        done(_SIZE.unpack(payload)[0])
                elif failure is None:
                    failure = pickle.loads(payload)
                    _stop([pipes[r] for r in buffers if r != read], wait=False)
    return failure


def _stop(pids: Collection[int], wait: bool = True) -> None:
    """SIGTERM to workers that may still run (they clean up after themselves), then reap them if `wait`."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if wait:
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _how(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    signum = -code if code < 0 else code - 128 if code > 128 else 0  # killed, or ended by a signal it handled
    try:
        return f"by {signal.Signals(signum).name}"
    except ValueError:
        return f"with exit code {code}"
