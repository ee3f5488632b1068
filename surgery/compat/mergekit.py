"""`surgery mergekit-moe CONFIG.yml OUT`: mergekit-moe's YAML, unchanged, written by rule files in bounded memory.

The config (mergekit/moe/config.py: `base_model`, `experts` with `source_model`, `positive_prompts`,
`negative_prompts`, `noise_scale`, `residual_scale`, `gate_mode`, `dtype`, `experts_per_token`, `shared_experts`,
`architecture`) becomes a built-in `experts-to-*` rule file, its parameters and named sources; with an MoE as
`base_model`, the experts are appended to it by a `*-add-experts` rule file. Routers of the gate modes from prompts
are computed layer by layer (surgery.routers) into a small routers checkpoint beside OUT (`.OUT.surgery-routers`,
under a lock; a killed run's is removed by the next), read as source `routers` and deleted at the end; the random
gate modes are drawn by the rule file, seeded. Fields that cannot be honoured are one error line, never ignored.
This module writes no tensors itself.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import yaml

from .. import dtypes
from ..api import open_source, plan as make_plan, upcycle
from ..checkpoint import Checkpoint
from ..destination import Destination, Lock, resolve_destination, sibling
from ..errors import SurgeryError
from ..expressions import render
from ..routers import FROM_PROMPTS, HIDDEN_MODES, ROUTER_INPUTS, Prompts, router_rows, write_routers
from ..rules import RuleFile, builtin_rule_names, load_rules
from ..signals import interrupts_raise

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
CONFIG_FIELDS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture",
                 "tokenizer_source")
EXPERT_FIELDS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
#: mergekit's output architectures (`architecture:` is matched as a case-insensitive prefix of these names) and
#: the model_type each writes
ARCHITECTURES = {"Mixtral": "mixtral", "DeepSeek MoE": "deepseek", "Qwen MoE": "qwen2_moe", "Qwen3 MoE": "qwen3_moe"}
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}
EXPERTS_PREFIX, ADD_SUFFIX = "experts-to-", "-add-experts"
ROUTERS = "routers"
#: the routers checkpoint's folder beside OUT (`.OUT.surgery-routers`), with its lock file
ROUTERS_SUFFIX = ".surgery-routers"


@dataclass(frozen=True)
class Expert:
    """One entry of `experts` or `shared_experts`: the model whose MLP it takes, its prompts, noise and scale."""

    model: str
    prompts: Prompts
    noise_scale: float = 0.0
    residual_scale: float = 1.0


@dataclass(frozen=True)
class MoEConfig:
    """A mergekit-moe config, checked. `experts_per_token` is None where the YAML leaves it to the default."""

    base: str
    experts: tuple[Expert, ...]
    shared: tuple[Expert, ...] = ()
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int | None = None
    architecture: str | None = None


@dataclass
class Job:
    """What a config becomes: a rule file, its parameters, the sources (by name, `base` apart), the output dtype,
    and the prompts of the experts whose router rows come from prompts (shared ones last)."""

    rules: RuleFile
    base: Checkpoint
    params: dict[str, object]
    sources: dict[str, Checkpoint] = field(default_factory=dict)
    dtype: str | None = None
    prompts: list[Prompts] = field(default_factory=list)
    shared_prompts: list[Prompts] = field(default_factory=list)


def load_config(path: str | Path) -> MoEConfig:
    """Read and check a mergekit-moe YAML file."""
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SurgeryError(f"{path}: cannot read YAML ({' '.join(str(exc).split())})") from None
    return parse_config(doc, str(path))


def parse_config(doc: object, where: str = "config") -> MoEConfig:
    """A parsed mergekit-moe YAML document as a MoEConfig; anything mergekit would not take, or surgery cannot
    honour, is a SurgeryError naming the field."""
    doc = _mapping(doc, where, CONFIG_FIELDS)
    for key in ("base_model", "experts"):
        if doc.get(key) is None:
            raise SurgeryError(f"{where}: missing required field {key!r}")
    base = model_reference(doc["base_model"], f"{where}: base_model")
    tokenizer = doc.get("tokenizer_source")
    if tokenizer not in (None, "base") and model_reference(tokenizer, f"{where}: tokenizer_source") != base:
        raise SurgeryError(f"{where}: tokenizer_source: the output takes the base model's tokenizer (as mergekit-moe, "
                           "which ignores this field); remove it or set it to base")
    gate_mode = doc.get("gate_mode", "hidden")
    if gate_mode not in GATE_MODES:
        raise SurgeryError(f"{where}: gate_mode {gate_mode!r} is not one of {', '.join(GATE_MODES)}")
    experts = _experts(doc["experts"], f"{where}: experts", required=True)
    k = doc.get("experts_per_token")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):  # the rule file checks the top
        raise SurgeryError(f"{where}: experts_per_token must be a positive integer, got {k!r}")
    architecture = doc.get("architecture")
    if architecture is not None and not isinstance(architecture, str):
        raise SurgeryError(f"{where}: architecture must be a name such as mixtral or qwen, got {architecture!r}")
    return MoEConfig(base, experts, _experts(doc.get("shared_experts") or [], f"{where}: shared_experts"), gate_mode,
                     _dtype(doc.get("dtype"), where), k, architecture)


def model_reference(value: object, where: str) -> str:
    """mergekit's ModelReference (`path`, `org/name@revision`, or {model: {path, revision}}) as what
    surgery.open_source takes; LoRA adapters and architecture overrides are refused."""
    if isinstance(value, dict):
        value = _mapping(value, where, ("model", "lora", "override_architecture"))
        for key, why in (("lora", "merge the adapter into its model first (peft's merge_and_unload)"),
                         ("override_architecture", "surgery reads the architecture from config.json")):
            if value.get(key) is not None:
                raise SurgeryError(f"{where}: {key} is not supported: {why}")
        model = value.get("model")
        if isinstance(model, dict):
            model = _mapping(model, f"{where}.model", ("path", "revision"))
            path, revision = model.get("path"), model.get("revision")
            if not isinstance(path, str) or not (revision is None or isinstance(revision, str)):
                raise SurgeryError(f"{where}.model: expected a path and an optional revision")
            return _located(path, revision, where)
        value = model
    if not isinstance(value, str) or not value:
        raise SurgeryError(f"{where}: expected a model path or Hub repo id, got {value!r}")
    if "+" in value:
        raise SurgeryError(f"{where}: {value!r} names a LoRA adapter (model+lora), which is not supported: merge the "
                           "adapter into its model first (peft's merge_and_unload)")
    if value.count("@") > 1:
        raise SurgeryError(f"{where}: {value!r} has more than one @")
    path, _, revision = value.partition("@")
    return _located(path, revision or None, where)


def _located(path: str, revision: str | None, where: str) -> str:
    if Path(path).exists():
        if revision:
            raise SurgeryError(f"{where}: {path} is a local folder, so the revision @{revision} cannot apply")
        return str(Path(path).resolve())
    return f"{path}@{revision}" if revision else path


def _experts(items: object, where: str, required: bool = False) -> tuple[Expert, ...]:
    if not isinstance(items, list) or (required and not items):
        raise SurgeryError(f"{where}: expected a list of experts" + (" (at least one)" if required else ""))
    return tuple(_expert(item, f"{where}[{i}]") for i, item in enumerate(items))


def _expert(item: object, where: str) -> Expert:
    item = _mapping(item, where, EXPERT_FIELDS)
    if item.get("source_model") is None:
        raise SurgeryError(f"{where}: missing required field 'source_model'")
    prompts = Prompts(_texts(item.get("positive_prompts"), f"{where}.positive_prompts"),
                      _texts(item.get("negative_prompts"), f"{where}.negative_prompts"))
    noise, scale = _number(item.get("noise_scale"), f"{where}.noise_scale", 0.0), \
        _number(item.get("residual_scale"), f"{where}.residual_scale", 1.0)
    if noise < 0:
        raise SurgeryError(f"{where}.noise_scale must not be negative, got {noise}")
    return Expert(model_reference(item["source_model"], f"{where}.source_model"), prompts, noise, scale)


def _texts(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SurgeryError(f"{where}: expected a list of prompts (strings)")
    return tuple(value)


def _number(value: object, where: str, default: float) -> float:
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
        raise SurgeryError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _dtype(value: object, where: str) -> str | None:
    if value is None:
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in DTYPES:
        raise SurgeryError(f"{where}: dtype {value!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _mapping(value: object, where: str, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise SurgeryError(f"{where}: expected a mapping, got {value!r}")
    for key in value:
        if key not in allowed:
            raise SurgeryError(f"{where}: unknown field {key!r} (mergekit-moe's fields here: {', '.join(allowed)})")
    return value


def translate(config: MoEConfig, *, router_input: str = "residual", layout: str | None = None,
              allow_all_same: bool = False) -> Job:
    """The rule file, parameters and sources that write what mergekit-moe would for `config` (headers only)."""
    base = _open(config.base, "base_model")
    rules = select_rules(config, base.config.get("model_type"))
    add = rules.name.endswith(ADD_SUFFIX)
    _check_like_mergekit(config, allow_all_same or add)  # added experts all come from one model
    names = {config.base: "base"}
    for i, expert in enumerate((*config.experts, *config.shared)):
        names.setdefault(expert.model, f"shared{i - len(config.experts)}" if i >= len(config.experts) else f"expert{i}")
    opened = {name: _open(model, name) for model, name in names.items() if name != "base"}
    params = _add_params(config) if add else _expert_params(config)
    if config.gate_mode in FROM_PROMPTS:
        params["router_input"] = router_input
    if layout is not None:
        if "layout" not in rules.parameters:
            raise SurgeryError(f"--layout: rule file {rules.name} keeps the expert layout of its base")
        params["layout"] = layout
    sources = {"dense": opened.get(names[config.experts[0].model], base)} if add else opened
    dtype = config.dtype or (_dominant(base) if add else None)  # added experts take the MoE's dtype
    prompts = [e.prompts for e in config.experts] if config.gate_mode in FROM_PROMPTS else []
    shared = [e.prompts for e in config.shared] if prompts else []
    return Job(rules, base, params, sources, dtype, prompts, shared)


def _check_like_mergekit(config: MoEConfig, allow_all_same: bool) -> None:
    """mergekit-moe's own refusals (mergekit/moe/config.py is_bad_config), for the gate modes from prompts."""
    if config.gate_mode in FROM_PROMPTS:
        for i, expert in enumerate(config.experts):
            if not expert.prompts.positive:
                raise SurgeryError(f"experts[{i}] has no positive_prompts: gate_mode {config.gate_mode} computes its "
                                   "router row from them")
        if len(config.experts) > 1 and len({e.prompts for e in config.experts}) == 1:
            raise SurgeryError("the positive and negative prompts are the same for every expert: the routers would be "
                               "too; give each expert prompts of what it should get")
        if config.shared and not all(e.prompts.positive for e in config.shared):
            raise SurgeryError(f"shared_experts: gate_mode {config.gate_mode} computes the shared expert's gate from "
                               "positive_prompts: give them to every shared expert")
    if len(config.experts) > 1 and len({e.model for e in config.experts}) == 1 and not allow_all_same:
        raise SurgeryError("every expert is the same model: the MoE would compute what one expert does, at more cost; "
                           "to train it afterwards, pass --i-understand-this-is-not-useful-without-training")


