"""FusionBench-compatible sparse upcycling: change the import, keep the code.

    from surgery.compat.fusion_bench import MixtralForCausalLMUpscalingAlgorithm, print_parameters

replaces `fusion_bench.method.mixture_of_experts.mixtral_upcycling` and `fusion_bench.utils`. The
algorithms take FusionBench's config and inputs and return a transformers Mixtral model, converted
by the same rule files as `surgery upcycle`. Importing this module imports neither torch nor
transformers; `run` does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..api import open_source
from ..checkpoint import Checkpoint
from ..errors import SurgeryError
from ..expressions import evaluate
from ..execute import execute
from ..plan import Options, Plan, make_plan
from ..report import parameter_line
from ..params import resolve
from ..rules import RuleFile, builtin_rule_names, load_rules

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

__all__ = ["MixtralForCausalLMUpscalingAlgorithm", "MixtralUpscalingAlgorithm", "print_parameters"]

PRETRAINED = "_pretrained_"
TARGET_MODEL_TYPE = "mixtral"
#: the rule file whose parameter declarations check a method config (every rule file to Mixtral has the same)
CHECKED_BY = "mistral-to-mixtral"
METHOD_NAMES = ("mixtral_moe_upscaling", "mixtral_for_causal_lm_moe_upscaling")
METHOD_CLASSES = ("MixtralUpscalingAlgorithm", "MixtralForCausalLMUpscalingAlgorithm")
#: the Python example's spelling, then the seed YAML's
TOP_K_KEYS = ("experts_per_token", "expert_per_token")
METHOD_KEYS = ("name", "_target_", "num_experts", *TOP_K_KEYS, "save_checkpoint")
POOL_KEYS = ("type", "_target_", "models")
#: shard size for saving an in-memory model: safetensors < 0.5 serialises a whole shard in memory
DENSE_SHARD_SIZE = "1GB"


def print_parameters(model_or_path: torch.nn.Module | str | os.PathLike) -> None:
    """Print `trainable params: 7.24B || all params: 7.24B || trainable%: 100.0000`.

    A path (anything `surgery inspect` takes) is counted from its headers, without loading;
    for a model, trainable parameters are those with requires_grad.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        trainable = total = open_source(model_or_path).num_parameters
    else:
        params = list(model_or_path.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
    print(parameter_line(trainable, total))


class MixtralUpscalingAlgorithm:
    """FusionBench's `MixtralUpscalingAlgorithm`: upcycle a dense Mistral or Llama into a `MixtralModel`.

    `config` (a dict or an omegaconf DictConfig, or keyword arguments) holds `num_experts`,
    `experts_per_token` (or `expert_per_token`) and optionally `save_checkpoint`, a folder that
    then receives exactly what `surgery.upcycle` writes (shards, index, config, model card).

    `run` accepts a loaded transformers model (a bare `MistralModel`/`LlamaModel` or a
    `...ForCausalLM`), a checkpoint path, or a model pool holding `_pretrained_` (a pool config
    with `models`, a mapping, or an object with `load_model`). The rule file is the built-in one
    whose `source_model_types` include the source's model_type.

    Design: a path streams through the engine. A loaded model is first saved with `save_pretrained`
    to a temporary folder and then streamed likewise, so the conversion is byte-for-byte the CLI's
    and RAM holds the dense model plus the resulting MoE, nothing more (the engine copies bytes
    between files with `copy_file_range`). The price is disk: put TMPDIR on a disk, not a tmpfs.
    The MoE is then loaded with `from_pretrained` in the checkpoint's dtype (bf16 in, bf16 out);
    transformers may keep its tensors memory-mapped from the (deleted) temporary output.
    A bare model's tensor names lack the `model.` prefix that rule files use: it is added to the
    source's names before planning and removed from the output's, so the saved checkpoint is a
    bare `MixtralModel` too.
    """

    causal_lm = False

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any):
        self.config = {**(config or {}), **kwargs}
        self.params, self.save_checkpoint = method_params(self.config, "config")

    def run(self, modelpool: object) -> PreTrainedModel:
        """Upcycle `modelpool` (a model, a checkpoint path or a model pool) and return the MoE model."""
        import transformers

        dense = _pretrained(modelpool)
        if self.save_checkpoint is not None:
            check_save_checkpoint(self.save_checkpoint)
        auto = transformers.AutoModelForCausalLM if self.causal_lm else transformers.AutoModel
        with tempfile.TemporaryDirectory(prefix="surgery-fusion-bench-") as tmp:
            saved_dense = Path(tmp) / "dense"
            plan = self._plan(dense, saved_dense)
            out = execute(plan, self.save_checkpoint or Path(tmp) / "moe", command=self._command(plan, dense))
            shutil.rmtree(saved_dense, ignore_errors=True)
            return auto.from_pretrained(out, **_dtype_auto())

    def _plan(self, dense: object, folder: Path) -> Plan:
        """Plan from a checkpoint path, or from `dense` saved into `folder`."""
        if isinstance(dense, (str, os.PathLike)):
            source = open_source(dense)
            return make_plan(source, mixtral_rules(source), Options(), self.params)
        model = _as_model(dense)
        bare = model.base_model is model
        if bare and self.causal_lm:
            raise SurgeryError(
                f"{type(self).__name__} needs a ...ForCausalLM model, got a bare {type(model).__name__}: "
                "use MixtralUpscalingAlgorithm for it"
            )
        model.save_pretrained(folder, max_shard_size=DENSE_SHARD_SIZE)
        origin = f" loaded from {model.name_or_path}" if model.name_or_path else ""
        source = replace(open_source(folder), location=f"in-memory {type(model).__name__}{origin}")
        rules = mixtral_rules(source)
        if not bare:
            return make_plan(source, rules, Options(), self.params)
        prefix = f"{model.base_model_prefix}."
        return _strip_prefix(make_plan(_add_prefix(source, prefix), rules, Options(), self.params), prefix)

    def _command(self, plan: Plan, dense: object) -> str:
        """The call, for the model card's recipe."""
        arg = repr(str(dense)) if isinstance(dense, (str, os.PathLike)) else f"<{plan.source.location}>"
        return f"surgery.compat.fusion_bench.{type(self).__name__}({self.config!r}).run({arg})"


