"""`surgery fusion-bench`: FusionBench's command line for Mixtral upscaling and depth up-scaling, streamed.

    surgery fusion-bench method=mixtral_moe_upscaling modelpool=mixtral_moe_upscaling \\
        modelpool.models.0.path=SRC method.save_checkpoint=DST taskpool=dummy
    surgery fusion-bench method=depth_upscaling modelpool=depth_upscaling \\
        modelpool.models.0.path=SRC 'method.layer_indices=["range(0,24)","range(8,32)"]' method.model_save_path=DST

Configs are parsed with PyYAML (no omegaconf or Hydra needed) and the model is never loaded.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click
import yaml

from ..api import open_source, upcycle
from ..errors import SurgeryError
from ..plan import Options, make_plan
from ..report import parameter_line
from ..rules import load_rules
from .fusion_bench import (
    DEPTH_RULES, check_save_checkpoint, depth_params, is_depth_upscaling, method_params, mixtral_rules, pretrained_entry,
)

CONFIGS = Path(__file__).resolve().parent / "configs"
#: config groups selected by `group=NAME_OR_PATH` and changed by `group.key=value`
GROUPS = ("method", "modelpool")
TASKPOOLS = ("dummy",)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("arguments", nargs=-1, metavar="KEY=VALUE...")
def fusion_bench_command(arguments: tuple[str, ...]) -> None:
    """Run FusionBench's Mixtral upscaling or depth up-scaling config, streamed: `fusion_bench ARGS` ->
    `surgery fusion-bench ARGS`.

    \b
    method=NAME|FILE       mixtral_moe_upscaling, depth_upscaling (built in) or a method YAML
    modelpool=NAME|FILE    mixtral_moe_upscaling, depth_upscaling (built in) or a model pool YAML
    group.key=VALUE        overrides, e.g. modelpool.models.0.path=SRC method.save_checkpoint=DST
    taskpool=dummy         print the result's parameter counts

    The `_pretrained_` checkpoint is streamed into method.save_checkpoint (Mixtral upscaling, with the
    built-in rule file for its model_type) or method.model_save_path (depth up-scaling, with the
    depth-upscale rule file and method.layer_indices: layer numbers and range strings such as
    "range(8,32)"); it is never loaded. Without a save path nothing is written (plan only).
    """
    from ..cli import friendly_errors  # here, not at the top: surgery.cli imports this module

    friendly_errors(run_job)(arguments)


def run_job(arguments: tuple[str, ...]) -> None:
    """Upcycle or depth-upscale (or, without a save path, plan) the pool's `_pretrained_` checkpoint as the
    method says."""
    configs, taskpool = parse_arguments(arguments)
    depth = is_depth_upscaling(configs["method"])
    params, save_checkpoint = (depth_params if depth else method_params)(configs["method"])
    save_key = "method.model_save_path" if depth else "method.save_checkpoint"
    path, key = pretrained_entry(configs["modelpool"])
    if not isinstance(path, str):
        raise SurgeryError(f"{key}: expected a checkpoint path, got {path!r}")
    try:
        source = open_source(path)
    except SurgeryError as exc:
        hint = "" if Path(path).exists() else f"; give the dense checkpoint with {key}=PATH"
        raise SurgeryError(f"{key}: {exc}{hint}") from None
    rules = load_rules(DEPTH_RULES) if depth else mixtral_rules(source)
    if save_checkpoint is None:
        total = make_plan(source, rules, Options(), params).num_parameters
        click.echo(f"{save_key} is null: planned only, nothing written (set {save_key}=DIR to write the model)",
                   err=True)
    else:
        check_save_checkpoint(save_checkpoint, save_key)
        out = upcycle(source, save_checkpoint, rules, command=shlex.join(["surgery", *sys.argv[1:]]), **params)
        total = open_source(out).num_parameters
        click.echo(f"wrote {out} with rule file {rules.name}")
    if taskpool == "dummy":
        click.echo(parameter_line(total, total))


def parse_arguments(arguments: tuple[str, ...]) -> tuple[dict[str, dict], str | None]:
    """Hydra-style `group=choice` and `group.key=value` arguments -> the group configs and the task pool.

    Choices are applied first, then overrides in order, as Hydra does.
    """
    choices: dict[str, str] = {}
    overrides: list[tuple[str, str]] = []
    for argument in arguments:
        key, sep, value = argument.partition("=")
        group = key.split(".")[0]
        if not sep or group not in (*GROUPS, "taskpool") or key.startswith("taskpool."):
            raise SurgeryError(
                f"{argument!r}: expected method=..., modelpool=..., taskpool=dummy, or an override such as "
                "modelpool.models.0.path=PATH"
            )
        if "." in key:
            overrides.append((key, value))
        else:
            choices[key] = value
    taskpool = choices.pop("taskpool", None)
    if taskpool is not None and taskpool not in TASKPOOLS:
        raise SurgeryError(f"taskpool={taskpool}: only {', '.join(TASKPOOLS)} (print parameter counts) is supported")
    for group in GROUPS:
        if group not in choices:
            raise SurgeryError(f"missing {group}=...: give mixtral_moe_upscaling, depth_upscaling or a path to a {group} YAML")
    configs = {group: load_config(group, choice) for group, choice in choices.items()}
    for key, value in overrides:
        set_key(configs, key, parse_value(value))
    return configs, taskpool


def load_config(group: str, choice: str) -> dict:
    """A group's YAML: a file, or a built-in name from surgery/compat/configs/<group>/."""
    path = Path(choice)
    if not path.is_file():
        path = CONFIGS / group / f"{choice}.yaml"
        if "/" in choice or not path.is_file():
            known = ", ".join(sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")))
            raise SurgeryError(f"{group}={choice}: no such file, nor a built-in {group} (built-in: {known})")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SurgeryError(f"{path}: cannot read YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(config, dict):
        raise SurgeryError(f"{path}: expected a mapping of keys to values")
    return config


def parse_value(text: str) -> object:
    """An override's value as YAML (`null`, `4`, a path); text that is not valid YAML stays as given."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_key(configs: dict, dotted: str, value: object) -> None:
    """Set `group.a.0.b` in the parsed configs; list items are addressed by index."""
    *parents, last = dotted.split(".")
    node: object = configs
    for depth, part in enumerate(parents):
        node = _child(node, part, ".".join(parents[: depth + 1]))
    if isinstance(node, list):
        node[_index(node, last, dotted)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise SurgeryError(f"{dotted}: {'.'.join(parents)} is {node!r}, not a mapping or a list")


def _child(node: object, part: str, where: str) -> object:
    if isinstance(node, list):
        return node[_index(node, part, where)]
    if isinstance(node, dict) and part in node:
        return node[part]
    raise SurgeryError(f"{where}: no such key")


def _index(items: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise SurgeryError(f"{where}: not an index of this list of {len(items)} item(s)")
    return int(part)
