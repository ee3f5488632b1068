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
#: a router std above this is a typo: every logit would saturate
MAX_ROUTER_STD = 100.0
#: a plan may not have more output tensors than a shard header can list (100 MB of JSON, ~100 bytes an entry)
MAX_OUTPUTS = 1_000_000
#: nor more bytes than JSON readers can count exactly (2**53, 9 PB)
MAX_OUTPUT_BYTES = 2**53
#: tensor names are printable, not empty, not safetensors' reserved key, and of reasonable length
MAX_NAME_LENGTH = 1024


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
        if not 0 <= self.seed < 2**64:
            raise SurgeryError(f"seed must be between 0 and 2**64-1, got {self.seed}")
        if not (isinstance(self.router_std, (int, float)) and 0 <= self.router_std <= MAX_ROUTER_STD):
            raise SurgeryError(f"router_std must be a number from 0 to {MAX_ROUTER_STD:g}, got {self.router_std}")
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
    config = _output_config(source, rules, options, names)
    check_json(config, f"{rules.path}: config")
    return Plan(source, rules, options, tensors, config, planner.counts)


def check_json(value: object, where: str) -> None:
    """Refuse values JSON cannot hold (inf, NaN), naming the field: json.dumps would write `Infinity`."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SurgeryError(f"{where}: {value} is not a finite number, and config.json cannot hold it")
    if isinstance(value, dict):
        for key, item in value.items():
            check_json(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_json(item, f"{where}[{i}]")


def check_name(name: str, where: str) -> None:
    """Refuse an output tensor name that no safetensors reader would accept or that would cause trouble."""
    if name == "__metadata__" or not name or not name.isprintable() or len(name) > MAX_NAME_LENGTH:
        problem = "is reserved by safetensors" if name == "__metadata__" else (
            "is empty" if not name else "is too long" if len(name) > MAX_NAME_LENGTH else "has unprintable characters")
        raise SurgeryError(f"{where}: output tensor name {name[:80]!r} {problem}")


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
        self.outputs = self.nbytes = 0

    def _count(self, outputs: int, nbytes: int, where: str) -> None:
        """Add to the plan's size, refusing it before it grows past what a checkpoint can hold."""
        self.outputs += outputs
        self.nbytes += nbytes
        if self.outputs > MAX_OUTPUTS:
            raise SurgeryError(f"{where}: the plan would have more than {MAX_OUTPUTS:,} output tensors")
        if self.nbytes > MAX_OUTPUT_BYTES:
            raise SurgeryError(f"{where}: the plan would write more than {MAX_OUTPUT_BYTES:,} bytes")

    def apply(self) -> list[PlannedTensor]:
        """Outputs in natural name order (`layers.9` before `layers.10`), whatever the source's layout."""
        planned: list[PlannedTensor] = []
        rules = [(rule, rule.pattern) for rule in self.rules.tensors]
        for info in self.source.tensors.values():
            hits = [(rule, m) for rule, pattern in rules if (m := pattern.fullmatch(info.name))]
            if not any(not rule.is_new for rule, _ in hits):
                self._count(1, info.nbytes, f"{self.source.location}: {info.name}")
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
        where = f"{self.rules.path}: {rule.where}"
        for values, share in self._fan_out(rule, bound):
            name = fill(rule.to, values)
            check_name(name, where)
            if not rule.is_new:
                self._count(1, info.nbytes, where)
                out.append(PlannedTensor(self._copy(info, name), info.name, rule.where, share))
                continue
            names = {**self.names, **values}
            shape = tuple(self._int(d, f"{rule.where}.shape", names) for d in rule.shape)
            dtype = dtypes.parse_float_dtype(rule.dtype) if rule.dtype else self.model_dtype
            self._count(1, dtypes.nbytes(dtype, _bounded_numel(shape, where)), where)
            tensor = OutputTensor(name, dtype, shape, self._init(rule, name, shape, dtype, names))
            out.append(PlannedTensor(tensor, None, rule.where, share))
        return out

    def _fan_out(self, rule: TensorRule, bound: dict[str, str]) -> list[tuple[dict[str, int], Fraction]]:
        values = {k: int(v) for k, v in bound.items()}
        free = [self.rules.indices[name] for name in dict.fromkeys(placeholders(rule.to)) if name not in values]
        ranges, share, combos = [], Fraction(1), 1
        for index in free:
            count = self._int(index.count, f"indices.{index.name}.count")
            ranges.append(range(count))
            combos *= count
            if self.outputs + combos > MAX_OUTPUTS:
                raise SurgeryError(
                    f"{self.rules.path}: {rule.where}: fanning out over {index.name} ({count}) would make more than "
                    f"{MAX_OUTPUTS:,} output tensors"
                )
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


def _bounded_numel(shape: tuple[int, ...], where: str) -> int:
    """Elements of a planned shape, refused beyond what a safetensors offset (u64) can address."""
    numel = 1
    for d in shape:
        numel *= d
        if numel >= 2**64:
            raise SurgeryError(f"{where}: shape {list(shape)} has more elements than a safetensors file can hold")
    return numel


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