class MixtralForCausalLMUpscalingAlgorithm(MixtralUpscalingAlgorithm):
    """FusionBench's `MixtralForCausalLMUpscalingAlgorithm`: a dense `...ForCausalLM` (or its checkpoint
    path, or a model pool holding it) into a `MixtralForCausalLM`; see `MixtralUpscalingAlgorithm`."""

    causal_lm = True


def method_params(config: Mapping[str, Any], where: str = "method") -> tuple[dict[str, object], str | None]:
    """Validate a method config (the seed YAML, its `_target_` form, or the Python example's dict).

    Returns the rule-file parameters (num_experts, experts_per_token) and `save_checkpoint` (None when not set).
    """
    check_keys(config, METHOD_KEYS, where)
    if config.get("name", METHOD_NAMES[0]) not in METHOD_NAMES:
        raise SurgeryError(f"{where}.name: {config['name']!r} is not supported; use {' or '.join(METHOD_NAMES)}")
    if str(config.get("_target_", METHOD_CLASSES[0])).rpartition(".")[2] not in METHOD_CLASSES:
        raise SurgeryError(
            f"{where}._target_: {config['_target_']!r} is not supported; use fusion_bench.method.{METHOD_CLASSES[1]}"
        )
    if "num_experts" not in config:
        raise SurgeryError(f"{where}: missing num_experts")
    top_k = [config[key] for key in TOP_K_KEYS if key in config]
    if not top_k:
        raise SurgeryError(f"{where}: missing experts_per_token")
    if len(top_k) == 2 and top_k[0] != top_k[1]:
        raise SurgeryError(
            f"{where}: experts_per_token={top_k[0]!r} and expert_per_token={top_k[1]!r} disagree; give only one"
        )
    save = config.get("save_checkpoint")
    if save is not None and not isinstance(save, (str, os.PathLike)):
        raise SurgeryError(f"{where}.save_checkpoint: expected a folder or null, got {save!r}")
    params = {"num_experts": config["num_experts"], "experts_per_token": top_k[0]}
    resolve(load_rules(CHECKED_BY).parameters, params, {}, where)  # checked now, as FusionBench does
    return params, save


