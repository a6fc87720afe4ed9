"""Derived parameters: `lora_alpha: {expr: "2 * lora_rank"}`, evaluated without Python eval.

The expression is parsed with `ast` and walked by a tiny interpreter that knows numbers,
parameter names, + - * / // % ** (and unary + -), and the functions min, max, round, int,
float. Any other node (attribute access, subscripts, lambdas, comprehensions, strings, ...)
is refused when the sweep is parsed, so a sweep can never make the operator run code.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "min": min,
    "max": max,
    "round": round,
    "int": int,
    "float": float,
}
# 2 ** 10**9 would hang the operator; no hyperparameter needs exponents this large.
MAX_EXPONENT = 64


class ExprError(ValueError):
    """An expression that cannot be used; the message names the parameter."""


def _parse(name: str, source: str) -> ast.expr:
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as error:
        raise ExprError(
            f"parameters.{name}.expr {source!r} is not a valid expression: {error.msg}"
        ) from None
    return tree.body


def _check(name: str, source: str, node: ast.AST, names: set[str]) -> None:
    """Refuse every node the evaluator does not know; collect the parameter names used."""

    def refuse(what: str) -> ExprError:
        return ExprError(
            f"parameters.{name}.expr {source!r}: {what} is not allowed; use numbers, parameter "
            "names, + - * / // % ** and min, max, round, int, float"
        )

    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise refuse(f"the constant {node.value!r}")
    elif isinstance(node, ast.Name):
        names.add(node.id)
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            raise refuse(f"the operator {type(node.op).__name__}")
        _check(name, source, node.left, names)
        _check(name, source, node.right, names)
    elif isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            raise refuse(f"the operator {type(node.op).__name__}")
        _check(name, source, node.operand, names)
    elif isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            raise refuse(f"calling {ast.unparse(node.func)}")
        if node.keywords or not node.args:
            raise refuse(f"the call {ast.unparse(node)}")
        for arg in node.args:
            _check(name, source, arg, names)
    else:
        raise refuse(f"{ast.unparse(node)!r} ({type(node).__name__})")


def expression_names(name: str, source: str) -> set[str]:
    """Parameter names an expression reads; ExprError when it is not allowed."""
    names: set[str] = set()
    _check(name, source, _parse(name, source), names)
    return names


def check_expressions(expressions: Mapping[str, str], searched: list[str]) -> list[str]:
    """Validate all derived parameters; returns their names in evaluation order.

    Raises ExprError on a disallowed construct, an unknown name or a cycle.
    """
    known = set(searched) | set(expressions)
    reads = {}
    for name, source in sorted(expressions.items()):
        used = expression_names(name, source)
        unknown = sorted(used - known)
        if unknown:
            raise ExprError(
                f"parameters.{name}.expr {source!r} reads {', '.join(unknown)}, which is not a "
                f"parameter (known: {', '.join(sorted(known - {name}))})"
            )
        reads[name] = used & set(expressions)
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise ExprError(f"parameters.{name}.expr: derived parameters form a cycle: {cycle}")
        visiting.append(name)
        for other in sorted(reads[name]):
            visit(other)
        visiting.pop()
        order.append(name)

    for name in sorted(expressions):
        visit(name)
    return order


def _evaluate(node: ast.expr, values: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left, values), _evaluate(node.right, values)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ExprError(f"exponent {right!r} is larger than {MAX_EXPONENT}")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, values))
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)  # _check allowed only named functions
        return _FUNCTIONS[node.func.id](*(_evaluate(arg, values) for arg in node.args))
    raise ExprError(f"cannot evaluate {ast.unparse(node)}")  # _check refused it already


def evaluate(name: str, source: str, values: Mapping[str, Any]) -> int | float:
    """The value of one derived parameter, given the values of the ones it reads."""
    node = _parse(name, source)
    _check(name, source, node, set())
    try:
        result = _evaluate(node, values)
    except (ArithmeticError, TypeError, ValueError) as error:
        raise ExprError(f"parameters.{name}.expr {source!r} failed: {error}") from None
    if isinstance(result, float) and not math.isfinite(result):
        raise ExprError(f"parameters.{name}.expr {source!r} gave {result}")
    return result


def derive(expressions: Mapping[str, str], point: Mapping[str, Any]) -> dict[str, Any]:
    """`point` (the searched parameters) with the derived parameters added, names sorted."""
    values = dict(point)
    for name in check_expressions(expressions, list(point)):
        values[name] = evaluate(name, expressions[name], values)
    return dict(sorted(values.items()))
