"""Small, safe expressions for rule files: `num_experts`, `hidden_size // 4`, `layer in moe_layers`, templates.

A rule file is untrusted input, so expressions are evaluated by walking a size-capped syntax tree: numbers, names
(options, config fields, placeholders; `text_config.hidden_size` for nested configs), arithmetic on numbers only,
comparisons, `and`/`or`/`not`, `a if c else b`, list literals, indexing, and a few pure functions. Nothing can
build an unbounded value: strings and lists are never repeated or %-formatted, integers stay below 2**64.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Mapping

from .errors import SurgeryError

#: longest expression text, and most syntax-tree nodes, that a rule file may use
MAX_LENGTH = 2000
MAX_NODES = 256
#: largest integer magnitude an expression may produce
MAX_INT = 2**64
#: longest list an expression may build (range() is lazy and may be longer)
MAX_LIST = 1_000_000
#: longest list a template may format into a string
MAX_FORMATTED = 1000

_ARITHMETIC = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
}
_COMPARE = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}


def _range(*args: object) -> range:
    if not all(_is_int(a) for a in args) or not 1 <= len(args) <= 3:
        raise TypeError("range() takes one to three integers")
    return range(*args)  # type: ignore[arg-type]


def _numbers(function, lists: bool = False):
    """`function` on numbers (or, with `lists`, on one list of numbers of bounded length)."""
    def call(*args: object) -> object:
        values = args
        if lists and len(args) == 1 and isinstance(args[0], (list, tuple, range)):
            if len(args[0]) > MAX_LIST:
                raise ValueError(f"a list longer than {MAX_LIST:,} elements")
            values = tuple(args[0])
        if not values or not all(_is_number(a) for a in values):
            raise TypeError(f"{function.__name__}() takes numbers" + (" or a list of numbers" if lists else ""))
        return function(*args)
    return call


def _sequence(function):
    """`function` on one list of bounded length."""
    def call(*args: object) -> object:
        if len(args) != 1 or not isinstance(args[0], (list, tuple, range)):
            raise TypeError(f"{function.__name__}() takes one list")
        if len(args[0]) > MAX_LIST:
            raise ValueError(f"a list longer than {MAX_LIST:,} elements")
        return function(args[0])
    return call


def _without(*args: object) -> list:
    """The elements of the first list that are not in the second, in order."""
    if len(args) != 2 or not all(isinstance(a, (list, tuple, range)) for a in args):
        raise TypeError("without() takes two lists")
    if len(args[0]) > MAX_LIST:
        raise ValueError(f"a list longer than {MAX_LIST:,} elements")
    exclude = set(args[1]) if len(args[1]) <= MAX_LIST else args[1]
    return [item for item in args[0] if item not in exclude]


def _unique(*args: object) -> list:
    """The distinct elements of a list, in order of first appearance."""
    items = _one_list("unique", args)
    return list(dict.fromkeys(items))


def _positions(*args: object) -> list:
    """The indices at which a list holds a value."""
    if len(args) != 2:
        raise TypeError("positions() takes a list and a value")
    return [i for i, item in enumerate(_one_list("positions", args[:1])) if item == args[1]]


def _pick(*args: object) -> list:
    """The elements of a list at the given indices: pick(layer_types, [0, 0, 1]) (repeats allowed)."""
    if len(args) != 2:
        raise TypeError("pick() takes a list and a list of indices")
    items, indices = _one_list("pick", args[:1]), _one_list("pick", args[1:])
    if not all(_is_int(i) and -len(items) <= i < len(items) for i in indices):
        raise ValueError("pick(): an index is out of range")
    return [items[i] for i in indices]


def _one_list(name: str, args: tuple) -> list | tuple | range:
    if len(args) != 1 or not isinstance(args[0], (list, tuple, range)):
        raise TypeError(f"{name}() takes a list")
    if len(args[0]) > MAX_LIST:
        raise ValueError(f"a list longer than {MAX_LIST:,} elements")
    return args[0]


FUNCTIONS = {
    "sqrt": _numbers(math.sqrt), "floor": _numbers(math.floor), "ceil": _numbers(math.ceil), "abs": _numbers(abs),
    "int": _numbers(int), "float": _numbers(float), "min": _numbers(min, lists=True),
    "max": _numbers(max, lists=True), "len": _sequence(len), "sorted": _sequence(sorted), "range": _range,
    "without": _without, "unique": _unique, "positions": _positions, "pick": _pick,
}
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def parse(expression: str, where: str) -> ast.expr:
    """Parse and check an expression's size and syntax (done once, when a rule file loads)."""
    text = expression.strip()
    if len(text) > MAX_LENGTH:
        raise SurgeryError(f"{where}: expression is longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise SurgeryError(f"{where}: cannot parse expression {_short(text)}") from None
    except (RecursionError, MemoryError, ValueError):
        raise SurgeryError(f"{where}: expression {_short(text)} is nested too deeply") from None
    nodes = 0
    for node in ast.walk(tree):
        nodes += 1
        if nodes > MAX_NODES:
            raise SurgeryError(f"{where}: expression {_short(text)} has more than {MAX_NODES} parts")
        if not isinstance(node, _ALLOWED):
            raise SurgeryError(
                f"{where}: {_short(text)}: only numbers, names, arithmetic, comparisons, lists and "
                f"{', '.join(sorted(FUNCTIONS))}() are allowed"
            )
    return tree.body


def evaluate(expression: object, names: Mapping[str, object], where: str) -> object:
    """Evaluate a number or a string expression over `names`; a non-string value is returned as is."""
    if not isinstance(expression, str):
        return expression
    evaluator = _Evaluator(names, f"{where}: in {_short(expression.strip())}")
    try:
        return evaluator.eval(parse(expression, where))
    except RecursionError:
        raise evaluator.fail("nested too deeply") from None


def render(value: object, names: Mapping[str, object], where: str) -> object:
    """Fill `{expr}` placeholders of a (nested) config value; a string that is one placeholder keeps the value's
    type (`"{num_experts}"` -> 4), placeholders inside longer strings are formatted in."""
    if isinstance(value, dict):
        return {k: render(v, names, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, names, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    whole = _PLACEHOLDER.fullmatch(value)
    if whole:
        return evaluate(whole.group(1), names, where)
    return _PLACEHOLDER.sub(lambda m: _text(evaluate(m.group(1), names, where), where), value)


def placeholders(template: str) -> list[str]:
    """The `{...}` contents of a template, in order of appearance."""
    return _PLACEHOLDER.findall(template)


def _text(value: object, where: str) -> str:
    if isinstance(value, dict) or isinstance(value, (list, tuple, range)) and len(value) > MAX_FORMATTED:
        raise SurgeryError(f"{where}: only numbers, texts and short lists can be formatted into a string")
    return str(list(value) if isinstance(value, (tuple, range)) else value)


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_ALLOWED = (
    ast.Expression, ast.Constant, ast.Name, ast.Load, ast.Attribute, ast.Subscript, ast.Slice, ast.Call,
    ast.UnaryOp, ast.USub, ast.UAdd, ast.Not, ast.BinOp, ast.BoolOp, ast.And, ast.Or, ast.Compare, ast.IfExp,
    ast.List, ast.Tuple, *_ARITHMETIC, *_COMPARE,
)


class _Evaluator:
    def __init__(self, names: Mapping[str, object], where: str):
        self.names, self.where = names, where

    def fail(self, problem: str) -> SurgeryError:
        return SurgeryError(f"{self.where}: {problem}")

    def eval(self, node: ast.AST) -> object:
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            raise self.fail(f"{type(node).__name__} is not allowed")
        return method(node)

    def _Constant(self, node: ast.Constant) -> object:
        if not isinstance(node.value, (int, float, str, bool, type(None))):
            raise self.fail(f"constant {node.value!r} is not allowed")
        return self._bounded(node.value)

    def _Name(self, node: ast.Name) -> object:
        if node.id in FUNCTIONS:
            raise self.fail(f"{node.id} is a function: call it")
        if node.id not in self.names:
            raise self.fail(f"unknown name {node.id!r} (not a parameter, config field or placeholder)")
        return self.names[node.id]

    def _Attribute(self, node: ast.Attribute) -> object:
        parent = self.eval(node.value)
        if not isinstance(parent, dict) or node.attr not in parent:
            raise self.fail(f"no field {node.attr!r} there")
        return parent[node.attr]

    def _Subscript(self, node: ast.Subscript) -> object:
        container, key = self.eval(node.value), node.slice
        if isinstance(key, ast.Slice):
            parts = [None if p is None else self.eval(p) for p in (key.lower, key.upper, key.step)]
            if not isinstance(container, (list, tuple, range)) or not all(p is None or _is_int(p) for p in parts):
                raise self.fail("only lists can be sliced, by integers")
            return container[slice(*parts)]
        index = self.eval(key)
        try:
            if isinstance(container, dict) and isinstance(index, str):
                return container[index]
            if isinstance(container, (list, tuple, range)) and _is_int(index):
                return container[index]
        except (KeyError, IndexError):
            raise self.fail(f"index {index!r} is out of range") from None
        raise self.fail("only lists (by integer) and mappings (by string) can be indexed")

    def _Call(self, node: ast.Call) -> object:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
            raise self.fail(f"only {', '.join(sorted(FUNCTIONS))}() can be called, with plain arguments")
        args = [self.eval(a) for a in node.args]
        try:
            return self._bounded(FUNCTIONS[node.func.id](*args))
        except (TypeError, ValueError, OverflowError) as exc:
            raise self.fail(f"{node.func.id}(): {exc}") from None

    def _UnaryOp(self, node: ast.UnaryOp) -> object:
        value = self.eval(node.operand)
        if isinstance(node.op, ast.Not):
            return not value
        if not _is_number(value):
            raise self.fail("- and + apply to numbers only")
        return -value if isinstance(node.op, ast.USub) else value

    def _BinOp(self, node: ast.BinOp) -> object:
        left, right = self.eval(node.left), self.eval(node.right)
        if not (_is_number(left) and _is_number(right)):
            raise self.fail("arithmetic applies to numbers only")
        try:
            return self._bounded(_ARITHMETIC[type(node.op)](left, right))
        except (ZeroDivisionError, OverflowError) as exc:
            raise self.fail(str(exc)) from None

    def _BoolOp(self, node: ast.BoolOp) -> object:
        if isinstance(node.op, ast.And):
            return all(self.eval(v) for v in node.values)
        return any(self.eval(v) for v in node.values)

    def _Compare(self, node: ast.Compare) -> object:
        left = self.eval(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = self.eval(comparator)
            try:
                if not _COMPARE[type(op)](left, right):
                    return False
            except TypeError as exc:
                raise self.fail(str(exc)) from None
            left = right
        return True

    def _IfExp(self, node: ast.IfExp) -> object:
        return self.eval(node.body) if self.eval(node.test) else self.eval(node.orelse)

    def _List(self, node: ast.List) -> list:
        return [self.eval(e) for e in node.elts]

    _Tuple = _List

    def _bounded(self, value: object) -> object:
        if _is_int(value) and abs(value) >= MAX_INT:
            raise self.fail(f"integer {str(value)[:20]}... is larger than 2**64")
        if isinstance(value, list) and len(value) > MAX_LIST:
            raise self.fail(f"a list longer than {MAX_LIST:,} elements")
        return value
