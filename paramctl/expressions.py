"""`set`: values written directly, or computed by a safe expression in `x`.

An expression is parsed with `ast` and walked node by node over a whitelist of arithmetic,
comparisons, conditionals and numpy functions; nothing is ever run as Python code.
"""

from __future__ import annotations

import ast
import functools
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from paramctl.errors import UsageError
from paramctl.table import Checkpoint, Tensor

if TYPE_CHECKING:
    import numpy as np


MAX_EXPRESSION = 1000  # characters
MAX_NODES = 200

BINARY = {
    ast.Add: "add",
    ast.Sub: "subtract",
    ast.Mult: "multiply",
    ast.Div: "true_divide",
    ast.FloorDiv: "floor_divide",
    ast.Mod: "remainder",
    ast.Pow: "power",
    ast.BitAnd: "logical_and",
    ast.BitOr: "logical_or",
}
UNARY = {ast.UAdd: "positive", ast.USub: "negative", ast.Not: "logical_not", ast.Invert: "logical_not"}
COMPARE = {
    ast.Lt: "less",
    ast.LtE: "less_equal",
    ast.Gt: "greater",
    ast.GtE: "greater_equal",
    ast.Eq: "equal",
    ast.NotEq: "not_equal",
}
# name -> (numpy function, number of arguments)
FUNCTIONS = {
    **{f: (f, 1) for f in ("sign", "sqrt", "exp", "log", "log2", "log10", "log1p", "expm1", "sin", "cos", "tan")},
    **{f: (f, 1) for f in ("tanh", "floor", "ceil", "trunc", "isnan", "isinf", "isfinite")},
    "abs": ("absolute", 1),
    "round": ("rint", 1),
    "minimum": ("minimum", 2),
    "maximum": ("maximum", 2),
    "clip": ("clip", 3),
    "where": ("where", 3),
}
CONSTANTS = {"pi": math.pi, "e": math.e, "nan": math.nan, "inf": math.inf}


class Expression:
    """An arithmetic expression over `x` (the values being set), checked when it is made and
    evaluated by walking its syntax tree with numpy: numbers, `x`, pi, e, nan, inf, + - * / // %
    **, comparisons, & | ~ and/or/not (elementwise), `a if c else b`, lists, and the functions of
    FUNCTIONS. No other names, no attributes, subscripts or other calls: nothing of Python is
    reachable from it."""

    def __init__(self, text: str, allow_x: bool = True):
        self.text = text
        what = "--expr" if allow_x else "VALUE"
        if len(text) > MAX_EXPRESSION:
            raise UsageError(f"invalid {what}: longer than {MAX_EXPRESSION} characters")
        try:
            self.tree = ast.parse(text.strip(), mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
            raise UsageError(f"invalid {what} {text!r}: {getattr(e, 'msg', None) or 'not an expression'}") from None
        nodes = list(ast.walk(self.tree))
        if len(nodes) > MAX_NODES:
            raise UsageError(f"invalid {what} {text!r}: more than {MAX_NODES} terms")
        names = CONSTANTS.keys() | ({"x"} if allow_x else set())
        callees = {id(n.func) for n in nodes if isinstance(n, ast.Call)}
        for node in nodes:
            problem = refusal(node, names, id(node) in callees)
            if problem:
                hint = "" if allow_x or "'x'" not in problem else " (to compute from the values, use --expr)"
                raise UsageError(f"invalid {what} {text!r}: {problem}{hint}")

    def evaluate(self, x: np.ndarray | None = None) -> np.ndarray:
        import numpy as np

        with np.errstate(all="ignore"):
            try:
                return np.asarray(self._eval(self.tree, x))
            except (ValueError, TypeError, ArithmeticError) as e:
                raise UsageError(f"cannot evaluate {self.text!r}: {e}") from None

    def _eval(self, node: ast.AST, x: np.ndarray | None) -> Any:
        import numpy as np

        if isinstance(node, ast.Constant):
            assert isinstance(node.value, (int, float))  # checked by refusal()
            return np.float64(node.value)  # never Python ints: 9 ** 9 ** 9 ** 9 is inf, not a long wait
        if isinstance(node, ast.Name):
            return x if node.id == "x" else np.float64(CONSTANTS[node.id])
        if isinstance(node, ast.BinOp):
            return getattr(np, BINARY[type(node.op)])(self._eval(node.left, x), self._eval(node.right, x))
        if isinstance(node, ast.UnaryOp):
            return getattr(np, UNARY[type(node.op)])(self._eval(node.operand, x))
        if isinstance(node, ast.Compare):
            values = [self._eval(n, x) for n in (node.left, *node.comparators)]
            tests = [getattr(np, COMPARE[type(op)])(a, b) for op, a, b in zip(node.ops, values, values[1:])]
            return functools.reduce(np.logical_and, tests)
        if isinstance(node, ast.BoolOp):
            combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
            return functools.reduce(combine, [self._eval(v, x) for v in node.values])
        if isinstance(node, ast.IfExp):
            return np.where(self._eval(node.test, x), self._eval(node.body, x), self._eval(node.orelse, x))
        if isinstance(node, (ast.List, ast.Tuple)):
            return np.array([self._eval(e, x) for e in node.elts])
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)
            return getattr(np, FUNCTIONS[node.func.id][0])(*(self._eval(a, x) for a in node.args))
        raise AssertionError(f"unchecked node {type(node).__name__}")


