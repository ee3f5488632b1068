"""Rule files: the YAML that says what each output tensor is and how the config changes.

The schema is documented in docs/rules.md. A rule file is untrusted input: loading refuses YAML aliases and
duplicate keys, validates every field, parses every expression (size-capped) and names the field in errors.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import dtypes
from .errors import SurgeryError
from .expressions import parse, placeholders, render
from .params import Parameter, parse_declaration

_PACKAGE = Path(__file__).resolve().parent
#: built-in rule files: inside the wheel at surgery/rules, in a source checkout at the repo's rules/
BUILTIN_DIRS = (_PACKAGE / "rules", _PACKAGE.parent / "rules")
#: kinds of new tensors
INITS = ("zeros", "normal", "uniform", "orthogonal")
#: a placeholder that captures a number (`{layer}`), or any text (`{rest:*}`)
_CAPTURE = re.compile(r"^([A-Za-z_]\w*)(:\*)?$")


@dataclass(frozen=True)
class Index:
    """A placeholder that fans one tensor out into several, e.g. `expert` over range(num_experts); or over the
    list an expression gives (`values`), which may depend on the placeholders a source pattern captured."""

    name: str
    count: str | None
    active: str | None
    values: str | None = None


@dataclass(frozen=True)
class Spec:
    """A node of a value tree as written: an op (or `tensor` / `init` leaf), its children and its arguments."""

    op: str
    where: str
    children: tuple[Spec, ...] = ()
    args: dict = field(default_factory=dict)

    def leaves(self) -> list[Spec]:
        """Source-tensor leaves in tree order."""
        if self.op == "tensor":
            return [self]
        return [leaf for child in self.children for leaf in child.leaves()]

    def bound(self) -> set[str]:
        """Index names that `stack` and `mean` nodes bind (`over:`) anywhere in the tree."""
        names = {self.args["over"]} if "over" in self.args else set()
        for child in self.children:
            names |= child.bound()
        return names


@dataclass(frozen=True)
class TensorRule:
    """An output (or, with indices, several) named by the `to` template, whose value is `value`.

    `for_each` (a source-name template) says which source tensors drive the rule: one output per match (and per
    index value); without it, the first source tensor of the value drives it. `when` filters, `dtype` fixes the
    stored dtype, `optional` allows no match.
    """

    where: str
    to: str
    value: Spec
    for_each: str
    when: str | None = None
    dtype: str | None = None
    optional: bool = False


@dataclass(frozen=True)
class Exactness:
    """When the output computes the source model's function at init: `because`, unless one of `unless` holds."""

    because: str
    unless: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class NumericCheck:
    """Which module of the source and of the output compute the same function, per layer: prefixes of their
    parameter names (`model.layers.{layer}.mlp`), for `surgery verify --numeric`; `target` may list several
    modules whose outputs add up (an MoE block beside a shared MLP); `config` edits the output's config for a
    one-layer model of layer `{layer}` (e.g. whether that layer is MoE)."""

    source: str
    target: tuple[str, ...]
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Auxiliary:
    """A further checkpoint a rule file reads tensors from by name, which need not be the base's architecture (new
    router rows, the MLP of a dense model): not checked against the base, and not among `sources`."""

    name: str
    help: str
    model_types: tuple[str, ...] = ()
    #: the float dtype whoever makes this source should write it in (surgery mergekit-moe's routers); None: the output's
    dtype: str | None = None


@dataclass(frozen=True)
class RuleFile:
    name: str
    description: str
    path: str
    sha256: str
    source_model_types: tuple[str, ...]
    forbid: dict = field(default_factory=dict)
    auxiliary: dict[str, Auxiliary] = field(default_factory=dict)
    target: dict = field(default_factory=dict)
    parameters: dict[str, Parameter] = field(default_factory=dict)
    indices: dict[str, Index] = field(default_factory=dict)
    config_delete: tuple[str, ...] = ()
    config_rename: dict[str, str] = field(default_factory=dict)
    config_set: dict = field(default_factory=dict)
    config_relayer: dict = field(default_factory=dict)
    let: dict[str, str] = field(default_factory=dict)
    drop: tuple[str, ...] = ()
    exact: Exactness | None = None
    require: tuple[tuple[str, str], ...] = ()
    refuses: dict[str, str] = field(default_factory=dict)
    numeric_check: NumericCheck | None = None
    tensors: tuple[TensorRule, ...] = ()


