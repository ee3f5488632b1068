"""Rule-file parameters: what a rule file declares (type, default, bounds, help) and the values a user gives.

    parameters:
      num_experts: {type: int, min: 1, max: 4096, help: Experts per MoE layer.}
      router_init: {type: str, default: normal, choices: [normal, zeros, uniform], help: How routers start.}

A parameter without a default is required. `min` and `max` may be expressions over the source config and the
other parameters (`max: num_experts`). Values come from the command line as text (`-p num_experts=8`) or from
Python as typed values; either way they are checked before any tensor data is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import SurgeryError
from .expressions import evaluate, parse

TYPES = ("int", "float", "bool", "str", "ints", "floats", "ranges")
#: names of the write options, which every rule file has: not parameter names
RESERVED = ("seed", "dtype", "max_shard_size")
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")
#: longest text value a parameter may take (values end up in templates and names)
MAX_TEXT = 200


@dataclass(frozen=True)
class Parameter:
    """A parameter a rule file declares."""

    name: str
    type: str
    help: str
    default: object = None
    required: bool = True
    minimum: object = None
    maximum: object = None
    choices: tuple[str, ...] = ()
    within: object = None


def parse_declaration(name: str, spec: object, fail, path: str) -> Parameter:
    """A `parameters:` entry of rule file `path`; `fail(where, problem)` builds the error."""
    where = f"parameters.{name}"
    if not name.isidentifier() or name in RESERVED:
        raise fail(where, f"a parameter name must be a plain identifier other than {', '.join(RESERVED)}")
    if not isinstance(spec, dict):
        raise fail(where, "expected a mapping with type, help and optionally default, min, max, choices")
    unknown = set(spec) - {"type", "help", "default", "min", "max", "choices", "within"}
    if unknown:
        raise fail(where, f"unknown field {sorted(unknown)[0]!r} (allowed: choices, default, help, max, min, type, within)")
    kind = spec.get("type")
    if kind not in TYPES:
        raise fail(f"{where}.type", f"expected one of {', '.join(TYPES)}, got {kind!r}")
    if not isinstance(spec.get("help"), str) or not spec["help"].strip():
        raise fail(f"{where}.help", "every parameter needs a help text")
    choices = spec.get("choices", [])
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or (choices and kind != "str"):
        raise fail(f"{where}.choices", "a list of strings, for a str parameter")
    for bound in ("min", "max"):
        if bound in spec:
            if kind not in ("int", "float", "ints", "floats"):
                raise fail(f"{where}.{bound}", "bounds apply to int, float, ints and floats parameters")
            if isinstance(spec[bound], str):
                parse(spec[bound], f"{path}: {where}.{bound}")
            elif not _is_number(spec[bound]):
                raise fail(f"{where}.{bound}", f"expected a number or an expression, got {spec[bound]!r}")
    if (kind == "ranges") != ("within" in spec):
        raise fail(f"{where}.within", "a ranges parameter needs within: (the count its ranges index), and only it")
    if kind == "ranges":
        parse(str(spec["within"]), f"{path}: {where}.within")
    parameter = Parameter(name, kind, spec["help"].strip(), spec.get("default"), "default" not in spec,
                          spec.get("min"), spec.get("max"), tuple(choices), spec.get("within"))
    if kind in ("int", "float") and isinstance(parameter.default, str):
        parse(parameter.default, f"{path}: {where}.default")
    elif not parameter.required and kind != "ranges":  # a ranges default is checked against `within` when used
        try:
            convert(parameter, parameter.default)
        except SurgeryError as exc:
            raise fail(f"{where}.default", str(exc).removeprefix(f"{name}: ")) from None
    return parameter


def resolve(declared: Mapping[str, Parameter], given: Mapping[str, object], names: Mapping[str, object],
            where: str, refused: Mapping[str, str] | None = None) -> dict[str, object]:
    """Every parameter's value: given (text or typed) or default; checked against type, choices and bounds.

    `names` (the source config) is what defaults and bounds may refer to, besides earlier parameters. `refused`
    maps parameters the rule file cannot honour to the reason, which the error then gives.
    """
    for name in given:
        if name not in declared and name in (refused or {}):
            raise SurgeryError(f"{where}: {name} cannot be used with this rule file: {refused[name]}")
    unknown = sorted(set(given) - set(declared))
    if unknown:
        known = ", ".join(declared) or "none"
        raise SurgeryError(f"{where}: no parameter {unknown[0]!r} (its parameters: {known})")
    values: dict[str, object] = {}
    scope = dict(names)
    for name, parameter in declared.items():
        if parameter.type == "ranges":
            value = _ranges(parameter, given.get(name, parameter.default), scope, where)
        elif name in given:
            value = convert(parameter, given[name])
        elif parameter.required:
            raise SurgeryError(f"{where}: parameter {name} is required ({parameter.help})")
        elif isinstance(parameter.default, str) and parameter.type in ("int", "float"):
            value = convert(parameter, evaluate(parameter.default, scope, f"{where}: parameters.{name}.default"))
        else:
            value = convert(parameter, parameter.default)
        values[name] = scope[name] = value
    for name, parameter in declared.items():
        _check_bounds(parameter, values[name], scope, where)
    return values


def _ranges(parameter: Parameter, value: object, scope: Mapping[str, object], where: str) -> list[int]:
    """Indices from text such as `0:24,8:32` or `1:32:2,40` (Python slices over range(within), end exclusive;
    repeats kept, in order), or from a list of integers. Past the end or empty is an error, never clipped."""
    if value is None:
        raise SurgeryError(f"{where}: parameter {parameter.name} is required ({parameter.help})")
    within = evaluate(parameter.within, scope, f"{where}: parameters.{parameter.name}.within")
    if not _is_int(within) or within < 0:
        raise SurgeryError(f"{where}: parameters.{parameter.name}.within gives {within!r}, not a count")
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, str):
        items = []
        for part in (p.strip() for p in value.split(",")):
            items += _range_part(parameter.name, part, within)
    else:
        raise SurgeryError(f"{parameter.name}: expected {_KIND_TEXT['ranges']}, got {value!r}")
    bad = [i for i in items if not _is_int(i) or not 0 <= i < within]
    if bad:
        raise SurgeryError(f"{parameter.name}: {bad[0]!r} is not from 0 to {within - 1} (nothing is clipped)")
    return items


def _range_part(name: str, part: str, within: int) -> list[int]:
    """One comma-separated part: `7`, `a:b` or `a:b:step` (a, b or step may be left out, as in Python)."""
    pieces = part.split(":")
    try:
        if len(pieces) == 1:
            return [int(pieces[0])]
        if len(pieces) > 3:
            raise ValueError
        start, stop, step = (int(p) if p.strip() else None for p in (pieces + [""])[:3])
    except ValueError:
        raise SurgeryError(f"{name}: {part!r} is not an index or a range a:b[:step]") from None
    start, stop, step = 0 if start is None else start, within if stop is None else stop, 1 if step is None else step
    if step < 1:
        raise SurgeryError(f"{name}: range {part!r} has step {step}; ranges count up, with a step of 1 or more")
    if start < 0 or stop > within:
        raise SurgeryError(f"{name}: range {part!r} goes outside 0:{within} (nothing is clipped)")
    if start >= stop:
        raise SurgeryError(f"{name}: range {part!r} is empty")
    return list(range(start, stop, step))


def convert(parameter: Parameter, value: object) -> object:
    """A value (text from the command line, or a Python value) as the parameter's type."""
    name, kind = parameter.name, parameter.type
    try:
        if isinstance(value, str):
            value = _from_text(kind, value.strip())
        if kind == "int" and _is_int(value):
            return value
        if kind == "float" and _is_number(value) and math.isfinite(value):
            return float(value)
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "str" and isinstance(value, str):
            if parameter.choices and value not in parameter.choices:
                raise ValueError(f"expected one of {', '.join(parameter.choices)}")
            if len(value) > MAX_TEXT or not value.isprintable():
                raise ValueError("expected a short printable text")
            return value
        if kind == "ints" and isinstance(value, (list, tuple)) and all(_is_int(v) for v in value):
            return list(value)
        if kind == "floats" and isinstance(value, (list, tuple)) and all(
                _is_number(v) and math.isfinite(v) for v in value):
            return [float(v) for v in value]
    except ValueError as exc:
        raise SurgeryError(f"{name}: {exc}, got {value!r}") from None
    raise SurgeryError(f"{name}: expected {_KIND_TEXT[kind]}, got {value!r}")


