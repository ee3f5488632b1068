"""The `surgery` command line: upcycle, plan, inspect, verify, check, convert, rules and demo."""

from __future__ import annotations

import functools
import platform
import re
import shlex
import sys
from importlib import metadata
from pathlib import Path

import click

from . import __version__
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
        click.option("--source", "sources", multiple=True, metavar="NAME=PATH", callback=_param_option,
                     help="A further checkpoint (folder or Hub repo) the rule file reads as source NAME; SRC is "
                          "`base`. Repeat for several."),
        click.option("--num-experts", "-e", type=int, help="Shortcut for -p num_experts=N: experts per MoE layer."),
        click.option("--experts-per-token", "-k", type=int, help="Shortcut for -p experts_per_token=K: top-k routing."),
        click.option("--router-init", help="Shortcut for -p router_init=...: normal, zeros, uniform or orthogonal."),
        click.option("--router-std", type=float, help="Shortcut for -p router_std=...: std of the normal router init."),
        click.option("--granularity", type=int, help="Shortcut for -p granularity=G: each expert holds 1/G of a dense MLP."),
        click.option("--shared-experts", type=int, help="Shortcut for -p shared_experts=N: parts of the MLP that are shared."),
        click.option("--drop-ratio", type=float, help="Shortcut for -p drop_ratio=R: Drop-Upcycling's re-drawn share."),
        click.option("--expert-noise", type=float, help="Shortcut for -p expert_noise=S: noise relative to each tensor's std."),
        click.option("--moe-layers", help="Shortcut for -p moe_layers=SPEC: the layers made MoE, e.g. 1:32:2 or 0,4:8."),
        click.option("--layout", help="Shortcut for -p layout=...: the experts per-expert (the Hub's) or fused."),
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
SHORTCUTS = ("num_experts", "experts_per_token", "router_init", "router_std", "granularity", "shared_experts",
             "drop_ratio", "expert_noise", "moe_layers", "layout")


def _recipe(kwargs: dict) -> dict:
    """The keyword arguments of the Python API: parameters (shortcuts, then -p) and write options."""
    params = kwargs.pop("params")
    for name in SHORTCUTS:
        value = kwargs.pop(name)
        if value is not None:
            if name in params:
                raise click.UsageError(f"{name} is given twice (as its option and as -p {name}=...)")
            params[name] = value
    sources = kwargs.pop("sources")
    return {**params, **{k: kwargs.pop(k) for k in ("seed", "dtype", "max_shard_size")},
            **({"sources": sources} if sources else {})}


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


#: the libraries whose versions `surgery --version` shows beside its own
VERSION_OF = ("numpy", "safetensors", "huggingface_hub")


def version_text() -> str:
    """`surgery 0.2.0 (numpy 2.3.1, safetensors 0.6.2, huggingface_hub 1.20.0; Python 3.11.7)`."""
    found = []
    for name in VERSION_OF:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return f"surgery {__version__} ({', '.join(found)}; Python {platform.python_version()})"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_text())
        ctx.exit()


#: `--no-check` of the commands that write
no_check_option = click.option("--no-check", is_flag=True,
                               help="Do not check DST afterwards as `surgery check` does (that transformers would "
                                    "load it: names, shapes, dtypes).")

#: `--json` of the commands that report (plan, inspect, verify, check, rules):
#: one JSON document on stdout instead of text, built by report_json
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON document on stdout instead of text (shape: docs/json.md).")


def echo_json(document: dict) -> None:
    from .report_json import dumps

    click.echo(dumps(document))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version of surgery and of numpy, safetensors and huggingface_hub, and exit.")
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
@click.option("--no-share", is_flag=True,
              help="Make real copies even where the filesystem could share blocks with the source (XFS, btrfs, "
                   "ZFS >= 2.2, bcachefs); the output's bytes are the same.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes writing shards, for recipes that compute (Drop-Upcycling, noise, --dtype, means): "
                   "up to that many times faster with as many cores, each process 50-80 MiB; the same bytes.")
