"""Planning: rules + source headers + parameters -> every output tensor, the output config and shards.

Each tensor rule is applied per output: for every source tensor its `for_each` pattern matches (and every value of
the indices its output name fans out over), the rule's value tree is built from the source headers into nodes,
and the cheapest producer is chosen. Source tensors that no rule takes (and no `drop` pattern names) are copied
unchanged. A plan is built from headers alone, so it is cheap even for a 70B model or a remote repository.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from . import dtypes
from .checkpoint import Checkpoint
from .errors import SurgeryError
from .expressions import evaluate, placeholders, render
from .params import resolve
from .producers import Copy, produce
from .randomness import check_seed
from .rules import INITS, Index, RuleFile, Spec, TensorRule, compile_pattern, load_rules
from .values import Add, Cast, Concat, Init, Mean, Node, Noise, Reinit, Scale, Slice, Source, Stack, Take
from .writer import DEFAULT_MAX_SHARD_BYTES, OutputTensor, shard_layout, shard_names

#: a plan may not have more output tensors than a shard header can list (100 MB of JSON, ~100 bytes an entry)
MAX_OUTPUTS = 1_000_000
#: nor more bytes than JSON readers can count exactly (2**53, 9 PB)
MAX_OUTPUT_BYTES = 2**53
#: nor stack or average more parts into one tensor than this
MAX_PARTS = 65_536
#: largest orthogonal init (its Gram-Schmidt is quadratic in the rows)
MAX_ORTHOGONAL = 1 << 22
#: tensor names are printable, not empty, not safetensors' reserved key, and of reasonable length
MAX_NAME_LENGTH = 1024


@dataclass(frozen=True)
class Options:
    """How to write, whatever the rule file: the seed of new values, the output dtype, the shard size."""

    seed: int = 0
    dtype: str | None = None
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES

    def __post_init__(self) -> None:
        for name in ("seed", "max_shard_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise SurgeryError(f"{name} must be an integer, got {value!r}")
        try:
            check_seed(self.seed)
        except ValueError as exc:
            raise SurgeryError(str(exc)) from None
        if self.max_shard_size < 1:
            raise SurgeryError(f"max_shard_size must be positive, got {self.max_shard_size}")
        if self.dtype is not None:
            object.__setattr__(self, "dtype", dtypes.parse_float_dtype(self.dtype))


OPTION_NAMES = ("seed", "dtype", "max_shard_size")
#: the name of the checkpoint a plan is made from, among the sources a rule file may read
BASE = "base"


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor with where it comes from: its source tensors, the rule, its active share."""

    tensor: OutputTensor
    sources: tuple[str, ...]
    rule: str
    active: Fraction = Fraction(1)


@dataclass
class RuleStats:
    """What one rule did: source tensors its pattern matched, outputs, and bytes copied or computed."""

    matched: int = 0
    outputs: int = 0
    copied: int = 0
    computed: int = 0


@dataclass
class Plan:
    source: Checkpoint
    rules: RuleFile
    options: Options
    params: dict[str, object]
    tensors: list[PlannedTensor]
    config: dict
    stats: dict[str, RuleStats] = field(default_factory=dict)
    exact: tuple[bool | None, str] = (None, "")
    #: every checkpoint the plan reads, by name (`base` is `source`), and notes on how they differ
    sources: dict[str, Checkpoint] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

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


def make_plan(source: Checkpoint, rules: RuleFile | str | Path, options: Options,
              params: Mapping[str, object] | None = None, sources: Mapping[str, Checkpoint] | None = None) -> Plan:
    """Apply `rules` with `params` to `source`'s headers; raise SurgeryError for anything that does not fit.

    `sources` are further checkpoints of the same architecture and shapes, by name, that a rule file's values
    read with `{tensor: NAME, source: SOURCE}`; `source` itself is named `base`. Those the rule file declares
    auxiliary are read by name only: not checked against the base, and not in the `sources` name.
    """
    if not isinstance(rules, RuleFile):
        rules = load_rules(rules)
    _check_source(source, rules)
    if BASE in (sources or {}):
        raise SurgeryError(f"a further source cannot be named {BASE!r}: that is SRC's name")
    named = {BASE: source, **(sources or {})}
    notes = _check_sources(named, rules)
    config_names = {**source.config, "config": source.config}  # `'field' in config` tests for an optional field
    values = resolve(rules.parameters, params or {}, config_names, rules.path, rules.refuses)
    names = {**config_names, **values, "seed": options.seed,
             "sources": [name for name in named if name not in rules.auxiliary],
             "configs": {name: checkpoint.config for name, checkpoint in named.items()}}
    for name, expression in rules.let.items():
        names[name] = evaluate(expression, names, f"{rules.path}: let.{name}")
    for that, otherwise in rules.require:
        if not evaluate(that, names, f"{rules.path}: require"):
            raise SurgeryError(f"{rules.name}: {render(otherwise, names, f'{rules.path}: require')}")
    planner = _Planner(named, rules, options, names)
    tensors = planner.apply()
    config = _output_config(source, rules, options, names)
    check_json(config, f"{rules.path}: config")
    return Plan(source, rules, options, values, tensors, config, planner.stats, _exactness(rules, names), named, notes)


