"""The Python API: plan and upcycle a checkpoint with a rule file."""

from __future__ import annotations

import os
from collections.abc import Callable
from collections.abc import Mapping
from pathlib import Path

from tqdm.auto import tqdm

from .checkpoint import Checkpoint, open_checkpoint
from .errors import SurgeryError
from .execute import assemble as assemble_output, execute, parse_part
from .hub import RepoUnavailable, check_push, open_hub_checkpoint, parse_repo_id, push
from .plan import OPTION_NAMES, Options, Plan, make_plan
from .rules import RuleFile
from .sharing import Written
from .workers import check_jobs


def open_source(
    src: str | os.PathLike | Checkpoint, *, evict_source: bool = False, progress: bool = False
) -> Checkpoint:
    """A local folder or .safetensors file, or a Hub repo id `org/name[@revision]` (a local path that exists wins).

    For a Hub repo, `evict_source` deletes each shard it downloads from the cache after its last use, and
    `progress` shows download bars. If the Hub does not have it either, the error says both (a mistyped local
    path may look like a repo id).
    """
    if isinstance(src, Checkpoint):
        return src
    if isinstance(src, str) and not Path(src).exists() and (repo := parse_repo_id(src)):
        try:
            return open_hub_checkpoint(*repo, evict=evict_source, progress=progress)
        except RepoUnavailable as exc:
            reason = str(exc).removeprefix(f"{src}: ").removeprefix(f"{repo[0]}: ")
            raise RepoUnavailable(f"{src}: no such local file or folder; as a Hub repo id: {reason}") from exc
    return open_checkpoint(src)


def recipe(num_experts: int | None, experts_per_token: int | None, settings: dict) -> tuple[Options, dict]:
    """Split keyword settings into write options (seed, dtype, max_shard_size) and rule-file parameters."""
    options = Options(**{k: settings.pop(k) for k in OPTION_NAMES if k in settings})
    shortcuts = {"num_experts": num_experts, "experts_per_token": experts_per_token}
    return options, {**{k: v for k, v in shortcuts.items() if v is not None}, **settings}


def plan(
    src: str | os.PathLike | Checkpoint,
    rules: str | os.PathLike | RuleFile,
    num_experts: int | None = None,
    experts_per_token: int | None = None,
    *,
    sources: Mapping[str, str | os.PathLike | Checkpoint] | None = None,
    **settings: object,
) -> Plan:
    """Plan from headers alone. `settings` are the rule file's parameters (e.g. `router_std=0.01`) and the write
    options `seed`, `dtype` and `max_shard_size`; `num_experts` and `experts_per_token` are parameters too.
    `sources` names further checkpoints (folders or Hub repos) that the rule file reads besides `src` (`base`)."""
    options, params = recipe(num_experts, experts_per_token, dict(settings))
    others = {name: open_source(path) for name, path in (sources or {}).items()}
    return make_plan(open_source(src), rules, options, params, others)


class _Bar(tqdm):
    """The writing progress bar, without tqdm's monitor thread: `jobs` forks, best from a single-threaded process."""

    monitor_interval = 0


def upcycle(
    src: str | os.PathLike | Checkpoint,
    dst: str | os.PathLike,
    rules: str | os.PathLike | RuleFile,
    num_experts: int | None = None,
    experts_per_token: int | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
    evict_source: bool = False,
    push_to_hub: str | None = None,
    private: bool | None = None,
    resume: bool | str = False,
    shards: str | tuple[int, int] | None = None,
    share: bool = True,
    report: Callable[[Written], None] | None = None,
    jobs: int = 1,
    **settings: object,
) -> Path | None:
    """Upcycle `src` into `dst` with a rule file (built-in name or path); returns the output folder.

    `src` may be a Hub repo id `org/name[@revision]`: each of its shards is downloaded when first needed, and
    with `evict_source` each is deleted from the cache after its last use. `push_to_hub="org/name"` uploads `dst`
    once it is complete (creating the repo, private if `private`).
    `resume=True` (or "verify") continues an interrupted run from the shards it completed. `shards="i/n"` writes
    only worker i's share of the output shards; the worker that completes the set assembles the output (the
    others return None), or call `assemble` at the end.
    On a reflink filesystem (XFS, btrfs, ZFS >= 2.2, bcachefs) holding both the source and `dst`, copies share
    blocks with the source; `share=False` makes real copies (the same bytes). `report`, if given, is called with
    the bytes of shards written and how many of them share blocks with the source. `jobs` processes write the
    shards (for recipes that compute; the same bytes; not with `shards` or `evict_source`).
    `settings`: the rule file's parameters (router_init, router_std, ...) and seed, dtype ("bf16", ...),
    max_shard_size (bytes).
    """
    if push_to_hub:
        check_push(push_to_hub)
    part = parse_part(shards) if isinstance(shards, str) else shards
    if check_jobs(jobs) > 1 and evict_source:
        raise SurgeryError("jobs > 1 and evict_source do not go together: a source shard is only done when every "
                           "process is")
    source = open_source(src, evict_source=evict_source, progress=progress)
    the_plan = plan(source, rules, num_experts, experts_per_token, **settings)
    with _Bar(total=the_plan.nbytes, unit="B", unit_scale=True, desc="writing", disable=not progress) as bar:
        out = execute(the_plan, dst, overwrite=overwrite, progress=bar.update, command=command, resume=resume,
                      part=part, share=share, report=report, jobs=jobs)
    if push_to_hub and out is not None:
        push(out, push_to_hub, private)
    return out


def assemble(
    src: str | os.PathLike | Checkpoint,
    dst: str | os.PathLike,
    rules: str | os.PathLike | RuleFile,
    num_experts: int | None = None,
    experts_per_token: int | None = None,
    *,
    overwrite: bool = False,
    command: str | None = None,
    **settings: object,
) -> Path:
    """Finish an output that workers wrote with `upcycle(..., shards="i/n")`: check every shard, write the index,
    config, side files and model card, and swap the result into `dst`. Takes the same recipe as the workers."""
    the_plan = plan(open_source(src), rules, num_experts, experts_per_token, **settings)
    return assemble_output(the_plan, dst, overwrite=overwrite, command=command)