def target_model_types(rules: RuleFile) -> list[str]:
    """The output's model_type for each of the source model_types, without repeats (a templated target such as
    `{model_type}` rendered for each); the template itself where it needs more than the source's model_type."""
    template, out = rules.target["model_type"], []
    for model_type in rules.source_model_types:
        try:
            rendered = str(render(template, {"model_type": model_type}, "target.model_type"))
        except SurgeryError:
            return [template]
        out += [rendered] if rendered not in out else []
    return out


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
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)


def parse_rules(doc: object, path: str, sha256: str = "") -> RuleFile:
    """Validate a parsed rule document; errors name the file and the field."""
    r = _Reader(path)
    top = r.mapping(doc, "", required=("name", "source", "target", "tensors"),
                    optional=("description", "parameters", "let", "indices", "config", "drop", "exact", "require",
                              "refuses", "numeric_check"))
    source = r.mapping(top["source"], "source", required=("model_type",), optional=("forbid", "auxiliary"))
    target = r.mapping(top["target"], "target", required=("model_type",), optional=("architectures",))
    parameters = {
        name: parse_declaration(str(name), spec, r.fail, path)
        for name, spec in r.mapping(top.get("parameters", {}), "parameters").items()
    }
    indices = {name: _index(r, name, spec) for name, spec in r.mapping(top.get("indices", {}), "indices").items()}
    config = r.mapping(top.get("config", {}), "config", optional=("delete", "rename", "set", "relayer"))
    drop = tuple(r.strings(top.get("drop", []), "drop"))
    for i, template in enumerate(drop):
        compile_pattern(template, r, f"drop[{i}]")
    tensors = r.typed(top["tensors"], "tensors", list)
    rules = RuleFile(
        name=r.typed(top["name"], "name", str),
        description=r.typed(top.get("description", ""), "description", str),
        path=path,
        sha256=sha256,
        source_model_types=tuple(r.strings(source["model_type"], "source.model_type")),
        forbid=r.mapping(source.get("forbid", {}), "source.forbid"),
        auxiliary={str(name): _auxiliary(r, str(name), spec)
                   for name, spec in r.mapping(source.get("auxiliary", {}), "source.auxiliary").items()},
        target={"model_type": r.typed(target["model_type"], "target.model_type", str),
                "architectures": r.strings(target.get("architectures", []), "target.architectures")},
        parameters=parameters,
        indices=indices,
        config_delete=tuple(r.strings(config.get("delete", []), "config.delete")),
        config_rename={k: r.typed(v, f"config.rename.{k}", str)
                       for k, v in r.mapping(config.get("rename", {}), "config.rename").items()},
        config_set=r.mapping(config.get("set", {}), "config.set"),
        config_relayer=_relayer(r, config.get("relayer")),
        let={str(k): str(r.expression(v, f"let.{k}")) for k, v in r.mapping(top.get("let", {}), "let").items()},
        drop=drop,
        exact=_exactness(r, top["exact"]) if "exact" in top else None,
        require=_requirements(r, top.get("require", [])),
        refuses={str(k): r.typed(v, f"refuses.{k}", str) for k, v in r.mapping(top.get("refuses", {}), "refuses").items()},
        numeric_check=_numeric_check(r, top["numeric_check"]) if "numeric_check" in top else None,
        tensors=tuple(_tensor_rule(r, f"tensors[{i}]", spec, indices) for i, spec in enumerate(tensors)),
    )
    if not rules.tensors:
        raise SurgeryError(f"{path}: tensors: needs at least one rule")
    return rules


def compile_pattern(template: str, r: _Reader | None = None, where: str = "") -> re.Pattern[str]:
    """A source-name template as a regex: `{name}` captures a number (the same one where repeated), `{name:*}` any
    text."""
    out, seen = [], set()
    for literal, inner in re.findall(r"([^{}]*)(?:\{([^{}]*)\})?", template):
        out.append(re.escape(literal))
        if not inner:
            continue
        match = _CAPTURE.match(inner)
        if match is None:
            problem = f"placeholder {{{inner}}} in a source pattern must be a plain name (or name:*)"
            raise r.fail(where, problem) if r else SurgeryError(problem)
        name, anything = match.groups()
        out.append(f"(?P={name})" if name in seen else f"(?P<{name}>.+)" if anything else f"(?P<{name}>\\d+)")
        seen.add(name)
    return re.compile("".join(out))


