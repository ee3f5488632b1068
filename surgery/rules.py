"""Rule files: the YAML tables that say how an architecture's tensors and config become another's.

The schema is documented in docs/rules.md. Loading validates every field and names it in errors.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import SurgeryError
from .expressions import placeholders

_PACKAGE = Path(__file__).resolve().parent
#: built-in rule files: inside the wheel at surgery/rules, in a source checkout at the repo's rules/
BUILTIN_DIRS = (_PACKAGE / "rules", _PACKAGE.parent / "rules")


@dataclass(frozen=True)
class Index:
    """A placeholder that fans one tensor out into several, e.g. `expert` over range(num_experts)."""

    name: str
    count: str
    active: str | None


@dataclass(frozen=True)
class TensorRule:
    """`from` a source tensor pattern `to` an output name (fanned out over indices), or a `new` tensor."""

    where: str
    to: str
    source: str | None = None
    for_each: str | None = None
    shape: tuple[object, ...] = ()
    init: object = None
    dtype: str | None = None

    @property
    def pattern(self) -> re.Pattern[str]:
        return compile_pattern(self.source if self.source is not None else self.for_each)

    @property
    def is_new(self) -> bool:
        return self.source is None


@dataclass(frozen=True)
class RuleFile:
    name: str
    description: str
    path: str
    sha256: str
    source_model_types: tuple[str, ...]
    forbid: dict = field(default_factory=dict)
    target: dict = field(default_factory=dict)
    indices: dict[str, Index] = field(default_factory=dict)
    config_delete: tuple[str, ...] = ()
    config_rename: dict[str, str] = field(default_factory=dict)
    config_set: dict = field(default_factory=dict)
    tensors: tuple[TensorRule, ...] = ()


def builtin_rule_names() -> list[str]:
    for folder in BUILTIN_DIRS:
        if folder.is_dir():
            return sorted(p.stem for p in folder.glob("*.yaml"))
    return []


def find_rules(name_or_path: str | Path) -> Path:
    """Resolve a built-in rule name or a path to a rule file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise SurgeryError(f"rule file {path} not found")
        return path
    for folder in BUILTIN_DIRS:
        if (folder / f"{name_or_path}.yaml").is_file():
            return folder / f"{name_or_path}.yaml"
    known = ", ".join(builtin_rule_names()) or "none"
    raise SurgeryError(f"unknown rule file {str(name_or_path)!r}: built-in rules are {known}, or give a path to a .yaml")


def load_rules(name_or_path: str | Path) -> RuleFile:
    """Load and validate a rule file by built-in name or path."""
    path = find_rules(name_or_path)
    text = path.read_bytes()
    try:
        doc = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise SurgeryError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    return parse_rules(doc, str(path), hashlib.sha256(text).hexdigest())


class _StrictLoader(yaml.SafeLoader):
    """YAML for untrusted rule files: no aliases (nested ones expand a few bytes into millions of nodes) and no
    duplicate keys (YAML would silently keep the last one)."""

    def compose_node(self, parent: object, index: object) -> object:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in rule files; write the value out", self.peek_event().start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [self.construct_object(key, deep=True) for key, _ in node.value]
        for (key_node, _), key in zip(node.value, keys):
            if keys.count(key) > 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


def parse_rules(doc: object, path: str, sha256: str = "") -> RuleFile:
    """Validate a parsed rule document; errors name the file and the field."""
    r = _Reader(path)
    top = r.mapping(doc, "", required=("name", "source", "target", "tensors"),
                    optional=("description", "indices", "config"))
    source = r.mapping(top["source"], "source", required=("model_type",), optional=("forbid",))
    target = r.mapping(top["target"], "target", required=("model_type",), optional=("architectures",))
    indices = {
        name: _index(r, name, spec)
        for name, spec in r.mapping(top.get("indices", {}), "indices").items()
    }
    config = r.mapping(top.get("config", {}), "config", optional=("delete", "rename", "set"))
    tensors = r.typed(top["tensors"], "tensors", list)
    rules = RuleFile(
        name=r.typed(top["name"], "name", str),
        description=r.typed(top.get("description", ""), "description", str),
        path=path,
        sha256=sha256,
        source_model_types=tuple(r.strings(source["model_type"], "source.model_type")),
        forbid=r.mapping(source.get("forbid", {}), "source.forbid"),
        target={"model_type": r.typed(target["model_type"], "target.model_type", str),
                "architectures": r.strings(target.get("architectures", []), "target.architectures")},
        indices=indices,
        config_delete=tuple(r.strings(config.get("delete", []), "config.delete")),
        config_rename={k: r.typed(v, f"config.rename.{k}", str)
                       for k, v in r.mapping(config.get("rename", {}), "config.rename").items()},
        config_set=r.mapping(config.get("set", {}), "config.set"),
        tensors=tuple(_tensor_rule(r, f"tensors[{i}]", spec, indices) for i, spec in enumerate(tensors)),
    )
    if not rules.tensors:
        raise SurgeryError(f"{path}: tensors: needs at least one rule")
    return rules


