"""Executing a plan: shards, index, side files, config and model card into a staging folder, swapped in at the end.

A run holds a lock on DST, writes into `.DST.surgery-partial` beside it, and swaps that in when complete, so DST
only ever holds the old output or the complete new one. Interrupted runs can be resumed (`resume`), and the
shards of one output can be split over several workers (`part`), the last of which assembles the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from .destination import Busy, Destination
from .errors import SurgeryError, os_error
from .plan import Plan
from .producers import Sources
from .report import model_card
from .sharing import SpaceProbe, Written
from .signals import Interrupted, interrupts_raise
from .workers import check_jobs
from .writer import Shard, plan_shards, shard_is_complete, write_index, write_shards

#: inside the staging folder: the fingerprint of the plan it is being written for (removed before the swap)
RECIPE_FILE = ".surgery-recipe"
RESUME_MODES = (False, True, "verify")


def execute(
    plan: Plan,
    dst: str | os.PathLike,
    overwrite: bool = False,
    progress: Callable[[int], None] = lambda n: None,
    command: str | None = None,
    resume: bool | str = False,
    part: tuple[int, int] | None = None,
    share: bool = True,
    report: Callable[[Written], None] | None = None,
    jobs: int = 1,
) -> Path | None:
    """Write the plan's output to `dst`; until everything is written, `dst` is untouched.

    `resume` (True, or "verify" to also re-read every byte) continues from the shards a failed or interrupted run
    left, and keeps the finished shards if this run fails too. `part=(i, n)` writes only the shards of worker i of
    n (1-based) into the shared staging folder; the worker that finds all shards complete assembles the output.
    Without `share`, copies are real copies even where the filesystem could share blocks with the source. Once this
    run's shards are written, `report` gets their size and how much of it shares blocks with the source. `jobs`
    processes write the shards (see `workers`; not with `part`).
    Returns `dst`, or None for a worker that did not assemble.
    """
    if resume not in RESUME_MODES:
        raise SurgeryError(f"resume must be one of False, True, 'verify'; got {resume!r}")
    if check_jobs(jobs) > 1 and part is not None:
        raise SurgeryError("jobs and a worker's part (--shards I/N) do not go together: split the work one way")
    shards = plan_shards(plan.outputs, plan.options.max_shard_size)
    for source in plan.sources.values():
        source.check_readable()
    fingerprint = _fingerprint(plan, shards)
    with interrupts_raise():
        if part is None:
            return _whole(plan, shards, dst, overwrite, progress, command, resume, fingerprint, share, report, jobs)
        _part(plan, shards, dst, overwrite, progress, part, fingerprint, share, report)
        return assemble_shards(plan, shards, dst, overwrite, command, fingerprint, required=False)


def assemble(plan: Plan, dst: str | os.PathLike, overwrite: bool = False, command: str | None = None) -> Path:
    """Finish an output whose shards workers wrote (`execute(..., part=...)`): check them, write the rest, swap in."""
    shards = plan_shards(plan.outputs, plan.options.max_shard_size)
    with interrupts_raise():
        out = assemble_shards(plan, shards, dst, overwrite, command, _fingerprint(plan, shards), required=True)
    assert out is not None
    return out


def parse_part(text: str) -> tuple[int, int]:
    """'3/8' -> (3, 8): worker 3 of 8, numbered from 1."""
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit()) or not 1 <= int(i) <= int(n):
        raise SurgeryError(f"--shards {text!r}: expected I/N with 1 <= I <= N, e.g. 3/8 for worker 3 of 8")
    return int(i), int(n)


def _whole(plan: Plan, shards: list[Shard], dst: str | os.PathLike, overwrite: bool,
           progress: Callable[[int], None], command: str | None, resume: bool | str, fingerprint: str,
           share: bool, report: Callable[[Written], None] | None, jobs: int) -> Path:
    with Destination(dst, plan.sources.values(), overwrite) as d:
        try:
            _open_staging(d, fingerprint, keep=bool(resume))
            done = _complete(shards, d.staging, verify=resume == "verify")
            progress(sum(s.nbytes for s in done))
            written = _write(shards, done, d.staging, progress, share, jobs)
            _finish(plan, shards, d.staging, command)
            d.commit()
        except BaseException as exc:
            if not resume:
                d.reset_staging()
            raise _explain(exc, d, shards, resume=bool(resume)) from None
    if report:
        report(written)
    return d.given


def _part(plan: Plan, shards: list[Shard], dst: str | os.PathLike, overwrite: bool,
          progress: Callable[[int], None], part: tuple[int, int], fingerprint: str, share: bool,
          report: Callable[[Written], None] | None) -> None:
    i, n = part
    mine = shards[i - 1::n]
    with Destination(dst, plan.sources.values(), overwrite, shared=True) as d:
        try:
            d.staging.mkdir(exist_ok=True)
            _claim(d.staging, fingerprint)
            done = _complete(mine, d.staging, verify=False)
            progress(sum(s.nbytes for s in done))
            written = _write(mine, done, d.staging, progress, share)
        except BaseException as exc:
            raise _explain(exc, d, mine, resume=True, worker=f"worker {i}/{n}") from None
    if report:
        report(written)


def _write(shards: list[Shard], done: list[Shard], folder: Path, progress: Callable[[int], None],
           share: bool, jobs: int = 1) -> Written:
    """Write the `shards` not `done` into `folder` with `jobs` processes; how many bytes that took and how many
    share blocks with the source."""
    todo = [s for s in shards if s not in done]
    probe = SpaceProbe(folder)
    write_shards(todo, folder, progress, share, jobs)
    return probe.measure([folder / s.name for s in todo])


def assemble_shards(plan: Plan, shards: list[Shard], dst: str | os.PathLike, overwrite: bool,
                    command: str | None, fingerprint: str, required: bool) -> Path | None:
    """Finish DST from a staging folder that workers filled; None (unless `required`) when it is not complete yet."""
    try:
        with Destination(dst, plan.sources.values(), overwrite) as d:
            if _recipe(d.staging) != fingerprint:
                if not required:
                    return None
                raise SurgeryError(f"{d.staging}: holds no shards of this recipe; run the workers (--shards I/N) first")
            missing = [s.name for s in shards if not shard_is_complete(s, d.staging / s.name)]
            if missing:
                if not required:
                    return None
                raise SurgeryError(
                    f"{d.given}: {len(missing)} of {len(shards)} shards are not written yet "
                    f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); run the workers that write them"
                )
            _finish(plan, shards, d.staging, command)
            d.commit()
    except Busy:
        if required:
            raise
        return None  # another worker still writes: the last one to finish assembles
    return d.given


def _fingerprint(plan: Plan, shards: list[Shard]) -> str:
    """Identifies what a staging folder is being written for: source files, rules, options, every shard's header."""
    facts = {
        "sources": [(name, source.location, source.revision, source.identity())
                    for name, source in plan.sources.items()],
        "rules": plan.rules.sha256,
        "options": asdict(plan.options),
        "shards": [(s.name, hashlib.sha256(s.header).hexdigest()) for s in shards],
        "config": plan.config,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def _recipe(staging: Path) -> str | None:
    try:
        return (staging / RECIPE_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _open_staging(d: Destination, fingerprint: str, keep: bool) -> None:
    """Make the staging folder; with `keep`, continue in one a previous run of the same recipe left."""
    if d.staging.exists():
        found = _recipe(d.staging)
        if keep and found == fingerprint:
            return
        if keep and found is not None:
            raise SurgeryError(
                f"{d.given}: the unfinished output beside it ({d.staging.name}) was started with another recipe "
                "or source; run without --resume to start over"
            )
        d.reset_staging()
    d.staging.mkdir()
    (d.staging / RECIPE_FILE).write_text(fingerprint + "\n")


def _claim(staging: Path, fingerprint: str) -> None:
    """For workers sharing a staging folder: record the recipe once (atomically), or check it is the same."""
    temp = staging / f"{RECIPE_FILE}.{os.getpid()}"
    temp.write_text(fingerprint + "\n")
    try:
        os.link(temp, staging / RECIPE_FILE)
    except FileExistsError:
        pass
    finally:
        temp.unlink()
    if _recipe(staging) != fingerprint:
        raise SurgeryError(
            f"{staging}: other workers are writing a different recipe or source into it; give every worker the "
            "same SRC, rules and options"
        )


def _complete(shards: list[Shard], folder: Path, verify: bool) -> list[Shard]:
    """The shards already complete in `folder` (headers and sizes checked; with `verify`, every byte too)."""
    sources = Sources([t.producer for s in shards for t in s.tensors]) if verify else None
    try:
        return [s for s in shards if shard_is_complete(s, folder / s.name, sources)]
    finally:
        if sources is not None:
            sources.close()


def _finish(plan: Plan, shards: list[Shard], folder: Path, command: str | None) -> None:
    """Everything but the shards: index, side files (tokenizer, ...), config and model card."""
    try:
        if len(shards) > 1:
            write_index(folder, shards)
        for name in plan.source.side_files:
            shutil.copyfile(plan.source.files.fetch(name), folder / name)
        (folder / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True, allow_nan=False) + "\n")
        (folder / "README.md").write_text(model_card(plan, command))
        (folder / RECIPE_FILE).unlink(missing_ok=True)
    except OSError as exc:
        raise os_error(exc) from None


def _explain(exc: BaseException, d: Destination, shards: list[Shard], resume: bool, worker: str = "") -> BaseException:
    """The exception to report for a failed run, saying what was kept and how to continue."""
    if resume:
        kept = sum((d.staging / s.name).is_file() for s in shards)
        again = "run the same worker again" if worker else "run again with --resume"
        outcome = f"{kept} of {len(shards)} shards are kept in {d.staging}: {again} to continue"
    else:
        outcome = f"{d.given} was not changed"
    prefix = f"{worker}: " if worker else ""
    if isinstance(exc, (KeyboardInterrupt, Interrupted)):
        signum = exc.signum if isinstance(exc, Interrupted) else 2
        return Interrupted(signum, f"{prefix}{Interrupted(signum)}; {outcome}")
    if isinstance(exc, SurgeryError):
        return SurgeryError(f"{prefix}{exc} ({outcome})")
    if isinstance(exc, OSError):
        return SurgeryError(f"{prefix}{os_error(exc)} ({outcome})")
    return exc