def _open(model: str, name: str) -> Checkpoint:
    try:
        return open_source(model)
    except SurgeryError as exc:
        raise SurgeryError(f"{name}: {exc}") from None


def select_rules(config: MoEConfig, model_type: object) -> RuleFile:
    """The built-in rule file for the base's model_type: `*-add-experts` when it is already an MoE, else the
    `experts-to-*` file whose target `architecture` names (a prefix, as mergekit matches it) that can hold the
    config's shared experts (or, without any, writes none: Granite-MoE, not Granite-MoE-Shared, whose
    `shared_sources` default to the base's MLP), Mixtral first (mergekit's default)."""
    files = [load_rules(name) for name in builtin_rule_names()
             if name.startswith(EXPERTS_PREFIX) or name.endswith(ADD_SUFFIX)]
    for rules in files:
        if rules.name.endswith(ADD_SUFFIX) and model_type in rules.source_model_types:
            if config.shared or len({e.model for e in config.experts}) != 1:
                raise SurgeryError(f"base_model is a {model_type} MoE, so its experts are kept and the listed ones "
                                   "appended: they must all come from one dense model, with no shared_experts "
                                   "(run once per model to add several)")
            return rules
    readers = [r for r in files if r.name.startswith(EXPERTS_PREFIX) and model_type in r.source_model_types]
    named = [r for r in readers if _named(_target(r, model_type), config.architecture)]
    fitting = [r for r in named if _holds(r, bool(config.shared))]
    if not fitting:
        raise SurgeryError(_no_target(config, model_type, readers, named))
    return min(fitting, key=lambda r: _target(r, model_type) != "mixtral")