def _check_sources(named: Mapping[str, Checkpoint], rules: RuleFile) -> list[str]:
    """Every source must be the base's architecture with the same tensors (names, shapes, dtypes), and an
    auxiliary one of a model_type its declaration accepts; returns notes on side files (tokenizer, ...) that
    differ, for which the base's are used."""
    base, notes = named[BASE], []
    for name, other in named.items():
        where = f"source {name} ({other.location})"
        if name in rules.auxiliary:
            accepted = rules.auxiliary[name].model_types
            if accepted and other.config.get("model_type") not in accepted:
                raise SurgeryError(f"{where} is a {other.config.get('model_type')!r} model, but rule file "
                                   f"{rules.name} reads source {name} from {', '.join(accepted)} models")
            continue
        if other is base:
            continue
        if other.config.get("model_type") != base.config.get("model_type"):
            raise SurgeryError(f"{where} is a {other.config.get('model_type')!r} model, the base a "
                               f"{base.config.get('model_type')!r}: sources must share one architecture")
        for key in sorted(set(base.tensors) ^ set(other.tensors))[:1]:
            raise SurgeryError(f"{where}: tensor {key!r} is in only one of it and the base ({base.location})")
        for key, info in base.tensors.items():
            theirs = other.tensors[key]
            if (theirs.dtype, theirs.shape) != (info.dtype, info.shape):
                raise SurgeryError(f"{where}: {key} is {theirs.dtype}{list(theirs.shape)}, in the base "
                                   f"{info.dtype}{list(info.shape)}")
        differing = sorted(set(base.side_files) ^ set(other.side_files))
        if differing:
            notes.append(f"{where} has other side files ({', '.join(differing[:3])}): the base's are used")
    return notes


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


def fill(template: str, names: Mapping[str, object], where: str) -> str:
    """A name template with each `{expr}` replaced by its value."""
    return re.sub(r"\{([^{}]*)\}", lambda m: _text(evaluate(m.group(1), names, where), where), template)


def _text(value: object, where: str) -> str:
    if not isinstance(value, (int, str)) or isinstance(value, bool):
        raise SurgeryError(f"{where}: a tensor name part must be an integer or a text, got {value!r}")
    return str(value)


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
    config = _copy_config(source.config)
    for key in rules.config_delete:
        _pop(config, key)
    for old, new in rules.config_rename.items():
        if _has(config, old):
            _set(config, new, _pop(config, old))
    if rules.config_relayer:
        _relayer(config, source.config, rules, names)
    for key, value in rules.config_set.items():
        _set(config, render(key, names, f"{rules.path}: config.set"),
             render(value, names, f"{rules.path}: config.set.{key}"))
    config["model_type"] = render(rules.target["model_type"], names, f"{rules.path}: target.model_type")
    if rules.target["architectures"]:
        config["architectures"] = list(rules.target["architectures"])
    for key in ("dtype", "torch_dtype"):
        if key in config and options.dtype:
            config[key] = dtypes.TORCH_NAMES[options.dtype]
    return config


def _relayer(config: dict, source: dict, rules: RuleFile, names: dict) -> None:
    """Output layer j is source layer layers[j]: every list with one entry per source layer is re-picked, and the
    `index_lists` (lists of layer numbers, e.g. mlp_only_layers) are renumbered."""
    where = f"{rules.path}: config.relayer"
    layers = evaluate(rules.config_relayer["layers"], names, where)
    count = source.get("num_hidden_layers")
    if not isinstance(layers, list) or not isinstance(count, int) or any(not 0 <= i < count for i in layers):
        raise SurgeryError(f"{where}: layers must be a list of source layer numbers from 0 to {count}")
    for key, value in list(config.items()):
        if isinstance(value, list) and len(value) == count and key not in rules.config_relayer["index_lists"]:
            config[key] = [value[i] for i in layers]
    for key in rules.config_relayer["index_lists"]:
        if isinstance(config.get(key), list):
            config[key] = [j for j, i in enumerate(layers) if i in config[key]]


