"""Planning: rules + source headers + options -> every output tensor, the output config and shards.

A plan is built from headers alone, so it is cheap even for a 70B model or a remote repository.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from . import dtypes
from .checkpoint import Checkpoint, TensorInfo
from .errors import SurgeryError
from .expressions import evaluate, placeholders, render
from .producers import Copy, Producer, Segment, cast, random_init
from .rules import RuleFile, TensorRule, fill, load_rules
from .writer import DEFAULT_MAX_SHARD_BYTES, OutputTensor, shard_layout, shard_names

ROUTER_INITS = ("normal", "zeros", "uniform")


@dataclass(frozen=True)
class Options:
    """User options that rule files refer to by name (`num_experts`, `experts_per_token`, ...)."""

    num_experts: int
    experts_per_token: int
    router_init: str = "normal"
    router_std: float = 0.02
    seed: int = 0
    dtype: str | None = None
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES

    def __post_init__(self) -> None:
        for name in ("num_experts", "experts_per_token", "seed", "max_shard_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise SurgeryError(f"{name} must be an integer, got {value!r}")
        if self.num_experts < 1:
            raise SurgeryError(f"num_experts must be at least 1, got {self.num_experts}")
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise SurgeryError(
                f"experts_per_token must be between 1 and num_experts ({self.num_experts}), got {self.experts_per_token}"
            )
        if self.router_init not in ROUTER_INITS:
            raise SurgeryError(f"router_init must be one of {', '.join(ROUTER_INITS)}, got {self.router_init!r}")
        if not self.router_std >= 0:
            raise SurgeryError(f"router_std must be non-negative, got {self.router_std}")
        if self.max_shard_size < 1:
            raise SurgeryError(f"max_shard_size must be positive, got {self.max_shard_size}")
        if self.dtype is not None:
            object.__setattr__(self, "dtype", dtypes.parse_float_dtype(self.dtype))

    def names(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in ("num_experts", "experts_per_token", "router_std", "seed")}


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor with where it comes from: the source tensor (if any), the rule, its active share."""

    tensor: OutputTensor
    source: str | None
    rule: str
    active: Fraction = Fraction(1)


@dataclass
class Plan:
    source: Checkpoint
    rules: RuleFile
    options: Options
    tensors: list[PlannedTensor]
    config: dict
    rule_counts: dict[str, int] = field(default_factory=dict)

    @property
    def outputs(self) -> list[OutputTensor]:
        return [p.tensor for p in self.tensors]

    @property
    def num_parameters(self) -> int:
        return sum(p.tensor.numel for p in self.tensors)

    @property
    def active_parameters(self) -> int:
        return int(sum(p.tensor.numel * p.active for p in self.tensors))

    @property
    def nbytes(self) -> int:
        return sum(p.tensor.nbytes for p in self.tensors)

    def shards(self) -> list[tuple[str, list[OutputTensor]]]:
        layout = shard_layout(self.outputs, self.options.max_shard_size)
        return list(zip(shard_names(len(layout)), layout))


def make_plan(source: Checkpoint, rules: RuleFile | str | Path, options: Options) -> Plan:
    """Apply `rules` to `source`'s headers; raise SurgeryError for anything that does not fit."""
    if not isinstance(rules, RuleFile):
        rules = load_rules(rules)
    _check_source(source, rules)
    names = {**source.config, **options.names()}
    planner = _Planner(source, rules, options, names)
    tensors = planner.apply()
    return Plan(source, rules, options, tensors, _output_config(source, rules, options, names), planner.counts)