def _holds(rules: RuleFile, shared: bool) -> bool:
    """Whether `rules` writes what the config says of shared experts: with some, a file that takes
    `shared_sources`; without, one that has none or whose `shared_sources` default to none (optional)."""
    declared = rules.parameters.get("shared_sources")
    return declared is not None if shared else declared is None or declared.default == []


def _target(rules: RuleFile, model_type: object) -> str:
    """The model_type `rules` writes for a base of `model_type` (a templated target rendered for it)."""
    try:
        return str(render(rules.target["model_type"], {"model_type": model_type}, "target.model_type"))
    except SurgeryError:
        return str(rules.target["model_type"])


def _named(model_type: str, architecture: str | None) -> bool:
    if architecture is None:
        return True
    names = [name for name, written in ARCHITECTURES.items() if written == model_type] + [model_type]
    return any(name.lower().startswith(architecture.lower()) for name in names)


def _no_target(config: MoEConfig, model_type: object, readers: list[RuleFile], named: list[RuleFile]) -> str:
    targets = ", ".join(sorted(_target(r, model_type) for r in readers))
    if not readers:
        return f"base_model is a {model_type!r} model: no built-in rule file builds an MoE from it"
    if not named:
        deepseek = "DeepSeek MoE needs remote code (deepseek-moe-16b's modelling files), which surgery does not write; "
        hint = deepseek if _named("deepseek", config.architecture) else ""
        return f"architecture {config.architecture!r}: {hint}{model_type} models make {targets}"
    holding = ", ".join(_target(r, model_type) for r in named if "shared_sources" in r.parameters)
    if config.shared:
        return (f"shared_experts: of the targets for {model_type} models ({targets}), none holds shared experts "
                "(mergekit would write DeepSeek MoE, which needs remote code: surgery does not write it)")
    return f"{holding} always has a shared expert: give shared_experts"


