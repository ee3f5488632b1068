"""The `surgery` command line: upcycle, plan, inspect, verify, rules and demo."""

from __future__ import annotations

import functools
import re
import shlex
import sys
from pathlib import Path

import click

from .errors import SurgeryError, os_error
from .signals import Interrupted

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal, as Hugging Face); '2GiB' -> 2 * 2**30; '1000' -> 1000 bytes."""
    match = _SIZE.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a size such as 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    scale = 1024 ** "KMGT".index(unit[0]) * 1024 if "I" in unit else _UNITS[unit[:1]]
    return int(number * scale)


def _size_option(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    return parse_size(value)


def _param_option(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    params = {}
    for text in values:
        name, sep, value = text.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{text!r} is not NAME=VALUE")
        params[name.strip()] = value
    return params


def recipe_options(command):
    """The options shared by the commands that plan: the rule file, its parameters, and how to write."""
    options = [
        click.option("--rules", "-r", required=True, help="Built-in rule name (see `surgery rules`) or path to a rule YAML."),
        click.option("--param", "-p", "params", multiple=True, metavar="NAME=VALUE", callback=_param_option,
                     help="A parameter of the rule file (see `surgery rules NAME`); repeat for several."),
        click.option("--num-experts", "-e", type=int, help="Shortcut for -p num_experts=N: experts per MoE layer."),
        click.option("--experts-per-token", "-k", type=int, help="Shortcut for -p experts_per_token=K: top-k routing."),
        click.option("--router-init", help="Shortcut for -p router_init=...: normal, zeros or uniform."),
        click.option("--router-std", type=float, help="Shortcut for -p router_std=...: std of the normal router init."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed for new values; derived per tensor, so output does not depend on shard order."),
        click.option("--dtype", default=None, help="Output dtype for float tensors (bf16, fp16, fp32). Default: the source's."),
        click.option("--max-shard-size", default="5GB", show_default=True, callback=_size_option,
                     help="Largest output shard, e.g. 5GB, 500MB, 2GiB."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


#: options that stand for a rule-file parameter of the same name
SHORTCUTS = ("num_experts", "experts_per_token", "router_init", "router_std")


def _recipe(kwargs: dict) -> dict:
    """The keyword arguments of the Python API: parameters (shortcuts, then -p) and write options."""
    params = kwargs.pop("params")
    for name in SHORTCUTS:
        value = kwargs.pop(name)
        if value is not None:
            if name in params:
                raise click.UsageError(f"{name} is given twice (as its option and as -p {name}=...)")
            params[name] = value
    return {**params, **{k: kwargs.pop(k) for k in ("seed", "dtype", "max_shard_size")}}


class _Failure(click.ClickException):
    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def friendly_errors(command):
    """Show errors as one line: SurgeryError and OS errors exit 1, interrupts exit 128 + the signal number."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SurgeryError as exc:
            raise _Failure(str(exc)) from None
        except OSError as exc:
            raise _Failure(str(os_error(exc))) from None
        except Interrupted as exc:
            raise _Failure(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise _Failure("interrupted", 130) from None
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="surgery")
def main() -> None:
    """Streaming weight surgery for LLM checkpoints.

    Turns a dense checkpoint (Mistral, Llama, ...) into a Mixture-of-Experts one (Mixtral, ...)
    by rule files, shard by shard, in a few hundred MiB of RAM. Start with `surgery demo`.
    """


@main.command()
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@recipe_options
@click.option("--overwrite", is_flag=True, help="Replace DST if it is a non-empty folder (only once the new output is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--evict-source", is_flag=True,
              help="Hub SRC: delete each source shard this run downloads from the cache after its last use.")
@click.option("--push-to-hub", metavar="ORG/NAME", help="Upload DST to this Hub repo (created if needed) once complete.")
@click.option("--private", is_flag=True, help="Create the --push-to-hub repo as private.")
@click.option("--resume", type=click.Choice(["check", "verify"]), is_flag=False, flag_value="check", default=None,
              help="Continue an interrupted run from the shards it completed (checked by header and size; "
                   "--resume=verify re-reads their bytes). A failed run started with --resume keeps its shards.")
@click.option("--shards", "part", metavar="I/N",
              help="Write only worker I's share of the N-way split of the output shards (for a job array); the "
                   "worker that completes the set assembles DST, or run `surgery assemble` at the end.")
@friendly_errors
def upcycle(src: str, dst: Path, rules: str, overwrite: bool, quiet: bool, evict_source: bool,
            push_to_hub: str | None, private: bool, resume: str | None, part: str | None, **kwargs) -> None:
    """Upcycle the dense checkpoint SRC into an MoE checkpoint in DST.

    SRC is a checkpoint folder, a .safetensors file or a Hub repo id ORG/NAME[@REVISION] (branch, tag or
    commit; each shard is downloaded when first needed). DST receives safetensors shards, the index,
    config.json, tokenizer files and a model card. Nothing appears there until all is written: the output
    is assembled in a hidden folder beside DST and swapped in at the end, and an existing DST is replaced
    (with --overwrite) only then. Ctrl-C, SIGTERM and SIGHUP stop cleanly.
    """
    from .api import upcycle as run

    if private and not push_to_hub:
        raise click.UsageError("--private only applies with --push-to-hub")
    out = run(src, dst, rules, overwrite=overwrite, progress=not quiet,
              command=shlex.join(["surgery", *sys.argv[1:]]), evict_source=evict_source,
              push_to_hub=push_to_hub, private=private or None, resume={"check": True}.get(resume, resume or False),
              shards=part, **_recipe(kwargs))
    if out is None:
        click.echo(f"wrote worker {part}'s shards; the worker that completes the set assembles {dst} "
                   "(or run `surgery assemble` with the same arguments)")
        return
    click.echo(f"wrote {out}")
    if push_to_hub:
        click.echo(f"pushed to {push_to_hub}")