def _from_text(kind: str, text: str) -> object:
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "bool":
        lowered = text.lower()
        if lowered in _TRUE or lowered in _FALSE:
            return lowered in _TRUE
        raise ValueError("expected true or false")
    if kind == "ints":
        return [int(part) for part in text.split(",") if part.strip()]
    if kind == "floats":
        return [float(part) for part in text.split(",") if part.strip()]
    return text


def _check_bounds(parameter: Parameter, value: object, scope: Mapping[str, object], where: str) -> None:
    items = value if isinstance(value, list) else [value]
    for bound, ok in ((parameter.minimum, lambda v, b: v >= b), (parameter.maximum, lambda v, b: v <= b)):
        if bound is None:
            continue
        limit = evaluate(bound, scope, f"{where}: parameters.{parameter.name}")
        if not _is_number(limit):
            raise SurgeryError(f"{where}: parameters.{parameter.name}: bound {bound!r} is not a number")
        for item in items:
            if not ok(item, limit):
                low = parameter.minimum if parameter.minimum is not None else "-inf"
                high = parameter.maximum if parameter.maximum is not None else "inf"
                raise SurgeryError(
                    f"{parameter.name} must be from {_bound_text(low, scope)} to {_bound_text(high, scope)}, "
                    f"got {value}"
                )


def _bound_text(bound: object, scope: Mapping[str, object]) -> str:
    """A bound as written, with its value when it is an expression (`num_experts (8)`)."""
    if isinstance(bound, str):
        try:
            return f"{bound} ({evaluate(bound, scope, 'bound')})"
        except SurgeryError:
            return bound
    return str(bound)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_KIND_TEXT = {
    "int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a text",
    "ints": "a comma-separated list of integers",
    "floats": "a comma-separated list of finite numbers",
    "ranges": "indices and ranges such as 0:24,8:32 or 1:32:2",
}