def _copy_config(value: object) -> object:
    if isinstance(value, dict):
        return {k: _copy_config(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_config(v) for v in value]
    return value


def _parent(config: dict, dotted: str, create: bool) -> tuple[dict | None, str]:
    """The mapping holding the last part of a dotted config key (`text_config.num_experts`), and that part."""
    *path, last = dotted.split(".")
    node = config
    for part in path:
        if not isinstance(node.get(part), dict):
            if not create:
                return None, last
            node[part] = {}
        node = node[part]
    return node, last


def _has(config: dict, key: str) -> bool:
    parent, last = _parent(config, key, create=False)
    return parent is not None and last in parent


def _pop(config: dict, key: str) -> object:
    parent, last = _parent(config, key, create=False)
    return parent.pop(last, None) if parent is not None else None


def _set(config: dict, key: object, value: object) -> None:
    if not isinstance(key, str) or not key:
        raise SurgeryError(f"config.set: key {key!r} is not a field name")
    parent, last = _parent(config, key, create=True)
    parent[last] = value


def _exactness(rules: RuleFile, names: dict) -> tuple[bool | None, str]:
    """(True, why) when the rule file says its output computes the source's function, (False, why not), or
    (None, "") when it says nothing."""
    if rules.exact is None:
        return None, ""
    for when, why in rules.exact.unless:
        if evaluate(when, names, f"{rules.path}: exact.unless"):
            return False, why
    return True, rules.exact.because


class _Planner:
    def __init__(self, sources: Mapping[str, Checkpoint], rules: RuleFile, options: Options, names: dict):
        self.sources, self.source = sources, sources[BASE]
        self.rules, self.options, self.names = rules, options, names
        self.stats = {rule.where: RuleStats() for rule in rules.tensors}
        self.model_dtype = options.dtype or _float_or_f32(self.source.dominant_dtype)
        self.taken: set[str] = set()
        self.outputs = self.nbytes = 0

    def apply(self) -> list[PlannedTensor]:
        """Outputs in natural name order (`layers.9` before `layers.10`), whatever the source's layout."""
        planned: list[PlannedTensor] = []
        for rule in self.rules.tensors:
            planned += self._rule(rule)
        dropped = [compile_pattern(template) for template in self.rules.drop]
        for info in self.source.tensors.values():
            if info.name in self.taken or any(p.fullmatch(info.name) for p in dropped):
                continue
            self._count(1, info.nbytes, f"{self.source.location}: {info.name}")
            target = self.options.dtype if info.dtype in dtypes.FLOATS and self.options.dtype else info.dtype
            planned.append(PlannedTensor(self._output(info.name, Source(info, self.source.files), target),
                                         (info.name,), "unchanged"))
        _check_unique(planned, self.rules)
        return sorted(planned, key=lambda p: natural_key(p.tensor.name))

    def _rule(self, rule: TensorRule) -> list[PlannedTensor]:
        where = f"{self.rules.path}: {rule.where}"
        pattern, internal = compile_pattern(rule.for_each), rule.value.bound()
        stats, seen, out = self.stats[rule.where], set(), []
        for info in self.source.tensors.values():
            match = pattern.fullmatch(info.name)
            if match is None:
                continue
            stats.matched += 1
            captured = {k: int(v) if v.isdigit() else v for k, v in match.groupdict().items() if k not in internal}
            key = tuple(sorted(captured.items()))
            if key in seen:
                continue
            seen.add(key)
            for binding, share in self._fan_out(rule, captured, where):
                names = {**self.names, **binding}
                if rule.when is not None and not evaluate(rule.when, names, f"{where}.when"):
                    continue
                name = fill(rule.to, names, f"{where}.to")
                check_name(name, where)
                builder = _Builder(self, names, name)
                node = builder.build(rule.value)
                target = self._dtype(rule, node)
                tensor = self._output(name, node, target)
                self._count(1, tensor.nbytes, where)
                self.taken |= builder.taken
                stats.outputs += 1
                if isinstance(tensor.producer, Copy):
                    stats.copied += tensor.nbytes
                else:
                    stats.computed += tensor.nbytes
                sources = tuple(leaf.info.name for leaf in node.leaves())
                out.append(PlannedTensor(tensor, sources, rule.where, share * builder.share))
        if not stats.matched and not rule.optional:
            raise SurgeryError(f"{where} ({rule.for_each}) matches no tensor of {self.source.location}")
        return out

    def _fan_out(self, rule: TensorRule, captured: dict, where: str) -> list[tuple[dict, Fraction]]:
        """Bindings of the output name's free indices (those not captured from the source name), with the share of
        them a token uses."""
        free = [self.rules.indices[n] for n in dict.fromkeys(placeholders(rule.to)) if n in self.rules.indices
                and n not in captured]
        ranges, share, combos = [], Fraction(1), 1
        for index in free:
            values = self.index_values(index, {**self.names, **captured})
            ranges.append(values)
            count = len(values)
            combos *= count
            if self.outputs + combos > MAX_OUTPUTS:
                raise SurgeryError(
                    f"{where}: fanning out over {index.name} ({count}) would make more than {MAX_OUTPUTS:,} output tensors"
                )
            if index.active is not None and count:
                share *= Fraction(self.integer(index.active, f"indices.{index.name}.active"), count)
        return [({**captured, **dict(zip((i.name for i in free), combo))}, share)
                for combo in itertools.product(*ranges)]

    def index_values(self, index: Index, names: dict) -> list | range:
        """The values an index runs over: range(count) (lazy: counted before it is used), or the list its `values`
        expression gives."""
        if index.values is None:
            return range(self.integer(index.count, f"indices.{index.name}.count", names))
        where = f"{self.rules.path}: indices.{index.name}.values"
        values = evaluate(index.values, names, where)
        if not isinstance(values, (list, range)) or not all(isinstance(v, (int, str)) for v in values):
            raise SurgeryError(f"{where}: expected a list of integers or names, got {values!r}")
        return list(values)

    def _dtype(self, rule: TensorRule, node: Node) -> str:
        """The stored dtype: the rule's, else --dtype for float values, else the value's own."""
        if rule.dtype is not None:
            return dtypes.parse_float_dtype(rule.dtype)
        if self.options.dtype and node.dtype in dtypes.FLOATS:
            return self.options.dtype
        return node.dtype

    def _output(self, name: str, node: Node, dtype: str) -> OutputTensor:
        try:
            return OutputTensor(name, dtype, node.shape, produce(node, dtype))
        except SurgeryError as exc:
            raise SurgeryError(f"{name}: {exc}") from None

    def _count(self, outputs: int, nbytes: int, where: str) -> None:
        """Add to the plan's size, refusing it before it grows past what a checkpoint can hold."""
        self.outputs += outputs
        self.nbytes += nbytes
        if self.outputs > MAX_OUTPUTS:
            raise SurgeryError(f"{where}: the plan would have more than {MAX_OUTPUTS:,} output tensors")
        if self.nbytes > MAX_OUTPUT_BYTES:
            raise SurgeryError(f"{where}: the plan would write more than {MAX_OUTPUT_BYTES:,} bytes")

    def integer(self, expr: object, where: str, names: dict | None = None) -> int:
        value = evaluate(expr, names or self.names, f"{self.rules.path}: {where}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SurgeryError(f"{self.rules.path}: {where}: {expr!r} gives {value!r}, not a non-negative integer")
        return value


class _Builder:
    """Builds one output's value tree from its spec, with the names of one binding; records the source tensors it
    takes and the active share of the experts it stacks."""

    def __init__(self, planner: _Planner, names: dict, output: str):
        self.planner, self.names, self.output = planner, names, output
        self.taken: set[str] = set()
        self.share = Fraction(1)

    def build(self, spec: Spec, names: dict | None = None) -> Node:
        names = names or self.names
        return getattr(self, f"_{spec.op}")(spec, names)

    def fail(self, spec: Spec, problem: str) -> SurgeryError:
        return SurgeryError(f"{self.planner.rules.path}: {spec.where}: {problem} (building {self.output})")

    def eval(self, spec: Spec, field_name: str, names: dict) -> object:
        return evaluate(spec.args[field_name], names, f"{self.planner.rules.path}: {spec.where}.{field_name}")

    def integer(self, spec: Spec, field_name: str, names: dict, default: int | None = None) -> int:
        if field_name not in spec.args:
            return default  # type: ignore[return-value]
        value = self.eval(spec, field_name, names)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(spec, f"{field_name} must be an integer, got {value!r}")
        return value

    def number(self, spec: Spec, field_name: str, names: dict, low: float = 0.0, high: float = math.inf) -> float:
        value = self.eval(spec, field_name, names)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not (low <= value <= high) \
                or not math.isfinite(value):
            raise self.fail(spec, f"{field_name} must be a finite number from {low:g} to {high:g}, got {value!r}")
        return float(value)

    def dim(self, spec: Spec, node: Node, names: dict) -> int:
        d = self.integer(spec, "dim", names)
        if not -len(node.shape) <= d < len(node.shape):
            raise self.fail(spec, f"dim {d} does not exist in a tensor of shape {list(node.shape)}")
        return d % len(node.shape)

    def children(self, spec: Spec, names: dict) -> list[Node]:
        return [self.build(child, names) for child in spec.children]

    def over(self, spec: Spec, names: dict) -> list[Node]:
        """The child built once per value of the `over` index."""
        index = self.planner.rules.indices[spec.args["over"]]
        values = self.planner.index_values(index, names)
        if not 1 <= len(values) <= MAX_PARTS:
            raise self.fail(spec, f"over {index.name}: {len(values)} parts (from 1 to {MAX_PARTS:,} allowed)")
        if index.active is not None:
            active = self.planner.integer(index.active, f"indices.{index.name}.active", names)
            self.share *= Fraction(active, len(values))
        return [self.build(spec.children[0], {**names, index.name: i}) for i in values]

    def _tensor(self, spec: Spec, names: dict) -> Node:
        path = self.planner.rules.path
        name = fill(spec.args["name"], names, f"{path}: {spec.where}")
        source = fill(spec.args.get("source", BASE), names, f"{path}: {spec.where}.source")
        checkpoint = self.planner.sources.get(source)
        auxiliary = self.planner.rules.auxiliary.get(source)
        if checkpoint is None and auxiliary is not None:
            raise self.fail(spec, f"needs source {source}: give it with --source {source}=PATH ({auxiliary.help})")
        if checkpoint is None:
            raise self.fail(spec, f"no source named {source!r} (the sources: {', '.join(self.planner.sources)})")
        info = checkpoint.tensors.get(name)
        if info is None:
            raise self.fail(spec, f"source {source} has no tensor {name!r}")
        if source == BASE:
            self.taken.add(name)
        return Source(info, checkpoint.files)

    def _init(self, spec: Spec, names: dict) -> Node:
        kind = fill(spec.args["kind"], names, f"{self.planner.rules.path}: {spec.where}.init")
        if kind not in INITS:
            raise self.fail(spec, f"init {kind!r} is not one of {', '.join(INITS)}")
        shape = tuple(self.planner.integer(d, f"{spec.where}.shape", names) for d in spec.args["shape"])
        _bounded_numel(shape, f"{self.planner.rules.path}: {spec.where}")
        scale = 0.0
        if kind == "orthogonal" and (len(shape) != 2 or shape[0] > shape[1] or math.prod(shape) > MAX_ORTHOGONAL):
            raise self.fail(spec, f"orthogonal init needs a matrix with no more rows than columns and at most "
                                  f"{MAX_ORTHOGONAL:,} elements, not {list(shape)}")
        if kind in ("normal", "orthogonal"):
            scale = self.number(spec, "std", names, high=1e6) if "std" in spec.args else 1.0
        elif kind == "uniform":
            default = 1 / math.sqrt(shape[-1]) if shape and shape[-1] else 1.0
            scale = self.number(spec, "bound", names, high=1e6) if "bound" in spec.args else default
        key = fill(spec.args.get("key", self.output), names, f"{self.planner.rules.path}: {spec.where}.key")
        dtype = spec.args.get("dtype") or self.planner.model_dtype
        return Init(kind, shape, dtype, scale, self.planner.options.seed, key)

    def _slice(self, spec: Spec, names: dict) -> Node:
        child = self.build(spec.children[0], names)
        d = self.dim(spec, child, names)
        size = child.shape[d]
        if "parts" in spec.args:
            parts, part = self.integer(spec, "parts", names), self.integer(spec, "part", names)
            if parts < 1 or size % parts or not 0 <= part < parts:
                raise self.fail(spec, f"part {part} of {parts} equal parts of a dim of {size}: the parts must divide it")
            start, stop, step = part * size // parts, (part + 1) * size // parts, 1
        else:
            start, stop = self.integer(spec, "start", names, 0), self.integer(spec, "stop", names, size)
            step = self.integer(spec, "step", names, 1)
            if not (0 <= start <= stop <= size and step >= 1):
                raise self.fail(spec, f"slice {start}:{stop}:{step} does not fit a dim of {size} (no clipping)")
        if (start, stop, step) == (0, size, 1):
            return child
        return Slice(child, d, start, stop, step)

    def _take(self, spec: Spec, names: dict) -> Node:
        child = self.build(spec.children[0], names)
        d = self.dim(spec, child, names)
        size, index = child.shape[d], self.eval(spec, "index", names)
        if isinstance(index, int) and not isinstance(index, bool):
            if not 0 <= index < size:
                raise self.fail(spec, f"index {index} is out of range for a dim of {size}")
            return Take(child, d, index=index)
        if not isinstance(index, (list, range)) or not all(isinstance(i, int) and 0 <= i < size for i in index):
            raise self.fail(spec, f"index must be an integer or a list of integers from 0 to {size - 1}, got {index!r}")
        return Take(child, d, indices=tuple(index))

    def _repeat(self, spec: Spec, names: dict) -> Node:
        child = self.build(spec.children[0], names)
        d, times = self.dim(spec, child, names), self.integer(spec, "times", names)
        if not 1 <= times <= MAX_PARTS:
            raise self.fail(spec, f"times must be from 1 to {MAX_PARTS:,}, got {times}")
        if times == 1:
            return child
        return Take(child, d, indices=tuple(j // times for j in range(child.shape[d] * times)))

    def _concat(self, spec: Spec, names: dict) -> Node:
        parts = self.over(spec, names) if "over" in spec.args else self.children(spec, names)
        d = self.dim(spec, parts[0], names)
        for part in parts[1:]:
            _same(self, spec, parts[0], part, skip=d)
        return parts[0] if len(parts) == 1 else Concat(tuple(parts), d)

    def _stack(self, spec: Spec, names: dict) -> Node:
        parts = self.over(spec, names)
        for part in parts[1:]:
            _same(self, spec, parts[0], part)
        return Stack(tuple(parts), f"stack over {spec.args['over']}")

    def _scale(self, spec: Spec, names: dict) -> Node:
        child = self.build(spec.children[0], names)
        factor = self.number(spec, "by", names, low=-1e30, high=1e30)
        return child if factor == 1 else Scale(child, factor)

    def _add(self, spec: Spec, names: dict) -> Node:
        parts = self.children(spec, names)
        for part in parts[1:]:
            _same(self, spec, parts[0], part)
        return parts[0] if len(parts) == 1 else Add(tuple(parts))

    def _mean(self, spec: Spec, names: dict) -> Node:
        parts = self.over(spec, names)
        for part in parts[1:]:
            _same(self, spec, parts[0], part)
        return parts[0] if len(parts) == 1 else Mean(tuple(parts), f"mean over {spec.args['over']}")

    def _cast(self, spec: Spec, names: dict) -> Node:
        child = self.build(spec.children[0], names)
        return child if child.dtype == spec.args["dtype"] else Cast(child, spec.args["dtype"])

    def _noise(self, spec: Spec, names: dict) -> Node:
        child = self.build(spec.children[0], names)
        std = self.number(spec, "std", names, high=1e6)
        if std == 0:
            return child
        key = fill(spec.args.get("key", f"{self.output}#noise"), names, f"{self.planner.rules.path}: {spec.where}.key")
        return Noise(child, std, bool(spec.args.get("relative", False)), self.planner.options.seed, key)

    def _reinit(self, spec: Spec, names: dict) -> Node:
        child = self.build(spec.children[0], names)
        if len(child.shape) != 2:
            raise self.fail(spec, f"reinit applies to matrices, not a tensor of shape {list(child.shape)}")
        d = self.dim(spec, child, names)
        fraction = self.number(spec, "fraction", names, high=1.0)
        if math.floor(fraction * child.shape[d]) == 0:
            return child
        key = fill(spec.args["key"], names, f"{self.planner.rules.path}: {spec.where}.key")
        return Reinit(child, d, fraction, self.planner.options.seed, key, f"{key}#{self.output}")


def _same(builder: _Builder, spec: Spec, a: Node, b: Node, skip: int | None = None) -> None:
    """Parts of a concat, stack, add or mean must agree in dtype and in shape (but along `skip`)."""
    shape_a = [n for i, n in enumerate(a.shape) if i != skip]
    shape_b = [n for i, n in enumerate(b.shape) if i != skip]
    if a.dtype != b.dtype or len(a.shape) != len(b.shape) or shape_a != shape_b:
        raise builder.fail(spec, f"parts differ: {a.dtype}{list(a.shape)} and {b.dtype}{list(b.shape)} "
                                 "(cast them to one dtype, or check the shapes)")


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