@main.command()
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@recipe_options
@click.option("--overwrite", is_flag=True, help="Replace DST if it is a non-empty folder (only once the output is complete).")
@friendly_errors
def assemble(src: str, dst: Path, rules: str, overwrite: bool, **kwargs) -> None:
    """Finish DST from the shards that `upcycle --shards I/N` workers wrote.

    Takes the same SRC, DST and recipe options as the workers; checks that every shard is complete, then
    writes the index, config, tokenizer files and model card and swaps the result into DST.
    """
    from .api import assemble as run

    out = run(src, dst, rules, overwrite=overwrite, command=shlex.join(["surgery", *sys.argv[1:]]), **_recipe(kwargs))
    click.echo(f"wrote {out}")


@main.command()
@click.argument("src")
@recipe_options
@click.option("--tensors", "list_tensors", is_flag=True, help="Also list every output tensor and its origin.")
@friendly_errors
def plan(src: str, rules: str, list_tensors: bool, **kwargs) -> None:
    """Show what upcycling SRC would write, from headers alone (no tensor data is read).

    SRC is a checkpoint folder, a .safetensors file or a Hub repo id ORG/NAME[@REVISION] (headers are then read
    with HTTP range requests). Prints total and active parameters, output bytes, what each rule matched and the
    shard layout.
    """
    from .api import plan as make
    from .report import plan_summary

    click.echo(plan_summary(make(src, rules, **_recipe(kwargs)), list_tensors))


@main.command()
@click.argument("path")
@friendly_errors
def inspect(path: str) -> None:
    """Count the parameters of the checkpoint at PATH from its headers.

    PATH is a checkpoint folder, a .safetensors file or a Hub repo id ORG/NAME[@REVISION].
    Prints `trainable params: 7.24B || all params: 7.24B || trainable%: 100.0000`.
    """
    from .api import open_source
    from .report import parameter_line

    checkpoint = open_source(path)
    n = checkpoint.num_parameters
    click.echo(parameter_line(n, n))


@main.command()
@click.argument("src")
@click.argument("dst")
@recipe_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@friendly_errors
def verify(src: str, dst: str, rules: str, quiet: bool, **kwargs) -> None:
    """Check that DST holds exactly what upcycling SRC with these options produces, byte for byte."""
    from tqdm.auto import tqdm

    from .api import plan as make
    from .verify import verify as check

    the_plan = make(src, rules, **_recipe(kwargs))
    with tqdm(total=the_plan.nbytes, unit="B", unit_scale=True, desc="verifying", disable=quiet) as bar:
        count = check(the_plan, dst, bar.update)
    click.echo(f"verified: {count} tensors in {dst} match the plan byte for byte")


@main.command(name="rules")
@click.argument("name", required=False)
@friendly_errors
def rules_command(name: str | None) -> None:
    """List the built-in rule files, or print the one called NAME.

    A rule file maps source tensor names to output names and edits the config. To write your
    own, start from `surgery rules mistral-to-mixtral > my.yaml`, edit, and pass `--rules my.yaml`;
    the schema is documented in docs/rules.md.
    """
    from .rules import builtin_rule_names, find_rules, load_rules

    if name:
        click.echo(find_rules(name).read_text(), nl=False)
        return
    for rule_name in builtin_rule_names():
        rules = load_rules(rule_name)
        click.echo(f"{rule_name:24} {', '.join(rules.source_model_types)} -> {rules.target['model_type']}: {rules.description}")


@main.command()
@click.argument("dst", default="surgery-demo", type=click.Path(file_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@friendly_errors
def demo(dst: Path, overwrite: bool) -> None:
    """Upcycle the tiny Mistral shipped with surgery into a 4-expert, top-2 Mixtral in DST, then inspect and verify it."""
    from .api import open_source, plan as make, upcycle as run
    from .report import parameter_line
    from .verify import verify as check

    src = Path(__file__).parent / "demo_model"
    recipe = dict(rules="mistral-to-mixtral", num_experts=4, experts_per_token=2)
    dense = open_source(src).num_parameters
    click.echo(f"dense   {src}\n        {parameter_line(dense, dense)}")
    out = run(src, dst, overwrite=overwrite, progress=False, command=f"surgery demo {dst}", **recipe)
    moe = open_source(out).num_parameters
    click.echo(f"upcycled {out}\n        {parameter_line(moe, moe)}")
    count = check(make(src, **recipe), out)
    click.echo(f"verified: {count} tensors match the plan byte for byte")
    click.echo(f"next: surgery plan {src} --rules mistral-to-mixtral -e 8 -k 2")

from .compat.fusion_bench_cli import fusion_bench_command  # noqa: E402  (it imports friendly_errors from here)

main.add_command(fusion_bench_command, name="fusion-bench")