def _expert_params(config: MoEConfig) -> dict[str, object]:
    """Parameters of an experts-to-* rule file; source i of `sources` is the i-th distinct model, the base first."""
    models = list(dict.fromkeys([config.base, *(e.model for e in (*config.experts, *config.shared))]))
    params: dict[str, object] = {"expert_sources": [models.index(e.model) for e in config.experts],
                                 "experts_per_token": config.experts_per_token or 2,
                                 "gate_mode": config.gate_mode, **_scales(config.experts, "")}
    if config.shared:
        params.update(shared_sources=[models.index(e.model) for e in config.shared], **_scales(config.shared, "shared_"))
    return params


def _add_params(config: MoEConfig) -> dict[str, object]:
    """Parameters of an *-add-experts rule file: one copy of the dense MLP per listed expert."""
    params: dict[str, object] = {"add": len(config.experts), "gate_mode": config.gate_mode,
                                 **_scales(config.experts, "")}
    if config.experts_per_token is not None:
        params["experts_per_token"] = config.experts_per_token
    return params


def _scales(experts: tuple[Expert, ...], prefix: str) -> dict[str, list[float]]:
    """noise_scales / residual_scales parameters where some expert sets them."""
    out = {}
    if any(e.noise_scale for e in experts):
        out[f"{prefix}noise_scales"] = [e.noise_scale for e in experts]
    if any(e.residual_scale != 1.0 for e in experts):
        out[f"{prefix}residual_scales"] = [e.residual_scale for e in experts]
    return out