#: FusionBench's depth up-scaling: its method names and classes, and the keys of its configs
DEPTH_NAMES = ("depth_upscaling",)
DEPTH_CLASSES = ("DepthUpscalingAlgorithm", "DepthUpscalingForLlama")
DEPTH_KEYS = ("name", "_target_", "layer_indices", "model_save_path")
DEPTH_RULES = "depth-upscale"


def is_depth_upscaling(config: Mapping[str, Any]) -> bool:
    """Whether a method config asks for FusionBench's depth up-scaling (else it is Mixtral upscaling)."""
    return (config.get("name") in DEPTH_NAMES
            or str(config.get("_target_", "")).rpartition(".")[2] in DEPTH_CLASSES)


def depth_params(config: Mapping[str, Any], where: str = "method") -> tuple[dict[str, object], str | None]:
    """A depth up-scaling method config: the `layers` parameter of the depth-upscale rule file, and
    `model_save_path` (None when not set).

    FusionBench evaluates string entries of `layer_indices` with Python's `eval` ("range(6, 12)"); here they are
    read by the rule files' safe expressions, which take the same ranges and lists and nothing else.
    """
    check_keys(config, DEPTH_KEYS, where)
    indices = config.get("layer_indices")
    if not isinstance(indices, Sequence) or isinstance(indices, str) or not indices:
        raise SurgeryError(f"{where}.layer_indices: expected a list of layer numbers and range strings, got {indices!r}")
    layers: list[int] = []
    for i, entry in enumerate(indices):
        value = evaluate(entry, {}, f"{where}.layer_indices[{i}]") if isinstance(entry, str) else entry
        items = list(value) if isinstance(value, (list, range)) else [value]
        if not all(isinstance(item, int) and not isinstance(item, bool) for item in items):
            raise SurgeryError(f"{where}.layer_indices[{i}]: {entry!r} is not a layer number or a list of them")
        layers += items
    save = config.get("model_save_path")
    if save is not None and not isinstance(save, (str, os.PathLike)):
        raise SurgeryError(f"{where}.model_save_path: expected a folder or null, got {save!r}")
    return {"layers": layers}, save


def pretrained_entry(pool: Mapping[str, Any], where: str = "modelpool") -> tuple[object, str]:
    """The `_pretrained_` model of a model-pool config, and the dotted key that holds it.

    `models` is a list of `{name, path}` (the seed's form) or a mapping `{name: path}`.
    """
    check_keys(pool, POOL_KEYS, where)
    models = pool.get("models")
    entries: dict[object, tuple[object, str]] = {}
    if isinstance(models, Mapping):
        entries = {name: (path, f"{where}.models.{name}") for name, path in models.items()}
    elif isinstance(models, Sequence) and not isinstance(models, str):
        for i, model in enumerate(models):
            if not isinstance(model, Mapping) or set(model) != {"name", "path"}:
                raise SurgeryError(f"{where}.models.{i}: expected a mapping with exactly name and path, got {model!r}")
            entries[model["name"]] = (model["path"], f"{where}.models.{i}.path")
    else:
        raise SurgeryError(f"{where}.models: expected a list of {{name: ..., path: ...}} or a mapping name: path")
    if PRETRAINED not in entries:
        found = ", ".join(map(str, entries)) or "none"
        raise SurgeryError(f"{where}.models: no model named {PRETRAINED} (found: {found}); add the dense model under that name")
    return entries[PRETRAINED]