@no_check_option
@friendly_errors
def upcycle(src: str, dst: Path, rules: str, overwrite: bool, quiet: bool, evict_source: bool,
            push_to_hub: str | None, private: bool, resume: str | None, part: str | None, no_share: bool,
            jobs: int, no_check: bool, **kwargs) -> None:
    """Upcycle the dense checkpoint SRC into an MoE checkpoint in DST.

    SRC is a checkpoint folder, a .safetensors file or a Hub repo id ORG/NAME[@REVISION] (branch, tag or
    commit; each shard is downloaded when first needed). DST receives safetensors shards, the index,
    config.json, tokenizer files and a model card. Nothing appears there until all is written: the output
    is assembled in a hidden folder beside DST and swapped in at the end, and an existing DST is replaced
    (with --overwrite) only then. Ctrl-C, SIGTERM and SIGHUP stop cleanly. Then, unless --no-check, DST is
    checked as `surgery check` does.
    """
    from .api import upcycle as run
    from .hub import check_push, push

    if private and not push_to_hub:
        raise click.UsageError("--private only applies with --push-to-hub")
    if push_to_hub:
        check_push(push_to_hub)  # before any work; the upload itself waits for the check below
    written: list = []  # what execute reports: bytes of shards written, and how many share blocks with the source
    out = run(src, dst, rules, overwrite=overwrite, progress=not quiet,
              command=shlex.join(["surgery", *sys.argv[1:]]), evict_source=evict_source,
              resume={"check": True}.get(resume, resume or False),
              shards=part, share=not no_share, report=written.append, jobs=jobs, **_recipe(kwargs))
    if out is None:
        click.echo(f"wrote worker {part}'s shards; the worker that completes the set assembles {dst} "
                   "(or run `surgery assemble` with the same arguments)")
        click.echo(written[0].describe(), err=True)
        return
    checked = None if no_check else check_written(out)
    if push_to_hub:
        push(out, push_to_hub, private or None)
    click.echo(f"wrote {out}")
    if checked:
        click.echo(checked, err=True)
    click.echo(written[0].describe(), err=True)
    if push_to_hub:
        click.echo(f"pushed to {push_to_hub}")


def check_written(out: Path) -> str:
    """After a write: what `surgery check` says of `out`, or a warning when it cannot run here. Raises SurgeryError
    (the output is kept) when transformers would not load it."""
    from .consumer import Unavailable, check_consumer

    try:
        result = check_consumer(out)
    except Unavailable as exc:
        return f"warning: {out} was not checked: {exc}"
    if not result.ok:
        shown = "; ".join(p.line() for p in result.problems[:3]) + ("; ..." if len(result.problems) > 3 else "")
        raise SurgeryError(f"{result.summary()} ({shown}). The output is kept: `surgery check {out}` lists every "
                           "problem; --no-check skips this check")
    return f"checked: {result.summary()}"


main.add_command(click.Command(
    "apply", params=upcycle.params, callback=upcycle.callback, short_help="Apply any rule file to SRC, writing DST.",
    help="""Apply the rule file --rules to the checkpoint SRC, writing the result to DST.

    The general verb: MoE -> dense (mixtral-to-mistral, qwen3-moe-to-qwen3, ...), keeping or dropping experts
    (mixtral-select-experts, ...), depth up-scaling (depth-upscale -p layers=0:24,8:32), or a custom rule file.
    Options and guarantees are those of `upcycle` (the name kept for MoE upcycles): the output appears in DST only
    once complete, and `plan` and `verify` take the same rule file and parameters.
    """,
))


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
@json_option
@friendly_errors
def plan(src: str, rules: str, list_tensors: bool, as_json: bool, **kwargs) -> None:
    """Show what the rule file (--rules) would write from SRC, from headers alone (no tensor data is read).

    SRC is a checkpoint folder, a .safetensors file or a Hub repo id ORG/NAME[@REVISION] (headers are then read
    with HTTP range requests). Prints total and active parameters, output bytes, what each rule matched and the
    shard layout.
    """
    from .api import plan as make
    from .report import plan_summary
    from .report_json import plan_document

    the_plan = make(src, rules, **_recipe(kwargs))
    if as_json:
        echo_json(plan_document(the_plan, list_tensors))
    else:
        click.echo(plan_summary(the_plan, list_tensors))


@main.command()
@click.argument("path")
@json_option
@friendly_errors
def inspect(path: str, as_json: bool) -> None:
    """Count the parameters of the checkpoint at PATH from its headers.

    PATH is a checkpoint folder, a .safetensors file or a Hub repo id ORG/NAME[@REVISION].
    Prints `trainable params: 7.24B || all params: 7.24B || trainable%: 100.0000`.
    """
    from .api import open_source
    from .report import parameter_line
    from .report_json import inspect_document

    checkpoint = open_source(path)
    if as_json:
        echo_json(inspect_document(checkpoint))
        return
    n = checkpoint.num_parameters
    click.echo(parameter_line(n, n))


