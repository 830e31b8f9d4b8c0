"""Plugins: Python functions the model calls with `<|plugin|>` actions, described by JSON schemas.

A plugin's result (or its error) becomes the text of an `environment name=<|plugin|>` turn. The model writes
the arguments, so they are checked against the schema's `required` keys, known `properties` and basic JSON
types before the function runs, and an exception inside the function is reported, not raised: the
conversation goes on and the model may try again.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import operator
from typing import Any, Callable, Mapping, Sequence

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "object": (dict,),
    "array": (list,), "null": (type(None),),
}


@dataclasses.dataclass(frozen=True)
class Plugin:
    """A callable tool: `fn(**parameters)` returns its result (text, or anything JSON can hold)."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of an object
    fn: Callable[..., Any]

    def spec(self) -> dict[str, Any]:
        """The function entry of the tools list (as in an OpenAI request's `tools[].function`)."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


def check_arguments(schema: Mapping[str, Any], args: Any) -> str | None:
    """Why `args` does not fit the object schema (first problem found), or None."""
    if not isinstance(args, dict):
        return f"parameters must be a JSON object, got {type(args).__name__}"
    props = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in args]
    if missing:
        return f"missing required parameter(s): {', '.join(missing)}"
    for key, value in args.items():
        if key not in props:
            return f"unknown parameter {key!r}; expected one of {sorted(props)}"
        kind = props[key].get("type")
        kinds = kind if isinstance(kind, list) else [kind] if kind else []
        allowed = tuple(t for k in kinds for t in _JSON_TYPES.get(k, (object,)))
        # bool is an int in Python but not in JSON schema
        if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
            return f"parameter {key!r} must be {' or '.join(kinds)}, got {json.dumps(value)}"
    return None


def call_plugin(plugins: Sequence[Plugin], name: str, parameters: Any) -> tuple[str, bool]:
    """`(environment text, ok)` of calling plugin `name`; never raises for the model's or the plugin's faults."""
    found = {p.name: p for p in plugins}.get(name)
    if found is None:
        return f"error: unknown plugin {name!r}; available: {', '.join(p.name for p in plugins) or 'none'}", False
    problem = check_arguments(found.parameters, parameters)
    if problem:
        return f"error: {name}: {problem}", False
    try:
        result = found.fn(**parameters)
    except Exception as e:  # noqa: BLE001 - the plugin's failure is the model's observation
        return f"error: {name} raised {type(e).__name__}: {e}", False
    return (result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)), True


# ---- the built-in calculator -----------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_EXPONENT = 1000  # 9**9**9 would hang the agent: exponents are bounded


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is larger than {MAX_EXPONENT}")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    raise ValueError(f"unsupported syntax: {ast.unparse(node)!r} (numbers, + - * / // % ** and parentheses only)")


def calculate(expression: str) -> str:
    """The value of an arithmetic expression, exactly for integers (no names, calls or attributes)."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {e.msg}") from None
    value = _eval(tree.body)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        value = int(value)
    return str(value)


CALCULATOR = Plugin(
    name="calculator",
    description="Evaluate an arithmetic expression exactly.",
    parameters={"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    fn=calculate,
)
BUILTIN_PLUGINS = {p.name: p for p in (CALCULATOR,)}