def compile_pattern(template: str) -> re.Pattern[str]:
    """A tensor-name template with `{name}` placeholders as a regex capturing each as a number."""
    out, seen = [], set()
    for literal, name in re.findall(r"([^{}]*)(?:\{([^{}]*)\})?", template):
        out.append(re.escape(literal))
        if name:
            out.append(f"(?P={name})" if name in seen else f"(?P<{name}>\\d+)")
            seen.add(name)
    return re.compile("".join(out))


def fill(template: str, values: dict[str, int]) -> str:
    return re.sub(r"\{([^{}]*)\}", lambda m: str(values[m.group(1)]), template)


class _Reader:
    """Type checks that name the offending field."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, problem: str) -> SurgeryError:
        return SurgeryError(f"{self.path}: {where or 'top level'}: {problem}")

    def typed(self, value: object, where: str, kind: type) -> object:
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise self.fail(where, f"expected {_KIND_NAMES.get(kind, kind.__name__)}, got {value!r}")
        return value

    def strings(self, value: object, where: str) -> list[str]:
        items = [value] if isinstance(value, str) else self.typed(value, where, list)
        for i, item in enumerate(items):
            self.typed(item, f"{where}[{i}]", str)
        return list(items)

    def mapping(self, value: object, where: str, required: tuple[str, ...] = (), optional: tuple[str, ...] | None = None) -> dict:
        value = self.typed(value, where, dict)
        if optional is not None:
            allowed = set(required) | set(optional)
            for key in value:
                if key not in allowed:
                    raise self.fail(where, f"unknown field {key!r} (allowed: {', '.join(sorted(allowed))})")
        for key in required:
            if key not in value:
                raise self.fail(where, f"missing required field {key!r}")
        return value


_KIND_NAMES = {dict: "a mapping", list: "a list", str: "a string", int: "an integer"}


def _index(r: _Reader, name: str, spec: object) -> Index:
    where = f"indices.{name}"
    if isinstance(spec, str):
        return Index(name, spec, None)
    spec = r.mapping(spec, where, required=("count",), optional=("active",))
    active = spec.get("active")
    return Index(name, str(spec["count"]), None if active is None else str(active))


def _tensor_rule(r: _Reader, where: str, spec: object, indices: dict[str, Index]) -> TensorRule:
    if isinstance(spec, dict) and "new" in spec:
        spec = r.mapping(spec, where, required=("new", "for_each", "shape", "init"), optional=("dtype",))
        rule = TensorRule(
            where=where,
            to=r.typed(spec["new"], f"{where}.new", str),
            for_each=r.typed(spec["for_each"], f"{where}.for_each", str),
            shape=tuple(r.typed(spec["shape"], f"{where}.shape", list)),
            init=spec["init"],
            dtype=spec.get("dtype"),
        )
        _check_init(r, f"{where}.init", rule.init)
        bound = set(placeholders(rule.for_each))
    else:
        spec = r.mapping(spec, where, required=("from", "to"), optional=())
        rule = TensorRule(where=where, source=r.typed(spec["from"], f"{where}.from", str),
                          to=r.typed(spec["to"], f"{where}.to", str))
        bound = set(placeholders(rule.source))
    for name in placeholders(rule.to):
        if name not in bound and name not in indices:
            target = "new" if rule.is_new else "to"
            raise r.fail(f"{where}.{target}", f"placeholder {{{name}}} is neither in the source pattern nor declared under indices")
    for name in bound:
        if not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise r.fail(where, f"placeholder {{{name}}} is not a plain name")
    return rule


#: `init:` of a new tensor: "router" (the router options chosen by the user), "zeros",
#: or a mapping {normal: std} / {uniform: bound}
INIT_NAMES = ("router", "zeros")
INIT_KINDS = ("normal", "uniform")


def _check_init(r: _Reader, where: str, init: object) -> None:
    if isinstance(init, str) and init in INIT_NAMES:
        return
    if isinstance(init, dict) and len(init) == 1 and next(iter(init)) in INIT_KINDS:
        return
    raise r.fail(where, f"expected one of {', '.join(INIT_NAMES)} or a mapping {{normal: std}} / {{uniform: bound}}, got {init!r}")
