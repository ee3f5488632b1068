"""Executing a plan: shards, side files, config and model card into a staging folder, renamed on success."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .errors import SurgeryError
from .plan import Plan
from .report import model_card
from .writer import write_checkpoint


def check_destination(dst: Path, overwrite: bool, source_location: str) -> None:
    """Refuse a destination that would lose data: a file, a non-empty folder (unless overwrite), the source."""
    if dst.exists() and not dst.is_dir():
        raise SurgeryError(f"{dst}: exists and is not a folder")
    source = Path(source_location)
    if source.exists():
        source_dir = (source if source.is_dir() else source.parent).resolve()
        if dst.resolve() == source_dir or dst.resolve() in source_dir.parents:
            raise SurgeryError(f"{dst}: is the source folder or contains it; choose another output folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise SurgeryError(f"{dst}: folder is not empty; pass --overwrite (overwrite=True) to replace it")


def execute(
    plan: Plan,
    dst: str | os.PathLike,
    overwrite: bool = False,
    progress: Callable[[int], None] = lambda n: None,
    command: str | None = None,
) -> Path:
    """Write the plan's output to `dst`. Until everything is written, `dst` is untouched."""
    dst = Path(dst)
    check_destination(dst, overwrite, plan.source.location)
    staging = dst.parent / f".{dst.name}.surgery-partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write_checkpoint(plan.outputs, staging, plan.options.max_shard_size, progress)
        for name in plan.source.side_files:
            shutil.copyfile(plan.source.files.fetch(name), staging / name)
        (staging / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
        (staging / "README.md").write_text(model_card(plan, command))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dst