def captured_names(template: str) -> list[str]:
    """The names a source pattern captures, in order."""
    return [p.split(":")[0] for p in placeholders(template)]


class _Reader:
    """Type checks that name the offending field."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, problem: str) -> SurgeryError:
        return SurgeryError(f"{self.path}: {where or 'top level'}: {problem}")

    def typed(self, value: object, where: str, kind: type | tuple[type, ...]) -> object:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            expected = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
            raise self.fail(where, f"expected {expected}, got {value!r}")
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

    def expression(self, value: object, where: str) -> object:
        """A number, a list of integers, or an expression string checked for syntax and size now."""
        self.typed(value, where, (int, float, str, list))
        if isinstance(value, str):
            parse(value, f"{self.path}: {where}")
        if isinstance(value, list):
            for i, item in enumerate(value):
                self.typed(item, f"{where}[{i}]", int)
        return value

    def template(self, value: object, where: str) -> str:
        """A name template whose `{...}` placeholders are checked as expressions now."""
        text = self.typed(value, where, str)
        for inner in placeholders(text):
            if not _CAPTURE.match(inner):
                parse(inner, f"{self.path}: {where}")
        return text


_KIND_NAMES = {dict: "a mapping", list: "a list", str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _index(r: _Reader, name: str, spec: object) -> Index:
    where = f"indices.{name}"
    if isinstance(spec, (str, int)):
        return Index(name, str(r.expression(spec, where)), None)
    spec = r.mapping(spec, where, optional=("count", "active", "values"))
    if ("count" in spec) == ("values" in spec):
        raise r.fail(where, "give either count (values 0..count-1) or values (an expression giving the list)")
    active = spec.get("active")
    expression = {k: None if spec.get(k) is None else str(r.expression(spec[k], f"{where}.{k}"))
                  for k in ("count", "active", "values")}
    if active is not None and expression["values"] is not None:
        raise r.fail(where, "active goes with count, not values")
    return Index(name, expression["count"], expression["active"], expression["values"])


def _auxiliary(r: _Reader, name: str, spec: object) -> Auxiliary:
    """`source.auxiliary.NAME: {help: TEXT, model_type: [..], dtype: D}`: a source read by name only."""
    where = f"source.auxiliary.{name}"
    if not name.isidentifier() or name == "base":
        raise r.fail(where, "a source name must be a plain identifier other than base")
    spec = r.mapping(spec, where, required=("help",), optional=("model_type", "dtype"))
    return Auxiliary(name, r.typed(spec["help"], f"{where}.help", str),
                     tuple(r.strings(spec.get("model_type", []), f"{where}.model_type")),
                     None if spec.get("dtype") is None else _dtype(r, spec["dtype"], f"{where}.dtype"))


def _exactness(r: _Reader, spec: object) -> Exactness:
    spec = r.mapping(spec, "exact", required=("because",), optional=("unless",))
    unless = []
    for i, item in enumerate(r.typed(spec.get("unless", []), "exact.unless", list)):
        item = r.mapping(item, f"exact.unless[{i}]", required=("when", "why"), optional=())
        unless.append((str(r.expression(item["when"], f"exact.unless[{i}].when")),
                       r.typed(item["why"], f"exact.unless[{i}].why", str)))
    return Exactness(r.typed(spec["because"], "exact.because", str), tuple(unless))


def _relayer(r: _Reader, spec: object) -> dict:
    """`config.relayer: {layers: EXPR, index_lists: [field, ...]}`: output layer j is source layer layers[j]."""
    if spec is None:
        return {}
    spec = r.mapping(spec, "config.relayer", required=("layers",), optional=("index_lists",))
    return {"layers": str(r.expression(spec["layers"], "config.relayer.layers")),
            "index_lists": r.strings(spec.get("index_lists", []), "config.relayer.index_lists")}


def _requirements(r: _Reader, spec: object) -> tuple[tuple[str, str], ...]:
    """`require: [{that: EXPR, else: "message {with} {placeholders}"}]`: conditions on parameters and config."""
    out = []
    for i, item in enumerate(r.typed(spec, "require", list)):
        item = r.mapping(item, f"require[{i}]", required=("that", "else"), optional=())
        out.append((str(r.expression(item["that"], f"require[{i}].that")), r.template(item["else"], f"require[{i}].else")))
    return tuple(out)


def _numeric_check(r: _Reader, spec: object) -> NumericCheck:
    spec = r.mapping(spec, "numeric_check", required=("source", "target"), optional=("config",))
    targets = spec["target"] if isinstance(spec["target"], list) else [spec["target"]]
    if not targets:
        raise r.fail("numeric_check.target", "a module prefix or a non-empty list of them")
    return NumericCheck(r.template(spec["source"], "numeric_check.source"),
                        tuple(r.template(t, f"numeric_check.target[{i}]") for i, t in enumerate(targets)),
                        r.mapping(spec.get("config", {}), "numeric_check.config"))


def _tensor_rule(r: _Reader, where: str, spec: object, indices: dict[str, Index]) -> TensorRule:
    common = ("when", "dtype", "optional")
    if isinstance(spec, dict) and "new" in spec:  # the first schema's form of a new tensor
        spec = r.mapping(spec, where, required=("new", "for_each", "shape", "init"), optional=common)
        to, value = r.template(spec["new"], f"{where}.new"), _legacy_init(r, where, spec)
        for_each = r.typed(spec["for_each"], f"{where}.for_each", str)
    elif isinstance(spec, dict) and "from" in spec:
        spec = r.mapping(spec, where, required=("from", "to"), optional=common)
        for_each = r.typed(spec["from"], f"{where}.from", str)
        to, value = r.template(spec["to"], f"{where}.to"), Spec("tensor", f"{where}.from", args={"name": for_each})
    else:
        spec = r.mapping(spec, where, required=("to", "value"), optional=("for_each", *common))
        to, value = r.template(spec["to"], f"{where}.to"), _value(r, spec["value"], f"{where}.value", indices)
        leaves = value.leaves()
        if "for_each" not in spec and not leaves:
            raise r.fail(where, "a value made from no source tensor needs for_each: (a source pattern to repeat it for)")
        for_each = r.typed(spec["for_each"], f"{where}.for_each", str) if "for_each" in spec else leaves[0].args["name"]
    compile_pattern(for_each, r, f"{where}.for_each" if "for_each" in spec else where)
    if "when" in spec:
        r.expression(spec["when"], f"{where}.when")
    if spec.get("dtype") is not None:
        _dtype(r, spec["dtype"], f"{where}.dtype")
    rule = TensorRule(where, to, value, for_each, spec.get("when"), spec.get("dtype"),
                      bool(r.typed(spec.get("optional", False), f"{where}.optional", bool)))
    bound = set(captured_names(for_each))
    for inner in placeholders(to):
        if _CAPTURE.match(inner) and inner not in bound and inner not in indices:
            raise r.fail(f"{where}.to", f"placeholder {{{inner}}} is neither in the source pattern nor declared under indices")
    for name in value.bound():
        if name not in indices:
            raise r.fail(where, f"over: {name!r} is not declared under indices")
    return rule


def _legacy_init(r: _Reader, where: str, spec: dict) -> Spec:
    """`init: zeros | {normal: STD} | {uniform: BOUND}` of a `new:` rule, as an init leaf."""
    init, shape = spec["init"], r.typed(spec["shape"], f"{where}.shape", list)
    args = {"shape": [r.expression(d, f"{where}.shape[{i}]") for i, d in enumerate(shape)], "dtype": spec.get("dtype")}
    if init == "zeros":
        return Spec("init", f"{where}.init", args={**args, "kind": "zeros"})
    if isinstance(init, dict) and len(init) == 1 and next(iter(init)) in ("normal", "uniform"):
        kind, scale = next(iter(init.items()))
        scale_field = "std" if kind == "normal" else "bound"
        return Spec("init", f"{where}.init", args={**args, "kind": kind, scale_field: r.expression(scale, f"{where}.init.{kind}")})
    raise r.fail(f"{where}.init", f"expected zeros or a mapping {{normal: STD}} / {{uniform: BOUND}}, got {init!r} "
                                  "(for a choice made by parameters, write `to:` with `value: {init: ...}`)")


#: every op of a value tree: (field holding the child or children, required fields, optional fields)
OPS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "slice": ("one", ("dim",), ("start", "stop", "step", "part", "parts")),
    "take": ("one", ("dim", "index"), ()),
    "repeat": ("one", ("dim", "times"), ()),
    "concat": ("list", ("dim",), ("over",)),
    "stack": ("one", ("over",), ()),
    "scale": ("one", ("by",), ()),
    "add": ("list", (), ()),
    "mean": ("one", ("over",), ()),
    "cast": ("one", ("dtype",), ()),
    "noise": ("one", ("std",), ("relative", "key")),
    "reinit": ("one", ("dim", "fraction", "key"), ()),
}
_INIT_FIELDS = ("shape", "std", "bound", "key", "dtype")


def _value(r: _Reader, spec: object, where: str, indices: dict[str, Index]) -> Spec:
    """A value tree: a source-name template, {tensor: T}, {init: ...}, or {OP: child(ren), field: ...}."""
    if isinstance(spec, str):
        return Spec("tensor", where, args={"name": r.template(spec, where)})
    spec = r.typed(spec, where, dict)
    if "tensor" in spec:
        r.mapping(spec, where, required=("tensor",), optional=("source",))
        args = {"name": r.template(spec["tensor"], f"{where}.tensor")}
        if "source" in spec:
            args["source"] = r.template(spec["source"], f"{where}.source")
        return Spec("tensor", where, args=args)
    if "init" in spec:
        spec = r.mapping(spec, where, required=("init", "shape"), optional=_INIT_FIELDS)
        shape = r.typed(spec["shape"], f"{where}.shape", list)
        args = {"kind": r.template(spec["init"], f"{where}.init"),
                "shape": [r.expression(d, f"{where}.shape[{i}]") for i, d in enumerate(shape)]}
        for name in ("std", "bound"):
            if name in spec:
                args[name] = r.expression(spec[name], f"{where}.{name}")
        if "key" in spec:
            args["key"] = r.template(spec["key"], f"{where}.key")
        if spec.get("dtype") is not None:
            args["dtype"] = _dtype(r, spec["dtype"], f"{where}.dtype")
        return Spec("init", where, args=args)
    ops = [key for key in spec if key in OPS]
    if len(ops) != 1:
        raise r.fail(where, f"expected a source tensor name, {{tensor: ...}}, {{init: ...}} or one op of "
                            f"{', '.join(OPS)}; got fields {', '.join(map(str, spec)) or 'none'}")
    op = ops[0]
    arity, required, optional = OPS[op]
    r.mapping(spec, where, required=(op, *required), optional=optional)
    if arity == "list" and "over" not in spec:
        items = r.typed(spec[op], f"{where}.{op}", list)
        if not items:
            raise r.fail(f"{where}.{op}", "needs at least one value")
        children = tuple(_value(r, item, f"{where}.{op}[{i}]", indices) for i, item in enumerate(items))
    else:
        children = (_value(r, spec[op], f"{where}.{op}", indices),)
    args = {}
    for name in (*required, *optional):
        if name not in spec:
            continue
        at = f"{where}.{name}"
        if name == "over":
            args[name] = r.typed(spec[name], at, str)
        elif name == "key":
            args[name] = r.template(spec[name], at)
        elif name == "dtype":
            args[name] = _dtype(r, spec[name], at)
        elif name == "relative":
            args[name] = r.typed(spec[name], at, bool)
        else:
            args[name] = r.expression(spec[name], at)
    if op == "slice" and ("part" in args) != ("parts" in args):
        raise r.fail(where, "part and parts go together")
    if op == "slice" and "part" in args and any(k in args for k in ("start", "stop", "step")):
        raise r.fail(where, "use either part/parts or start/stop/step")
    return Spec(op, where, children, args)


def _dtype(r: _Reader, value: object, where: str) -> str:
    try:
        return dtypes.parse_float_dtype(r.typed(value, where, str))
    except SurgeryError as exc:
        raise r.fail(where, str(exc)) from None
