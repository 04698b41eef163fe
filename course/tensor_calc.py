"""A tensor calculator (the course's Mini-Project 1): reshape, matrix multiplication,
broadcasting and gradients, with errors that explain the rule that failed.

    python -m course.tensor_calc "a @ b" --a "[[1,2],[3,4]]" --b "[[5],[6]]"
    python -m course.tensor_calc eval "softmax(a, dim=1) * 2" --a "[[1.0, 2.0]]"
    python -m course.tensor_calc reshape "[1,2,3,4,5,6]" --shape 3,-1
    python -m course.tensor_calc broadcast "[1,2,3]" "[[10],[20]]"
    python -m course.tensor_calc grad "x**2 + 3*x" --at 2.0 --check
    python -m course.tensor_calc grad "sum(exp(x) * w)" --at "[0.0, 1.0]" --w "[1.0, 2.0]"

Tensors are written as (nested) Python lists of numbers. Expressions are parsed with ``ast``
and only arithmetic (``+ - * / // % ** @``, unary minus), numbers, the named tensors and the
functions in :data:`FUNCTIONS` are evaluated: never ``eval``, so ``__import__('os')`` or
``a.__class__`` is refused, not run. ``--json`` prints the result for programs.

Exit status: 0 done; 1 a gradient check (``--check``) found autograd and the finite difference
apart; 2 bad input (a malformed tensor, a refused expression, shapes that do not fit), with a
message saying what was wrong.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

OK, CHECK_FAILED, BAD_INPUT = 0, 1, 2
COMMANDS = ("eval", "reshape", "broadcast", "grad")
# Longer expressions are refused before parsing: a calculator line, not a program.
MAX_EXPRESSION_CHARS = 1000
# Central differences in float64: the truncation error is O(h^2) and the rounding error
# O(eps_machine / h); h = 1e-6 balances them to about 1e-10 for smooth functions.
FD_STEP = 1e-6
FD_RTOL, FD_ATOL = 1e-5, 1e-7


class CalcError(ValueError):
    """Bad input: the message says what was wrong and what would work (exit status 2)."""


def _dim_kw(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A reduction that takes an optional ``dim`` (all elements without one)."""

    def call(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        return fn(x) if dim is None else fn(x, dim=dim)

    return call


# The whole vocabulary of functions: name -> (callable, what a user needs to know).
FUNCTIONS: dict[str, tuple[Callable[..., torch.Tensor], str]] = {
    "exp": (torch.exp, "exp(x)"),
    "log": (torch.log, "log(x), natural"),
    "sqrt": (torch.sqrt, "sqrt(x)"),
    "abs": (torch.abs, "abs(x)"),
    "sin": (torch.sin, "sin(x)"),
    "cos": (torch.cos, "cos(x)"),
    "tanh": (torch.tanh, "tanh(x)"),
    "sigmoid": (torch.sigmoid, "sigmoid(x)"),
    "relu": (torch.relu, "relu(x)"),
    "sum": (_dim_kw(torch.sum), "sum(x) or sum(x, dim=d)"),
    "mean": (_dim_kw(lambda x, **dim: torch.mean(x.double(), **dim)), "mean(x) or mean(x, dim=d)"),
    "amax": (_dim_kw(torch.amax), "amax(x) or amax(x, dim=d): the largest element"),
    "amin": (_dim_kw(torch.amin), "amin(x) or amin(x, dim=d): the smallest element"),
    "softmax": (lambda x, dim=-1: torch.softmax(x, dim=dim), "softmax(x, dim=-1)"),
    "log_softmax": (
        lambda x, dim=-1: torch.log_softmax(x, dim=dim),
        "log_softmax(x, dim=-1)",
    ),
    "transpose": (
        lambda x, d0=-2, d1=-1: torch.transpose(x, d0, d1),
        "transpose(x) swaps the last two dims; transpose(x, d0, d1) any two",
    ),
    "reshape": (lambda x, shape: reshape(x, shape), "reshape(x, (rows, cols, ...)), -1 once"),
    "matmul": (lambda a, b: matmul(a, b, "a", "b"), "matmul(a, b), the same as a @ b"),
}

BINARY_OPS: dict[type[ast.operator], tuple[str, Callable[[Any, Any], torch.Tensor]]] = {
    ast.Add: ("+", torch.add),
    ast.Sub: ("-", torch.sub),
    ast.Mult: ("*", torch.mul),
    ast.Div: ("/", torch.true_divide),
    ast.FloorDiv: ("//", torch.floor_divide),
    ast.Mod: ("%", torch.remainder),
    ast.Pow: ("**", torch.pow),
}


def parse_tensor(text: str, what: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor from a Python literal: a number or (nested) lists of numbers, rows of equal
    length. Integers stay int64 unless ``dtype`` says otherwise; decimals are float64."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise CalcError(
            f"{what}: {text!r} is not a tensor literal; write a number or nested lists of "
            'numbers, e.g. "[[1, 2], [3, 4]]".'
        ) from None

    def check(v: Any) -> None:
        if isinstance(v, list | tuple):
            for item in v:
                check(item)
        elif isinstance(v, bool) or not isinstance(v, int | float):
            raise CalcError(f"{what}: {v!r} is not a number; tensors hold numbers only.")

    check(value)
    try:
        array = np.array(value)
    except ValueError:
        array = np.array([], dtype=object)
    if array.dtype == object:
        raise CalcError(
            f"{what}: {text!r} is ragged: every row of a tensor needs the same length "
            "(e.g. [[1, 2], [3, 4]], not [[1, 2], [3]])."
        )
    tensor = torch.from_numpy(array)
    return tensor.to(dtype) if dtype is not None else tensor


def shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def broadcast_shape(left: Sequence[int], right: Sequence[int], context: str) -> tuple[int, ...]:
    """The shape two operands broadcast to, or a CalcError naming both shapes and the
    dimension that breaks the rule."""
    out = []
    for i in range(1, max(len(left), len(right)) + 1):
        a = left[-i] if i <= len(left) else 1
        b = right[-i] if i <= len(right) else 1
        if a != b and 1 not in (a, b):
            raise CalcError(
                f"{context}: shapes {shape_text(left)} and {shape_text(right)} do not "
                f"broadcast: at dimension -{i} (counting from the right) they are {a} and {b}. "
                "Broadcasting aligns shapes from the right, and each pair of sizes must be "
                "equal or one of them 1 (a missing dimension counts as 1)."
            )
        out.append(max(a, b))
    return tuple(reversed(out))


def matmul(a: torch.Tensor, b: torch.Tensor, left: str, right: str) -> torch.Tensor:
    """``a @ b`` after checking the shapes, so a mismatch says which sizes and which rule."""
    context = f"{left} @ {right}"
    if a.ndim == 0 or b.ndim == 0:
        raise CalcError(
            f"{context}: matrix multiplication needs tensors of at least 1 dimension, got "
            f"shapes {shape_text(a.shape)} and {shape_text(b.shape)}; use * for a scalar."
        )
    inner_left = a.shape[-1]
    inner_right = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if inner_left != inner_right:
        where = "only dimension" if b.ndim == 1 else "second-to-last dimension"
        raise CalcError(
            f"{context}: shapes {shape_text(a.shape)} and {shape_text(b.shape)} do not fit: "
            f"the left's last dimension ({inner_left}) must equal the right's {where} "
            f"({inner_right}). (rows x k) @ (k x cols) -> (rows x cols); transpose(b) may "
            "be what you meant."
        )
    if a.ndim > 2 or b.ndim > 2:  # the leading (batch) dimensions broadcast
        broadcast_shape(a.shape[:-2], b.shape[:-2] if b.ndim > 1 else (), f"{context} (batch)")
    return exact_integers(torch.matmul, *_common_dtype(a, b), context=context)


def reshape(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``x.reshape(shape)`` with one ``-1`` inferred; a mismatch says both element counts."""
    shape = tuple(int(s) for s in shape)
    if shape.count(-1) > 1:
        raise CalcError(f"reshape to {shape_text(shape)}: only one dimension may be -1.")
    if any(s < -1 or s == 0 for s in shape):
        raise CalcError(
            f"reshape to {shape_text(shape)}: sizes must be positive (or one -1, inferred)."
        )
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if x.numel() % known:
            raise CalcError(
                f"cannot reshape {shape_text(x.shape)} ({x.numel()} elements) into "
                f"{shape_text(shape)}: the other sizes multiply to {known}, which does not "
                f"divide {x.numel()}."
            )
    elif known != x.numel():
        raise CalcError(
            f"cannot reshape {shape_text(x.shape)} ({x.numel()} elements) into "
            f"{shape_text(shape)} ({known} elements): a reshape keeps the number of elements."
        )
    return x.reshape(shape)


def exact_integers(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
    context: str,
) -> torch.Tensor:
    """``fn(a, b)``, refusing an integer result that wrapped around: int64 arithmetic
    overflows silently (9**9**9 would print 0), so the float64 result is the witness."""
    out = fn(a, b)
    if out.dtype.is_floating_point or out.dtype == torch.bool:
        return out
    approx = fn(a.double(), b.double())
    if bool((approx.abs() >= 2.0**63).any()):
        raise CalcError(
            f"{context}: the result overflows 64-bit integers; write a decimal point (e.g. "
            "9.0) to compute in floating point."
        )
    return out


def _common_dtype(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


@dataclass
class Evaluator:
    """Evaluates a parsed expression over named tensors, refusing anything but arithmetic,
    numbers, the names given and :data:`FUNCTIONS`."""

    names: dict[str, torch.Tensor]

    def run(self, expression: str) -> torch.Tensor:
        if len(expression) > MAX_EXPRESSION_CHARS:
            raise CalcError(f"the expression is over {MAX_EXPRESSION_CHARS} characters.")
        try:
            tree = ast.parse(expression.strip(), mode="eval")
        except SyntaxError as exc:
            raise CalcError(f"{expression!r} is not an expression: {exc.msg}.") from None
        try:
            return self.value(tree.body)
        except RuntimeError as exc:  # what torch refuses beyond the checks here
            raise CalcError(f"{expression!r}: {str(exc).splitlines()[0]}") from None

    def value(self, node: ast.expr) -> torch.Tensor:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise CalcError(f"{node.value!r}: only numbers are constants here.")
            # A 0-d tensor, never a Python number: 9**9**9 then overflows, it does not hang.
            dtype = torch.float64 if isinstance(node.value, float) else torch.int64
            return torch.tensor(node.value, dtype=dtype)
        if isinstance(node, ast.Name):
            if node.id not in self.names:
                known = ", ".join(sorted(self.names)) or "none"
                raise CalcError(
                    f"unknown name {node.id!r} (tensors given: {known}); pass it as "
                    f'--{node.id} "[...]".'
                )
            return self.names[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            operand = self.value(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp):
            return self.binary(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.List):
            return parse_tensor(ast.unparse(node), "a list in the expression")
        raise CalcError(
            f"{ast.unparse(node)!r} is not allowed: only numbers, the named tensors, "
            "+ - * / // % ** @ and the functions "
            f"{', '.join(FUNCTIONS)} (attributes, indexing and other Python are refused)."
        )

    def binary(self, node: ast.BinOp) -> torch.Tensor:
        left, right = self.value(node.left), self.value(node.right)
        left_text, right_text = ast.unparse(node.left), ast.unparse(node.right)
        if isinstance(node.op, ast.MatMult):
            return matmul(left, right, left_text, right_text)
        if type(node.op) not in BINARY_OPS:
            raise CalcError(f"operator in {ast.unparse(node)!r} is not allowed.")
        symbol, fn = BINARY_OPS[type(node.op)]
        broadcast_shape(left.shape, right.shape, f"{left_text} {symbol} {right_text}")
        return exact_integers(fn, left, right, ast.unparse(node))

    def call(self, node: ast.Call) -> torch.Tensor:
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in FUNCTIONS:
            called = ast.unparse(node.func)
            raise CalcError(
                f"function {called!r} is not allowed; the functions are: "
                + "; ".join(usage for _, usage in FUNCTIONS.values())
                + "."
            )
        fn, usage = FUNCTIONS[name]
        args = [self.argument(a) for a in node.args]
        kwargs = {}
        for keyword in node.keywords:
            if keyword.arg != "dim":
                raise CalcError(f"{name}: the only keyword is dim; usage: {usage}.")
            kwargs["dim"] = self.argument(keyword.value)
        try:
            return fn(*args, **kwargs)
        except TypeError:
            raise CalcError(f"{ast.unparse(node)!r}: wrong arguments; usage: {usage}.") from None
        except IndexError as exc:
            raise CalcError(f"{ast.unparse(node)!r}: {exc}; usage: {usage}.") from None

    def argument(self, node: ast.expr) -> Any:
        """A tensor, or a plain integer (a dim) or tuple of integers (a shape)."""
        if isinstance(node, ast.Tuple):
            return tuple(self.integer(e) for e in node.elts)
        integer = self.integer(node, strict=False)
        return integer if integer is not None else self.value(node)

    @staticmethod
    def integer(node: ast.expr, strict: bool = True) -> int | None:
        sign = 1
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            sign, node = -1, node.operand
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, int)
            and not isinstance(node.value, bool)
        ):
            return sign * node.value
        if strict:
            raise CalcError(f"{ast.unparse(node)!r}: a shape holds whole numbers only.")
        return None


@dataclass
class GradResult:
    value: torch.Tensor
    grad: torch.Tensor
    finite_difference: torch.Tensor | None


def gradient(
    expression: str, wrt: str, at: torch.Tensor, others: dict[str, torch.Tensor], check: bool
) -> GradResult:
    """d(expression)/d(wrt) at ``at`` by autograd (float64), and by central differences when
    ``check``; the expression must give one number (wrap a tensor in sum(...))."""
    x = at.to(torch.float64).clone().requires_grad_(True)
    names = {k: v.to(torch.float64) for k, v in others.items()}

    def f(point: torch.Tensor) -> torch.Tensor:
        out = Evaluator({**names, wrt: point}).run(expression)
        if out.numel() != 1:
            raise CalcError(
                f"{expression!r} gives a tensor of shape {shape_text(out.shape)}, not one "
                "number: a gradient needs a scalar, e.g. sum(...) or mean(...)."
            )
        return out.reshape(())

    value = f(x)
    if not value.requires_grad:
        grad = torch.zeros_like(x)  # the expression does not depend on wrt
    else:
        (grad,) = torch.autograd.grad(value, x, allow_unused=True)
        grad = torch.zeros_like(x) if grad is None else grad
    fd = None
    if check:
        with torch.no_grad():
            flat = x.detach().reshape(-1)
            fd = torch.empty_like(flat)
            for i in range(flat.numel()):
                step = torch.zeros_like(flat)
                step[i] = FD_STEP
                up = f((flat + step).reshape(x.shape))
                down = f((flat - step).reshape(x.shape))
                fd[i] = (up - down) / (2 * FD_STEP)
            fd = fd.reshape(x.shape)
    return GradResult(value.detach(), grad.detach(), fd)


def show(label: str, tensor: torch.Tensor) -> str:
    array = tensor.detach().numpy()
    body = str(array) if array.ndim else repr(array.item())
    sep = "\n" if "\n" in body else " "
    return f"{label} ={sep}{body}\n  shape {shape_text(tensor.shape)}, {tensor.dtype}"


def as_json(tensor: torch.Tensor) -> dict[str, Any]:
    t = tensor.detach()
    return {
        "shape": list(t.shape),
        "dtype": str(t.dtype).removeprefix("torch."),
        "value": t.tolist(),
    }


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.replace("(", "").replace(")", "").split(",") if p.strip())
    except ValueError:
        raise CalcError(
            f"--shape {text!r}: write sizes separated by commas, e.g. 2,3 or 3,-1."
        ) from None


def named_tensors(extra: list[str]) -> dict[str, torch.Tensor]:
    """``--name VALUE`` pairs after the known options: the expression's tensors."""
    names: dict[str, torch.Tensor] = {}
    i = 0
    while i < len(extra):
        flag = extra[i]
        name = flag[2:].split("=", 1)[0] if flag.startswith("--") else ""
        if not name.isidentifier() or name in FUNCTIONS:
            raise CalcError(
                f"unexpected argument {flag!r}: name each tensor as --NAME VALUE, e.g. "
                '--a "[[1, 2]]" (a name not already a function).'
            )
        if "=" in flag:
            value, i = flag.split("=", 1)[1], i + 1
        elif i + 1 < len(extra):
            value, i = extra[i + 1], i + 2
        else:
            raise CalcError(f'{flag} needs a value, e.g. {flag} "[1, 2, 3]".')
        names[name] = parse_tensor(value, flag)
    return names


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: a tensor named --j must not be taken for --json.
    parser = argparse.ArgumentParser(
        prog="python -m course.tensor_calc",
        allow_abbrev=False,
        description="Tensor calculator: evaluate, reshape, broadcast, differentiate. "
        'Name tensors with --NAME VALUE (e.g. --a "[[1,2],[3,4]]").',
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser(
        "eval", allow_abbrev=False, help="evaluate an expression (the default command)"
    )
    ev.add_argument("expression")
    rs = sub.add_parser("reshape", allow_abbrev=False, help="reshape a tensor")
    rs.add_argument("tensor")
    rs.add_argument("--shape", required=True, help="e.g. 2,3 or 3,-1")
    bc = sub.add_parser(
        "broadcast", allow_abbrev=False, help="show how two or more tensors broadcast"
    )
    bc.add_argument("tensors", nargs="+")
    gr = sub.add_parser("grad", allow_abbrev=False, help="d expression / d x by autograd")
    gr.add_argument("expression")
    gr.add_argument("--at", required=True, help="where: a number or a tensor")
    gr.add_argument("--wrt", default="x", help="the variable (default x)")
    gr.add_argument("--check", action="store_true", help="compare with a central finite difference")
    for command in (ev, rs, bc, gr):
        command.add_argument("--json", action="store_true", help="print JSON for programs")
    return parser


def run(argv: Sequence[str]) -> tuple[int, str]:
    """(exit status, what to print): the CLI without the process around it."""
    argv = list(argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "eval")  # `tensor_calc "a @ b" --a ...`
    args, extra = build_parser().parse_known_args(argv)
    if args.command in ("reshape", "broadcast") and extra:
        raise CalcError(f"{args.command} takes no named tensors: unexpected {extra}.")
    if args.command == "eval":
        result = Evaluator(named_tensors(extra)).run(args.expression)
        if args.json:
            return OK, json.dumps(as_json(result))
        return OK, show(args.expression.strip(), result)
    if args.command == "reshape":
        x = parse_tensor(args.tensor, "tensor")
        result = reshape(x, parse_shape(args.shape))
        if args.json:
            return OK, json.dumps(as_json(result))
        return OK, show(f"reshape {shape_text(x.shape)} -> {shape_text(result.shape)}", result)
    if args.command == "broadcast":
        tensors = [parse_tensor(t, f"tensor {i + 1}") for i, t in enumerate(args.tensors)]
        shape: tuple[int, ...] = ()
        for t in tensors:
            shape = broadcast_shape(shape, t.shape, "broadcast")
        expanded = [t.expand(shape) for t in tensors]
        if args.json:
            return OK, json.dumps(
                {"shape": list(shape), "expanded": [as_json(t) for t in expanded]}
            )
        width = len(shape)
        lines = ["aligned from the right (a missing dimension counts as 1):"]
        for i, t in enumerate(tensors):
            padded = ["·"] * (width - t.ndim) + [str(s) for s in t.shape]
            lines.append(f"  tensor {i + 1}: " + " ".join(f"{p:>4}" for p in padded))
        lines.append("  result:   " + " ".join(f"{s:>4}" for s in shape))
        lines += [show(f"tensor {i + 1} expanded", t) for i, t in enumerate(expanded)]
        return OK, "\n".join(lines)
    at = parse_tensor(args.at, "--at", torch.float64)
    result = gradient(args.expression, args.wrt, at, named_tensors(extra), args.check)
    status = OK
    if result.finite_difference is not None and not torch.allclose(
        result.grad, result.finite_difference, rtol=FD_RTOL, atol=FD_ATOL
    ):
        status = CHECK_FAILED
    if args.json:
        payload = {"value": as_json(result.value), "grad": as_json(result.grad)}
        if result.finite_difference is not None:
            payload["finite_difference"] = as_json(result.finite_difference)
            payload["check_passed"] = status == OK
        return status, json.dumps(payload)
    lines = [
        show(f"f({args.wrt}) = {args.expression.strip()} at {args.wrt} = {args.at}", result.value),
        show(f"d/d{args.wrt} (autograd)", result.grad),
    ]
    if result.finite_difference is not None:
        gap = float((result.grad - result.finite_difference).abs().max())
        lines.append(
            show(f"d/d{args.wrt} (central difference, h={FD_STEP:g})", result.finite_difference)
        )
        verdict = "agree" if status == OK else "DISAGREE"
        lines.append(f"autograd and the finite difference {verdict}: max |gap| {gap:.3g}")
    return status, "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status, text = run(sys.argv[1:] if argv is None else argv)
    except CalcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
