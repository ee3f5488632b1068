"""Small, safe arithmetic for rule files: `num_experts`, `hidden_size // 4`, `"{num_experts}"` templates."""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Mapping

from .errors import SurgeryError

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
}
_COMPARE = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
    ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
}
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def evaluate(expression: object, names: Mapping[str, object], where: str) -> object:
    """Evaluate a number, or a string expression over `names` (arithmetic and comparisons only)."""
    if not isinstance(expression, str):
        return expression
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise SurgeryError(f"{where}: cannot parse expression {expression!r}") from None
    return _eval(tree.body, names, f"{where}: in {expression!r}")


def render(value: object, names: Mapping[str, object], where: str) -> object:
    """Fill `{expr}` placeholders of a config value; a string that is one placeholder keeps the value's type."""
    if isinstance(value, dict):
        return {k: render(v, names, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, names, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    whole = _PLACEHOLDER.fullmatch(value)
    if whole:
        return evaluate(whole.group(1), names, where)
    return _PLACEHOLDER.sub(lambda m: str(evaluate(m.group(1), names, where)), value)


def placeholders(template: str) -> list[str]:
    """Names of the `{placeholders}` of a tensor-name template, in order of appearance."""
    return _PLACEHOLDER.findall(template)


def _eval(node: ast.AST, names: Mapping[str, object], where: str) -> object:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise SurgeryError(f"{where}: unknown name {node.id!r} (not an option, config field or placeholder)")
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        value = _eval(node.operand, names, where)
        return -value if isinstance(node.op, ast.USub) else (not value if isinstance(node.op, ast.Not) else +value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        try:
            return _BINARY[type(node.op)](_eval(node.left, names, where), _eval(node.right, names, where))
        except (TypeError, ZeroDivisionError, OverflowError) as exc:
            raise SurgeryError(f"{where}: {exc}") from None
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
        left, right = _eval(node.left, names, where), _eval(node.comparators[0], names, where)
        try:
            return _COMPARE[type(node.ops[0])](left, right)
        except TypeError as exc:
            raise SurgeryError(f"{where}: {exc}") from None
    if isinstance(node, ast.BoolOp):
        values = [_eval(v, names, where) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    raise SurgeryError(f"{where}: only numbers, names, arithmetic and comparisons are allowed")