def mergekit_moe(
    config: str | Path | MoEConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    seed: int = 0,
    layout: str | None = None,
    router_input: str = "residual",
    compute_dtype: str = "bf16",
    max_shard_size: int | None = None,
    allow_all_same: bool = False,
    command: str | None = None,
    notes: Callable[[str], None] = lambda note: None,
) -> Path:
    """Write the MoE a mergekit-moe config describes to `out`; returns `out`.

    Gate modes from prompts compute their routers layer by layer from the base (`router_input`: the residual
    stream entering each layer, as mergekit, or the MLP's input; in `compute_dtype`, bf16 as mergekit, or fp32);
    random ones are drawn with `seed`. `layout` ("per-expert" or "fused") where the target has both. `notes` gets
    what the sources' check found worth saying (side files that differ from the base's).
    """
    if not isinstance(config, MoEConfig):
        config = load_config(config)
    if router_input not in ROUTER_INPUTS:
        raise SurgeryError(f"router_input must be one of {', '.join(ROUTER_INPUTS)}, got {router_input!r}")
    if router_input != "residual" and config.gate_mode not in HIDDEN_MODES:
        raise SurgeryError(f"router input {router_input} applies to the hidden gate modes, not {config.gate_mode}")
    job = translate(config, router_input=router_input, layout=layout, allow_all_same=allow_all_same)
    settings = {**job.params, "seed": seed, **({"dtype": job.dtype} if job.dtype else {}),
                **({"max_shard_size": max_shard_size} if max_shard_size else {})}
    checked = {**settings, "gate_mode": "zeros", **({"router_input": "residual"} if "router_input" in settings else {})}
    first = make_plan(job.base, job.rules, sources=job.sources, **checked)  # every check, before the routers' pass
    for note in first.notes:
        notes(note)
    with Destination(out, first.sources.values(), overwrite):
        pass
    if not job.prompts:
        return upcycle(job.base, out, job.rules, sources=job.sources, overwrite=overwrite, progress=progress,
                       command=command, **settings)
    destination = resolve_destination(out)
    folder, lock = sibling(destination, ROUTERS_SUFFIX), Lock(sibling(destination, ROUTERS_SUFFIX + ".lock"))
    with interrupts_raise():  # SIGTERM and SIGHUP too remove the routers checkpoint
        lock.acquire(str(out))
        try:
            shutil.rmtree(folder, ignore_errors=True)  # a killed run's (SIGKILL): we hold the lock
            folder.mkdir()
            _routers(job, folder, router_input, dtypes.parse_float_dtype(compute_dtype), progress)
            routers = open_source(folder)
            routers.location = (f"computed from the config's prompts ({config.gate_mode}, {router_input} input, "
                                f"{compute_dtype}); removed afterwards")  # what the model card records
            sources = {**job.sources, ROUTERS: routers}
            return upcycle(job.base, out, job.rules, sources=sources, overwrite=overwrite, progress=progress,
                           command=command, **settings)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            lock.release()


