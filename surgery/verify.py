"""Verifying an output folder against a plan: every tensor present, with exactly the planned bytes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .checkpoint import open_checkpoint
from .errors import SurgeryError
from .plan import Plan
from .producers import Sources


def verify(plan: Plan, dst: str | os.PathLike, progress: Callable[[int], None] = lambda n: None) -> int:
    """Compare `dst` with what `plan` produces, streaming; return the number of tensors checked.

    `progress` is called with the byte count of each tensor checked.
    """
    output = open_checkpoint(dst)
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
            with open(Path(dst) / found.file, "rb") as f:
                f.seek(found.offset)
                for chunk in tensor.producer.iter_bytes(sources):
                    if f.read(len(chunk)) != chunk:
                        raise SurgeryError(f"{dst}: {name} does not hold the planned bytes")
            sources.finished(tensor.producer)
            progress(tensor.nbytes)
    finally:
        sources.close()
    return len(planned)
