"""The Python API: plan and upcycle a checkpoint with a rule file."""

from __future__ import annotations

import os
from pathlib import Path

from tqdm.auto import tqdm

from .checkpoint import Checkpoint, open_checkpoint
from .execute import execute
from .plan import Options, Plan, make_plan
from .rules import RuleFile


def open_source(src: str | os.PathLike | Checkpoint) -> Checkpoint:
    """A local folder or .safetensors file."""
    if isinstance(src, Checkpoint):
        return src
    return open_checkpoint(src)


def plan(
    src: str | os.PathLike | Checkpoint,
    rules: str | os.PathLike | RuleFile,
    num_experts: int,
    experts_per_token: int,
    **options: object,
) -> Plan:
    """Plan an upcycle from headers alone; see `Options` for the other keyword options."""
    return make_plan(open_source(src), rules, Options(num_experts, experts_per_token, **options))


def upcycle(
    src: str | os.PathLike | Checkpoint,
    dst: str | os.PathLike,
    rules: str | os.PathLike | RuleFile,
    num_experts: int,
    experts_per_token: int,
    *,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
    **options: object,
) -> Path:
    """Upcycle `src` into `dst` with a rule file (built-in name or path); returns the output folder.

    Options: router_init ("normal", "zeros", "uniform"), router_std, seed, dtype ("bf16", ...),
    max_shard_size (bytes).
    """
    the_plan = plan(src, rules, num_experts, experts_per_token, **options)
    with tqdm(total=the_plan.nbytes, unit="B", unit_scale=True, desc="writing", disable=not progress) as bar:
        return execute(the_plan, dst, overwrite=overwrite, progress=bar.update, command=command)