@main.command()
@click.argument("src")
@click.argument("dst")
@recipe_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--numeric", is_flag=True,
              help="Instead of bytes, check the function: each layer's block against the source's, run by "
                   "transformers in fp32 (needs torch and transformers).")
@json_option
@friendly_errors
def verify(src: str, dst: str, rules: str, quiet: bool, numeric: bool, as_json: bool, **kwargs) -> None:
    """Check that DST holds exactly what the rule file makes of SRC with these options, byte for byte.

    With --numeric, check instead that DST computes what the recipe promises: layer by layer, the module the rule
    file names (the dense MLP and the MoE block) is loaded alone from each checkpoint and run on the same random
    hidden states; a recipe that `plan` calls exact fails on any layer whose relative difference exceeds 1e-5.
    """
    from tqdm.auto import tqdm

    from .api import plan as make
    from .report_json import verify_document
    from .verify import verify as check

    the_plan = make(src, rules, **_recipe(kwargs))
    if numeric:
        _verify_numeric(the_plan, dst, quiet, as_json)
        return
    with tqdm(total=the_plan.nbytes, unit="B", unit_scale=True, desc="verifying", disable=quiet) as bar:
        count = check(the_plan, dst, bar.update)
    if as_json:
        echo_json(verify_document(the_plan, dst, count))
    else:
        click.echo(f"verified: {count} tensors in {dst} match the plan byte for byte")


def _verify_numeric(the_plan, dst: str, quiet: bool, as_json: bool) -> None:
    from tqdm.auto import tqdm

    from .numeric import TOLERANCE, check_numeric, checked_layers
    from .report import exactness_line

    with tqdm(total=len(checked_layers(the_plan)), desc="checking layers", unit="layer", disable=quiet) as bar:
        results = check_numeric(the_plan, dst, bar.update)
    if as_json:
        echo_json({"command": "verify", "numeric": True, "tolerance": TOLERANCE, "exact": the_plan.exact[0],
                   "layers": [{"layer": r.layer, "difference": r.difference, "same": r.same} for r in results]})
        return
    for r in results:
        click.echo(f"layer {r.layer}: relative difference {r.difference:.3g} ({'same' if r.same else 'differs'})")
    click.echo(f"{exactness_line(the_plan)}; {sum(r.same for r in results)} of {len(results)} layers compute "
               f"the source's function (to {TOLERANCE:g})")


@main.command()
@click.argument("path")
@json_option
@friendly_errors
def check(path: str, as_json: bool) -> None:
    """Check that transformers would load the checkpoint at PATH as the model class its config names.

    From headers and config.json alone: the class named in `architectures` is built on the meta device and offered
    every tensor's name, shape and dtype, through transformers' own checkpoint key conversion (per-expert keys
    merged into fused experts in transformers 5). Each missing, unexpected or mis-shaped tensor, and each integer
    tensor where the model holds floats, is a line naming it; any of them fails the check. PATH is a checkpoint
    folder, a .safetensors file or a Hub repo id. Needs torch and transformers: the installed versions are the
    ones checked against. `upcycle`, `apply` and `convert` run this check on what they write (--no-check skips it).
    """
    from .api import open_source
    from .consumer import check_consumer

    result = check_consumer(open_source(path))
    if as_json:
        echo_json(result.document())
    else:
        for problem in result.problems:
            click.echo(problem.line())
        if result.ok:
            click.echo(f"ok: {result.summary()}")
    if not result.ok:
        raise SurgeryError(result.summary())


#: the built-in rule files that re-lay out experts, named FAMILY-layout
LAYOUT_SUFFIX = "-layout"


def layout_rules(model_type: object) -> str:
    """The built-in layout rule file that accepts `model_type`."""
    from .rules import builtin_rule_names, load_rules

    found = {name: load_rules(name).source_model_types for name in builtin_rule_names() if name.endswith(LAYOUT_SUFFIX)}
    for name, model_types in found.items():
        if model_type in model_types:
            return name
    known = ", ".join(sorted(t for types in found.values() for t in types))
    raise SurgeryError(f"no built-in layout rule file reads {model_type!r} checkpoints (they read {known}); "
                       "Granite-MoE's Hub layout is already fused")


@main.command()
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@click.option("--layout", required=True, type=click.Choice(["per-expert", "fused"]),
              help="per-expert: one tensor per expert and projection (the Hub's; vLLM, SGLang, transformers 4 and 5); "
                   "fused: mlp.experts.gate_up_proj [E, 2I, H] and down_proj [E, H, I] (transformers 5).")
