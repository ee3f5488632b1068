"""`--jobs N`: shards written by N forked processes. The same bytes as one process; progress counts every byte; a
failing or killed worker and a signal to the run end it cleanly (one error line, nothing left, no process left)."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import surgery
from surgery.errors import SurgeryError
from surgery.execute import execute
from surgery.workers import balanced

from .test_cli import assert_one_line_error, run
from .test_safety import (
    RECIPE, ROOT, SMALL, finish, leftovers, one_error_line, staged_shards, start, wait_for, weights,
)

COMPUTED = ["--drop-ratio", "0.5", "--expert-noise", "0.01"]


@pytest.fixture
def src(mistral, tmp_path) -> Path:
    return shutil.copytree(mistral, tmp_path / "src")


@pytest.fixture(scope="module")
def one_process(mistral, tmp_path_factory) -> dict[str, str]:
    """Digest (less the model card) of the SMALL recipe's output written by one process."""
    out = tmp_path_factory.mktemp("one-process") / "out"
    assert run("upcycle", mistral, out, *SMALL).exit_code == 0
    return weights(out)


def workers_of(pid: int) -> list[int]:
    """The live child processes of `pid`."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                children.append(int(entry.name))
    return children


def existing(pids: list[int]) -> list[int]:
    """Those of `pids` still in the process table, running or not reaped (zombies)."""
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


@pytest.mark.parametrize("jobs", ["2", "3"])
def test_jobs_write_the_same_bytes(src, tmp_path, one_process, jobs):
    result = run("upcycle", src, tmp_path / "out", *SMALL, "--jobs", jobs)
    assert result.exit_code == 0, result.output
    assert weights(tmp_path / "out") == one_process


def test_computed_recipes_write_the_same_bytes_in_parallel(src, tmp_path):
    for jobs in ("1", "2"):
        result = run("upcycle", src, tmp_path / jobs, *SMALL, *COMPUTED, "-j", jobs)
        assert result.exit_code == 0, result.output
    assert weights(tmp_path / "1") == weights(tmp_path / "2")


def test_progress_counts_every_byte_once(src, tmp_path):
    plan = surgery.plan(src, "mistral-to-mixtral", 4, 2, max_shard_size=20_000, drop_ratio=0.5)
    counted: list[int] = []
    execute(plan, tmp_path / "out", progress=counted.append, jobs=3)
    assert sum(counted) == plan.nbytes and len(counted) >= len(plan.outputs)


def test_a_signal_stops_every_worker_and_leaves_nothing(src, tmp_path):
    dst = tmp_path / "out"
    process = start("upcycle", src, dst, *SMALL, "-j", "2")
    wait_for(lambda: len(staged_shards(dst)) >= 2 and len(workers_of(process.pid)) == 2)
    workers = workers_of(process.pid)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    left = existing(workers)  # at once, before anything else could reap them
    code, _, err = finish(process)
    assert left == []  # the run stopped and reaped its workers before it ended
    assert code == 128 + signal.SIGTERM
    line = one_error_line(err)
    assert "SIGTERM" in line and "was not changed" in line
    assert leftovers(tmp_path) == [] and not dst.exists()


def test_a_killed_worker_fails_the_run_at_once_in_one_line(src, tmp_path):
    dst = tmp_path / "out"
    process = start("upcycle", src, dst, *SMALL, "-j", "2", delay=0.5)  # each worker: ~20 tensors, 10 s or more
    wait_for(lambda: len(workers_of(process.pid)) == 2 and len(staged_shards(dst)) >= 1)
    workers = workers_of(process.pid)
    killed = time.monotonic()
    os.kill(workers[0], signal.SIGKILL)  # as the kernel's out-of-memory killer would
    process.wait(timeout=60)
    left = existing(workers)
    code, _, err = finish(process)
    assert time.monotonic() - killed < 5, "the other worker was not stopped"
    assert left == [] and code == 1 and "a worker process ended by SIGKILL" in one_error_line(err)
    assert leftovers(tmp_path) == [] and not dst.exists()


def test_a_worker_error_is_one_line_and_leaves_nothing(src, tmp_path):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    result = subprocess.run(
        [sys.executable, "-m", "surgery", "upcycle", src, tmp_path / "out", *RECIPE, "--max-shard-size", "100KB",
         "-j", "2"], cwd=ROOT, capture_output=True, text=True, preexec_fn=limit,
    )
    assert result.returncode == 1 and "--max-shard-size" in one_error_line(result.stderr)
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_jobs_that_cannot_work(src, tmp_path):
    assert_one_line_error(run("upcycle", src, tmp_path / "out", *SMALL, "-j", "2", "--shards", "1/2"),
                          "split the work one way")
    assert run("upcycle", src, tmp_path / "out", *SMALL, "-j", "0").exit_code == 2  # click's usage error
    with pytest.raises(SurgeryError, match="evict_source"):
        surgery.upcycle(src, tmp_path / "out", "mistral-to-mixtral", 4, 2, jobs=2, evict_source=True, progress=False)
    with pytest.raises(SurgeryError, match="positive integer"):
        surgery.upcycle(src, tmp_path / "out", "mistral-to-mixtral", 4, 2, jobs=0, progress=False)
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_an_interrupted_resumable_run_keeps_what_its_workers_completed(src, tmp_path, one_process):
    dst = tmp_path / "out"
    process = start("upcycle", src, dst, *SMALL, "-j", "2", "--resume")
    wait_for(lambda: len(staged_shards(dst)) >= 3)
    process.send_signal(signal.SIGTERM)
    code, _, err = finish(process)
    kept = staged_shards(dst)
    assert code == 128 + signal.SIGTERM and "--resume to continue" in one_error_line(err) and len(kept) >= 3
    assert not any(p.name.endswith(".partial") for p in kept[0].parent.iterdir())
    result = run("upcycle", src, dst, *SMALL, "-j", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert weights(dst) == one_process and leftovers(tmp_path) == []


@given(sizes=st.lists(st.integers(0, 1000), max_size=40), parts=st.integers(1, 8))
def test_balanced_cuts_the_order_into_runs_of_about_equal_bytes(sizes, parts):
    runs = balanced(sizes, parts)
    assert [i for run in runs for i in run] == list(range(len(sizes)))  # every item once, in order
    assert len(runs) <= parts and all(runs)
    if sum(sizes):
        assert all(sum(sizes[i] for i in run) <= sum(sizes) / parts + max(sizes) for run in runs)