def natural_key(name: str) -> list[object]:
    """Sort key that orders `layers.10` after `layers.9`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _check_source(source: Checkpoint, rules: RuleFile) -> None:
    if not source.config:
        raise SurgeryError(f"{source.location}: no config.json, so the architecture cannot be checked against {rules.name}")
    model_type = source.config.get("model_type")
    if model_type not in rules.source_model_types:
        raise SurgeryError(
            f"{source.location} is a {model_type!r} model, but rule file {rules.name} accepts "
            f"{', '.join(rules.source_model_types)}: pick a rule file for this architecture (see `surgery rules`)"
        )
    for key, value in rules.forbid.items():
        if key in source.config and source.config[key] == value:
            raise SurgeryError(
                f"{source.location}: config sets {key}={value!r}, which {rules.target['model_type']} cannot represent "
                f"(rule file {rules.name} forbids it)"
            )


def _output_config(source: Checkpoint, rules: RuleFile, options: Options, names: dict) -> dict:
    config = {k: v for k, v in source.config.items() if k not in rules.config_delete}
    for old, new in rules.config_rename.items():
        if old in config:
            config[new] = config.pop(old)
    for key, value in rules.config_set.items():
        config[key] = render(value, names, f"{rules.path}: config.set.{key}")
    config["model_type"] = rules.target["model_type"]
    if rules.target["architectures"]:
        config["architectures"] = list(rules.target["architectures"])
    for key in ("dtype", "torch_dtype"):
        if key in config and options.dtype:
            config[key] = dtypes.TORCH_NAMES[options.dtype]
    return config


class _Planner:
    def __init__(self, source: Checkpoint, rules: RuleFile, options: Options, names: dict):
        self.source, self.rules, self.options, self.names = source, rules, options, names
        self.counts = {rule.where: 0 for rule in rules.tensors}
        self.model_dtype = options.dtype or _float_or_f32(source.dominant_dtype)

    def apply(self) -> list[PlannedTensor]:
        """Outputs in natural name order (`layers.9` before `layers.10`), whatever the source's layout."""
        planned: list[PlannedTensor] = []
        rules = [(rule, rule.pattern) for rule in self.rules.tensors]
        for info in self.source.tensors.values():
            hits = [(rule, m) for rule, pattern in rules if (m := pattern.fullmatch(info.name))]
            if not any(not rule.is_new for rule, _ in hits):
                planned.append(PlannedTensor(self._copy(info, info.name), info.name, "unchanged"))
            for rule, match in hits:
                self.counts[rule.where] += 1
                planned += self._outputs(rule, match.groupdict(), info)
        unmatched = [rule for rule in self.rules.tensors if self.counts[rule.where] == 0]
        if unmatched:
            rule = unmatched[0]
            raise SurgeryError(
                f"{self.rules.path}: {rule.where} ({rule.source or rule.for_each}) matches no tensor of "
                f"{self.source.location}"
            )
        _check_unique(planned, self.rules)
        return sorted(planned, key=lambda p: natural_key(p.tensor.name))

    def _outputs(self, rule: TensorRule, bound: dict[str, str], info: TensorInfo) -> list[PlannedTensor]:
        """What one rule makes of one matching source tensor: copies, or new tensors."""
        out = []
        for values, share in self._fan_out(rule, bound):
            name = fill(rule.to, values)
            if not rule.is_new:
                out.append(PlannedTensor(self._copy(info, name), info.name, rule.where, share))
                continue
            names = {**self.names, **values}
            shape = tuple(self._int(d, f"{rule.where}.shape", names) for d in rule.shape)
            dtype = dtypes.parse_float_dtype(rule.dtype) if rule.dtype else self.model_dtype
            tensor = OutputTensor(name, dtype, shape, self._init(rule, name, shape, dtype, names))
            out.append(PlannedTensor(tensor, None, rule.where, share))
        return out

    def _fan_out(self, rule: TensorRule, bound: dict[str, str]) -> list[tuple[dict[str, int], Fraction]]:
        values = {k: int(v) for k, v in bound.items()}
        free = [self.rules.indices[name] for name in dict.fromkeys(placeholders(rule.to)) if name not in values]
        ranges, share = [], Fraction(1)
        for index in free:
            count = self._int(index.count, f"indices.{index.name}.count")
            ranges.append(range(count))
            if index.active is not None and count:
                share *= Fraction(self._int(index.active, f"indices.{index.name}.active"), count)
        return [({**values, **dict(zip((i.name for i in free), combo))}, share) for combo in itertools.product(*ranges)]

    def _copy(self, info: TensorInfo, name: str) -> OutputTensor:
        segment = Segment(self.source.files, info.file, info.offset, info.nbytes)
        target = self.options.dtype
        if target and info.dtype in dtypes.FLOATS and info.dtype != target:
            return OutputTensor(name, target, info.shape, cast(segment, info.dtype, target, info.numel))
        return OutputTensor(name, info.dtype, info.shape, Copy((segment,)))

    def _init(self, rule: TensorRule, name: str, shape: tuple[int, ...], dtype: str, names: dict) -> Producer:
        numel = math.prod(shape)
        if rule.init == "router":
            kind = self.options.router_init
            scale = self.options.router_std if kind == "normal" else 1 / math.sqrt(shape[-1]) if shape else 1.0
        elif rule.init == "zeros":
            kind, scale = "zeros", 0.0
        else:
            kind, expr = next(iter(rule.init.items()))
            scale = float(evaluate(expr, names, f"{self.rules.path}: {rule.where}.init.{kind}"))
        return random_init(kind, scale, dtype, numel, self.options.seed, name)

    def _int(self, expr: object, where: str, names: dict | None = None) -> int:
        value = evaluate(expr, names or self.names, f"{self.rules.path}: {where}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SurgeryError(f"{self.rules.path}: {where}: {expr!r} gives {value!r}, not a non-negative integer")
        return value


def _float_or_f32(dtype: str) -> str:
    return dtype if dtype in dtypes.FLOATS else "F32"


def _check_unique(planned: list[PlannedTensor], rules: RuleFile) -> None:
    seen: dict[str, str] = {}
    for p in planned:
        if p.tensor.name in seen:
            raise SurgeryError(
                f"{rules.path}: output tensor {p.tensor.name!r} is produced twice ({seen[p.tensor.name]} and {p.rule})"
            )
        seen[p.tensor.name] = p.rule