@click.option("--max-shard-size", default="5GB", show_default=True, callback=_size_option,
              help="Largest output shard, e.g. 5GB, 500MB, 2GiB.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it is a non-empty folder (only once the new output is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@no_check_option
@friendly_errors
def convert(src: str, dst: Path, layout: str, max_shard_size: int, overwrite: bool, quiet: bool, no_check: bool) -> None:
    """Write the MoE checkpoint SRC to DST with its experts in another layout, by byte copies.

    The rule file is the built-in FAMILY-layout file that reads SRC's model_type (`surgery rules` lists them:
    mixtral-layout, qwen2-moe-layout); experts already in the asked layout, and every other tensor, are copied
    unchanged, and so is the config. Then, unless --no-check, DST is checked as `surgery check` does.
    """
    from .api import open_source, upcycle as run

    source = open_source(src, progress=not quiet)
    rules = layout_rules(source.config.get("model_type"))
    out = run(source, dst, rules, overwrite=overwrite, progress=not quiet, layout=layout,
              max_shard_size=max_shard_size, command=shlex.join(["surgery", *sys.argv[1:]]))
    checked = None if no_check else check_written(out)
    click.echo(f"wrote {out} ({rules}, layout={layout})")
    if checked:
        click.echo(checked, err=True)


@main.command(name="rules")
@click.argument("name", required=False)
@json_option
@friendly_errors
def rules_command(name: str | None, as_json: bool) -> None:
    """List the built-in rule files, or print the one called NAME.

    A rule file maps source tensor names to output names and edits the config. To write your
    own, start from `surgery rules mistral-to-mixtral > my.yaml`, edit, and pass `--rules my.yaml`;
    the schema is documented in docs/rules.md.
    """
    from .report_json import rule_document, rules_list_document
    from .rules import builtin_rule_names, find_rules, load_rules, target_model_types

    if as_json:
        echo_json(rule_document(name) if name else rules_list_document(builtin_rule_names()))
        return
    if name:
        click.echo(find_rules(name).read_text(), nl=False)
        return
    names = builtin_rule_names()
    width = max(map(len, names), default=0)
    for rule_name in names:
        rules = load_rules(rule_name)
        sources, targets = list(rules.source_model_types), target_model_types(rules)
        shown = "the same" if targets == sources and len(targets) > 1 else ", ".join(targets)
        click.echo(f"{rule_name:{width}}  {', '.join(sources)} -> {shown}: {rules.description}")


@main.command()
@click.argument("dst", default="surgery-demo", type=click.Path(file_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace DST even if it is not a previous demo's output.")
@friendly_errors
def demo(dst: Path, overwrite: bool) -> None:
    """Upcycle the tiny Mistral shipped with surgery into a 4-expert, top-2 Mixtral in DST, then inspect and verify it.

    Run again, the demo replaces its own earlier output in DST. A DST holding anything else is left untouched:
    the demo then writes to DST-2 (or the next such folder that is free or its own) and says so.
    """
    from .api import open_source, plan as make, upcycle as run
    from .demo import RECIPE as recipe, SOURCE as src, destination
    from .report import parameter_line
    from .verify import verify as check

    target, replace = (dst, True) if overwrite else destination(dst)
    if target != dst:
        click.echo(f"{dst} holds other files, left untouched: writing to {target}")
    elif replace and not overwrite:
        click.echo(f"replacing the previous demo output in {dst}")
    dense = open_source(src).num_parameters
    click.echo(f"dense   {src}\n        {parameter_line(dense, dense)}")
    out = run(src, target, overwrite=replace, progress=False, command=f"surgery demo {target}", **recipe)
    moe = open_source(out).num_parameters
    click.echo(f"upcycled {out}\n        {parameter_line(moe, moe)}")
    count = check(make(src, **recipe), out)
    click.echo(f"verified: {count} tensors match the plan byte for byte")
    click.echo(f"next: surgery plan {src} --rules mistral-to-mixtral -e 8 -k 2")

from .compat.fusion_bench_cli import fusion_bench_command  # noqa: E402  (it imports friendly_errors from here)

main.add_command(fusion_bench_command, name="fusion-bench")
from .compat.mergekit import mergekit_moe_command  # noqa: E402  (it imports from here when it runs)

main.add_command(mergekit_moe_command, name="mergekit-moe")