def _routers(job: Job, folder: Path, router_input: str, compute_dtype: str, progress: bool) -> None:
    """Compute the job's router rows from its prompts and write them as the routers checkpoint in `folder`."""
    mode = job.params["gate_mode"]
    rows = router_rows(job.base, [*job.prompts, *job.shared_prompts], mode, router_input=router_input,
                       compute_dtype=compute_dtype, progress=progress)
    experts, shared = rows[:, :len(job.prompts)], rows[:, len(job.prompts):]
    if shared.shape[1]:  # one gate for the shared MLP: the normalised sum of the shared experts' rows
        total = shared.sum(axis=1, keepdims=True)
        shared = total / np.maximum(np.linalg.norm(total, axis=-1, keepdims=True), 1e-8)
    declared = job.rules.auxiliary[ROUTERS].dtype if ROUTERS in job.rules.auxiliary else None
    write_routers(folder, experts, declared or job.dtype or _dominant(job.base), shared if shared.shape[1] else None)


def _dominant(base: Checkpoint) -> str:
    return base.dominant_dtype if base.dominant_dtype in dtypes.FLOATS else "F32"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--layout", type=click.Choice(["per-expert", "fused"]),
              help="per-expert (the Hub's; the default) or fused experts (transformers 5; what mergekit writes).")
@click.option("--router-input", type=click.Choice(ROUTER_INPUTS), default="residual", show_default=True,
              help="Hidden gate modes: average the residual stream entering each layer (mergekit's) or the MLP's "
                   "input, what the router sees (recorded in the model card).")
@click.option("--compute-dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="Hidden gate modes: the precision the base's layers run in (mergekit's is bf16).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random gate modes and of noise_scale.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB, 2GiB.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is a non-empty folder (only once the new output is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--i-understand-this-is-not-useful-without-training", "allow_all_same", is_flag=True,
              help="Allow every expert to be the same model (for training afterwards), as mergekit-moe's flag.")
@click.option("--no-check", is_flag=True, help="Do not check OUT afterwards as `surgery check` does.")
def mergekit_moe_command(config: Path, out: Path, layout: str | None, router_input: str, compute_dtype: str,
                         seed: int, max_shard_size: str, overwrite: bool, quiet: bool, allow_all_same: bool,
                         no_check: bool) -> None:
    """Build the MoE that the mergekit-moe config CONFIG describes, into OUT: `mergekit-moe CONFIG OUT` ->
    `surgery mergekit-moe CONFIG OUT`.

    The same YAML (base_model, gate_mode, dtype, experts_per_token, experts with source_model, positive_prompts,
    negative_prompts, noise_scale and residual_scale, shared_experts, architecture); models are streamed, never
    loaded. Mixtral from Mistral/Llama, Qwen2-MoE (one or more shared experts) from Qwen2, Qwen3-MoE from Qwen3,
    FlexOlmo from OLMo 2/3, Qwen3.5-MoE (with shared experts) from Qwen3.5, Granite-MoE (Granite-MoE-Shared with
    shared experts) from Granite, ERNIE-4.5-MoE from ERNIE 4.5, Hunyuan-MoE (with one shared expert) from Hunyuan,
    Cohere2-MoE from Cohere2; with an MoE as base_model, the experts are appended to it. hidden, hidden_avg,
    hidden_last and cheap_embed compute the routers from the prompts one layer at a time; random and
    uniform_random draw them (seeded).
    """
    from ..cli import check_written, friendly_errors, parse_size  # here: surgery.cli imports this module

    def run() -> None:
        written = mergekit_moe(config, out, overwrite=overwrite, progress=not quiet, seed=seed, layout=layout,
                               router_input=router_input, compute_dtype=compute_dtype,
                               max_shard_size=parse_size(max_shard_size), allow_all_same=allow_all_same,
                               command=shlex.join(["surgery", *sys.argv[1:]]),
                               notes=lambda note: click.echo(f"note: {note}", err=True))
        checked = None if no_check else check_written(written)
        click.echo(f"wrote {written}")
        if checked:
            click.echo(checked, err=True)

    friendly_errors(run)()