def refusal(node: ast.AST, names: Any, callee: bool) -> str | None:
    """Why NODE may not be in an expression (None: it may). CALLEE: NODE is a called function."""
    if isinstance(node, ast.Constant):
        ok = isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
        return None if ok else f"{node.value!r} is not a number"
    if isinstance(node, ast.Name):
        if node.id in FUNCTIONS if callee else node.id in names:
            return None
        if callee:
            return f"{node.id}() is not one of the functions: {', '.join(FUNCTIONS)}"
        return f"unknown name {node.id!r} (known: {', '.join(sorted(names))})"
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name):
            return f"only these functions can be called: {', '.join(FUNCTIONS)}"
        func = node.func.id
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            return f"{func}() takes positional arguments only"
        if func in FUNCTIONS and len(node.args) != FUNCTIONS[func][1]:
            return f"{func}() takes {FUNCTIONS[func][1]} argument(s)"
        return None
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        ops = BINARY if isinstance(node, ast.BinOp) else UNARY
        return None if type(node.op) in ops else f"operator {type(node.op).__name__} is not allowed"
    if isinstance(node, ast.Compare):
        bad = [type(op).__name__ for op in node.ops if type(op) not in COMPARE]
        return f"comparison {bad[0]} is not allowed" if bad else None
    allowed = (ast.BoolOp, ast.IfExp, ast.List, ast.Tuple, ast.Load, ast.And, ast.Or, *BINARY, *UNARY, *COMPARE)
    return None if isinstance(node, allowed) else f"{type(node).__name__} is not allowed"


def operand(values: np.ndarray) -> np.ndarray:
    """The values as `x` sees them: float64 (exact for every floating type, and for integers up
    to 2**53), bool as it is."""
    import numpy as np

    return values if values.dtype.kind == "b" else values.astype(np.float64)


def fit(values: np.ndarray, dtype: str, name: str, text: str) -> np.ndarray:
    """VALUES checked to be representable in integer or bool DTYPE (floats are rounded by the cast)."""
    import numpy as np

    if dtype.startswith(("float", "bfloat")):
        return values
    if values.dtype.kind == "c" or (values.dtype.kind == "f" and not np.isfinite(values).all()):
        raise UsageError(f"{name} is {dtype}: {text} gives values that are not finite")
    if dtype == "bool":
        if not np.isin(values, (0, 1)).all():
            raise UsageError(f"{name} is bool: {text} gives values other than 0 and 1")
        return values.astype(bool)
    info = np.iinfo(np.dtype(dtype))
    if values.dtype.kind == "f" and not (values == np.round(values)).all():
        raise UsageError(f"{name} is {dtype}: {text} gives values that are not integers")
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise UsageError(f"{name} is {dtype}: {text} gives values outside [{info.min}, {info.max}]")
    return values


@dataclass
class Edit:
    """Set `tensor[key]` (the whole tensor for `()`) to the value of `expression` over it."""

    tensor: Tensor
    key: tuple

    @property
    def label(self) -> str:
        if not self.key:
            return self.tensor.name
        parts = ["..." if k is Ellipsis else slice_text(k) if isinstance(k, slice) else str(k) for k in self.key]
        return f"{self.tensor.name}[{', '.join(parts)}]"


def slice_text(s: slice) -> str:
    text = f"{'' if s.start is None else s.start}:{'' if s.stop is None else s.stop}"
    return text + (f":{s.step}" if s.step is not None else "")


def edited_values(edit: Edit, expression: Expression) -> tuple[np.ndarray, int, int]:
    """The tensor's values with the edit made, the number of values set, and how many values
    became NaN or infinite (a float16 overflow, a log of a negative)."""
    import numpy as np

    t = edit.tensor
    if t.dtype.startswith("complex"):
        raise UsageError(f"{t.name} is {t.dtype}: set handles real and integer tensors only")
    values = np.array(t.array())  # a writable copy in the stored dtype
    try:
        region = values[edit.key]
    except IndexError as e:
        raise UsageError(f"index does not fit {t.name!r} of shape {list(t.shape)}: {e}") from None
    region = np.asarray(region)
    result = expression.evaluate(operand(region))
    try:
        result = np.broadcast_to(result, region.shape)
    except ValueError:
        raise UsageError(
            f"{expression.text!r} has shape {list(result.shape)}, which does not fit {edit.label} "
            f"of shape {list(region.shape)}"
        ) from None
    result = fit(result, t.dtype, t.name, repr(expression.text))
    floating = t.dtype.startswith(("float", "bfloat"))
    before = int((~np.isfinite(region.astype(np.float64))).sum()) if floating else 0
    with np.errstate(all="ignore"):
        values[edit.key] = result
    after = int((~np.isfinite(np.asarray(values[edit.key]).astype(np.float64))).sum()) if floating else 0
    return values, region.size, max(0, after - before)


def find_edit(ckpt: Checkpoint, target: str) -> Edit | None:
    """TARGET as `NAME` or `NAME[INDEX]` of one tensor of CKPT; None if it names none."""
    from paramctl.indexing import parse_index

    names = set(ckpt.names())
    if target in names:
        return Edit(ckpt[target], ())
    m = re.fullmatch(r"(?P<name>.+?)(?P<index>\[[^\[\]]*\])", target, re.DOTALL)
    if m and m["name"] in names:
        return Edit(ckpt[m["name"]], parse_index(m["index"]))
    return None