def check_keys(config: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in config:
        if key not in allowed:
            raise SurgeryError(f"{where}.{key}: unknown key (allowed: {', '.join(allowed)})")


def check_save_checkpoint(path: str | os.PathLike, key: str = "save_checkpoint") -> None:
    """Fail before any work if the save path (`key`) is a file or a non-empty folder."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SurgeryError(f"{key} {path}: exists and is not an empty folder; choose a new folder")


def mixtral_rules(source: Checkpoint) -> RuleFile:
    """The built-in rule file to Mixtral whose `source_model_types` include the source's model_type; where several
    do (e.g. experts-to-mixtral, which takes experts from further sources), the one named for the pair,
    `<model_type>-to-mixtral`."""
    if not source.config:
        raise SurgeryError(f"{source.location}: no config.json, so there is no model_type to choose a rule file by")
    model_type = source.config.get("model_type")
    to_mixtral = [rules for rules in map(load_rules, builtin_rule_names())  # upcycles: into Mixtral, from others
                  if rules.target["model_type"] == TARGET_MODEL_TYPE and TARGET_MODEL_TYPE not in rules.source_model_types]
    found = [rules for rules in to_mixtral if model_type in rules.source_model_types]
    named = f"{str(model_type).replace('_', '-')}-to-{TARGET_MODEL_TYPE}"
    found = [rules for rules in found if rules.name == named] or found
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(rules.name for rules in found)
        raise SurgeryError(f"{source.location}: several built-in rule files turn {model_type!r} into mixtral ({names})")
    accepted = ", ".join(sorted({t for rules in to_mixtral for t in rules.source_model_types}))
    raise SurgeryError(
        f"{source.location}: model_type {model_type!r} has no built-in rule file to {TARGET_MODEL_TYPE} "
        f"(accepted: {accepted}); write a rule file and use `surgery upcycle --rules FILE`"
    )


def _pretrained(modelpool: object) -> object:
    """What `run` was given, or the `_pretrained_` entry of the model pool it was given."""
    if callable(getattr(modelpool, "load_model", None)):
        return modelpool.load_model(PRETRAINED)
    if isinstance(modelpool, Mapping):
        if "models" in modelpool:
            return pretrained_entry(modelpool)[0]
        if PRETRAINED not in modelpool:
            raise SurgeryError(f"the model pool has no {PRETRAINED} entry (keys: {', '.join(map(str, modelpool))})")
        return modelpool[PRETRAINED]
    return modelpool


def _as_model(obj: object) -> PreTrainedModel:
    import transformers

    if not isinstance(obj, transformers.PreTrainedModel):
        raise SurgeryError(
            f"expected a transformers model, a checkpoint path or a model pool with {PRETRAINED}, got {type(obj).__name__}"
        )
    return obj


def _add_prefix(source: Checkpoint, prefix: str) -> Checkpoint:
    """The same checkpoint with `prefix` before every tensor name (headers only, no data moves)."""
    tensors = {prefix + name: replace(info, name=prefix + name) for name, info in source.tensors.items()}
    return replace(source, tensors=tensors)


def _strip_prefix(plan: Plan, prefix: str) -> Plan:
    """A plan for a base model: output names without `prefix`, and the target's base class as architecture."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    tensors = [replace(p, tensor=replace(p.tensor, name=p.tensor.name.removeprefix(prefix))) for p in plan.tensors]
    config = {**plan.config, "architectures": [MODEL_MAPPING_NAMES[plan.config["model_type"]]]}
    return replace(plan, tensors=tensors, config=config)


def _dtype_auto() -> dict[str, str]:
    """`from_pretrained` keyword for the checkpoint's own dtype: `dtype`, called `torch_dtype` before 4.56."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": "auto"}
