"""Verifying an output folder against a plan: every tensor's bytes, the config, the index and the side files."""

from __future__ import annotations

import filecmp
import json
import os
from collections.abc import Callable
from pathlib import Path

from .checkpoint import INDEX_NAME, Checkpoint, open_checkpoint, read_json
from .errors import SurgeryError
from .plan import Plan
from .producers import Sources
from .writer import holds


def verify(plan: Plan, dst: str | os.PathLike, progress: Callable[[int], None] = lambda n: None) -> int:
    """Compare `dst` with what `plan` produces, streaming; return the number of tensors checked.

    `progress` is called with the byte count of each tensor checked. Raises SurgeryError at the first difference.
    """
    dst = Path(dst)
    output = open_checkpoint(dst)
    _check_files(plan, dst, output)
    return _check_tensors(plan, dst, output, progress)


def _check_files(plan: Plan, dst: Path, output: Checkpoint) -> None:
    """Config, index totals, side files and the set of weight files: what is cheap is checked first."""
    config_path = dst / "config.json"
    if not config_path.is_file():
        raise SurgeryError(f"{dst}: has no config.json")
    if read_json(config_path) != json.loads(json.dumps(plan.config)):
        found = read_json(config_path)
        keys = sorted(k for k in {*found, *plan.config} if found.get(k) != plan.config.get(k))
        raise SurgeryError(f"{config_path}: differs from the planned config (fields: {', '.join(map(str, keys[:5]))})")
    weight_files = {t.file for t in output.tensors.values()}
    stray = sorted(p.name for p in dst.glob("*.safetensors") if p.name not in weight_files)
    if stray:
        raise SurgeryError(f"{dst}: holds safetensors files that are not part of the checkpoint ({', '.join(stray[:3])})")
    if (dst / INDEX_NAME).is_file():
        totals = read_json(dst / INDEX_NAME).get("metadata", {})
        expected = {"total_size": plan.nbytes, "total_parameters": plan.num_parameters}
        for key, value in expected.items():
            if key in totals and totals[key] != value:
                raise SurgeryError(f"{dst / INDEX_NAME}: metadata.{key} is {totals[key]}, planned {value}")
    for name in plan.source.side_files:
        if not (dst / name).is_file():
            raise SurgeryError(f"{dst}: side file {name} is missing")
        if not filecmp.cmp(plan.source.files.fetch(name), dst / name, shallow=False):
            raise SurgeryError(f"{dst / name}: differs from the source's {name}")


def _check_tensors(plan: Plan, dst: Path, output: Checkpoint, progress: Callable[[int], None]) -> int:
    planned = {p.tensor.name: p.tensor for p in plan.tensors}
    extra = sorted(set(output.tensors) - set(planned))
    missing = sorted(set(planned) - set(output.tensors))
    if extra or missing:
        raise SurgeryError(f"{dst}: tensors differ from the plan (missing: {missing[:3]}, unexpected: {extra[:3]})")
    sources = Sources([t.producer for t in planned.values()])
    try:
        for name, tensor in planned.items():
            found = output.tensors[name]
            if (found.dtype, found.shape) != (tensor.dtype, tensor.shape):
                raise SurgeryError(
                    f"{dst}: {name} is {found.dtype}{list(found.shape)}, planned {tensor.dtype}{list(tensor.shape)}"
                )
            with open(dst / found.file, "rb") as f:
                if not holds(f, found.offset, tensor, sources):
                    raise SurgeryError(f"{dst}: {name} does not hold the planned bytes")
            progress(tensor.nbytes)
    finally:
        sources.close()
    return len(planned)
