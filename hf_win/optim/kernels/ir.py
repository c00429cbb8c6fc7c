"""The traced description of one optimizer step: what both kernel emitters (C, Triton) render.

Nothing here restates the math. ``tracing.trace`` runs the optimizer's own step
(``WinOptimizer.step_tensors``: gradient preparation, its ``_direction``, the shared Win/Win2 step) once
over symbolic stand-ins and records it in a ``Program``:

- **Element values.** Each tensor list is one symbolic element (``param[i]``, ``grad[i]``,
  ``exp_avg[i]``, ...). Every list operation of the ``_ops`` vocabulary appends one statement in SSA form
  (a new value; an in-place operation rebinds the array to it), in the order and with the operands of the
  eager path, so float32 results agree with foreach to rounding and float64 replays the golden file.
- **Host scalars.** Every number the step reads from its param group (lr, betas, eps, weight decay,
  momentum, reckless steps, ...) or from the optimizer's attributes, the step count and the clipping
  coefficient are *inputs* of a small
  scalar program. Arithmetic on them (bias corrections, Win coefficients) is recorded, and the program is
  turned into a Python function evaluated on the host at every call, in double precision exactly as the
  eager path computes those scalars. The kernels receive only its outputs: **no hyper-parameter is a
  constant of a kernel**, so schedules that move any of them compile nothing.
- **Guards.** A branch on a number (``if weight_decay != 0``, SGD's ``t == 1``) takes the branch the
  current value takes and records a guard; a kernel is reused only while its guards hold (the same rule
  as Dynamo's). A weight-decay ramp starting at 0 thus builds two kernels, not one per step.
- **Per-tensor reductions** (``ops.norm``: LAMB's trust ratio, and anything written with it) split the
  loop into stages: every stage before a reduction only computes it; values needed later are recomputed
  from what is still in memory, and every store happens in the last stage (``schedule.py``).
- Anything else (a Python ``float()`` of a traced scalar, an operation outside the vocabulary, a value
  the trace cannot see: see ``tracing.py``) raises ``Unsupported``, and that param group runs on foreach
  (logged once, with the reason).

``Program`` is backend-neutral; ``schedule.schedule`` turns it into stages of loads, expression
statements, reductions and stores that ``c.py`` and ``triton.py`` print in their own syntax.
"""

from __future__ import annotations

import math
import numbers
import struct
from typing import Dict, List, Optional

import torch

__all__ = ["Unsupported", "SymScalar", "Slot", "TScalar", "Program", "compile_host", "is_number"]


class Unsupported(Exception):
    """The step uses something the kernels cannot express; ``str(e)`` says what."""


def is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _f32_exact(v: float) -> bool:
    """Whether ``v`` is the same number in float32 (then it may be a literal of a kernel)."""
    try:
        return struct.unpack("f", struct.pack("f", v))[0] == v
    except OverflowError:
        return False


# ----------------------------------------------------------------------------------------- host scalars
class SymScalar:
    """A scalar computed on the host at every call (a node of ``Program.scalars``), with the value it has
    for the group being traced (used to decide branches, which are recorded as guards)."""

    __slots__ = ("prog", "idx", "value")

    def __init__(self, prog: "Program", idx: int, value: float):
        self.prog, self.idx, self.value = prog, idx, value

    def _other(self, o):
        if isinstance(o, SymScalar):
            return o
        if is_number(o):
            return self.prog.const(float(o))
        raise Unsupported(f"arithmetic of a traced scalar with {type(o).__name__}")

    def _bin(self, op, o, reverse=False):
        o = self._other(o)
        a, b = (o, self) if reverse else (self, o)
        return self.prog.scalar_op(op, a, b)

    def __add__(self, o): return self._bin("+", o)
    def __radd__(self, o): return self._bin("+", o, True)
    def __sub__(self, o): return self._bin("-", o)
    def __rsub__(self, o): return self._bin("-", o, True)
    def __mul__(self, o): return self._bin("*", o)
    def __rmul__(self, o): return self._bin("*", o, True)
    def __truediv__(self, o): return self._bin("/", o)
    def __rtruediv__(self, o): return self._bin("/", o, True)
    def __pow__(self, o): return self._bin("**", o)
    def __rpow__(self, o): return self._bin("**", o, True)
    def __neg__(self): return self.prog.scalar_op("neg", self)
    def __pos__(self): return self
    def sqrt(self): return self.prog.scalar_op("sqrt", self)

    def _cmp(self, op, o):
        o = self._other(o)
        return self.prog.guard(op, self, o)

    def __eq__(self, o): return self._cmp("==", o)
    def __ne__(self, o): return self._cmp("!=", o)
    def __lt__(self, o): return self._cmp("<", o)
    def __le__(self, o): return self._cmp("<=", o)
    def __gt__(self, o): return self._cmp(">", o)
    def __ge__(self, o): return self._cmp(">=", o)
    __hash__ = object.__hash__

    def __bool__(self):
        return self._cmp("!=", 0.0)

    def __float__(self):
        raise Unsupported("float() of a traced hyper-parameter (write the arithmetic on the value itself)")

    __int__ = __index__ = __float__


_PY_OPS = {"+": "({a} + {b})", "-": "({a} - {b})", "*": "({a} * {b})", "/": "({a} / {b})", "**": "({a} ** {b})",
           "neg": "(-{a})", "sqrt": "_sqrt({a})"}
_EVAL = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b,
         "**": lambda a, b: a ** b, "neg": lambda a: -a, "sqrt": math.sqrt,
         "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
         "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


# ------------------------------------------------------------------------------------- element values
class Slot:
    """One symbolic element of a tensor list: an array of the kernel (``array`` set) or a temporary;
    ``cur`` is the SSA value it holds now."""

    __slots__ = ("array", "cur")

    def __init__(self, array: Optional[int], cur: int):
        self.array, self.cur = array, cur


class TScalar:
    """A per-tensor scalar computed inside the kernel (a norm, a trust ratio): ``Program.tscalars[idx]``."""

    __slots__ = ("idx",)

    def __init__(self, idx: int):
        self.idx = idx


class Program:
    """The traced step. Expressions are tuples:

    - element values: ``("v", id)``; host-scalar operands ``("k", i)`` (``operands[i]``, a scalar node);
      literals ``("c", x)`` (float32-exact numbers only); per-tensor scalars ``("t", j)``;
    - operations ``(op, a, b)`` with op in ``+ - * /`` and ``("max", a, b)`` (NaN-propagating),
      ``("sqrt", a)``, ``("sign", a)``.

    Per-tensor scalars (``tscalars``): ``("norm", r)`` (square root of reduction r), ``("ratio", w, u,
    clip)`` (LAMB's trust ratio of two norms), ``("mul", t, k)``.
    """

    def __init__(self):
        self.scalars: List[tuple] = []          # scalar nodes: ("in", slot) | ("const", x) | (op, i[, j])
        self.inputs: List[str] = []             # names of the input slots, in order (tracing.Reads adds them)
        self.guards: List[tuple] = []           # (op, i, j, expected)
        self.operands: List[int] = []           # scalar nodes the kernel receives, in order
        self._operand_of: Dict[int, int] = {}
        self.stmts: List[tuple] = []            # ("let", id, expr) | ("reduce", r, id)
        self.n_values = 0
        self.loads: Dict[int, int] = {}         # array index -> value id of its load
        self.n_reductions = 0
        self.tscalars: List[tuple] = []
        self.final: Dict[int, int] = {}         # array index -> value id stored (filled by trace)

    # host scalars
    def input(self, name: str, value: float) -> SymScalar:
        self.scalars.append(("in", len(self.inputs)))
        self.inputs.append(name)
        return SymScalar(self, len(self.scalars) - 1, float(value))

    def const(self, x: float) -> SymScalar:
        self.scalars.append(("const", x))
        return SymScalar(self, len(self.scalars) - 1, x)

    def scalar_op(self, op: str, a: SymScalar, b: Optional[SymScalar] = None) -> SymScalar:
        try:
            value = _EVAL[op](a.value) if b is None else _EVAL[op](a.value, b.value)
        except (ArithmeticError, ValueError) as e:
            raise Unsupported(f"scalar {op} failed while tracing: {e}") from None
        self.scalars.append((op, a.idx) if b is None else (op, a.idx, b.idx))
        return SymScalar(self, len(self.scalars) - 1, float(value))

    def guard(self, op: str, a: SymScalar, b: SymScalar) -> bool:
        result = bool(_EVAL[op](a.value, b.value))
        self.guards.append((op, a.idx, b.idx, result))
        return result

    def operand(self, s) -> tuple:
        """An element-expression operand for a scalar argument of an op (number, SymScalar, per-tensor
        scalar, or a one-element list of those)."""
        if isinstance(s, (list, tuple)):
            if len(s) != 1:
                raise Unsupported("a scalar list of more than one element")
            s = s[0]
        if isinstance(s, TScalar):
            return ("t", s.idx)
        if isinstance(s, torch.Tensor):
            raise Unsupported("a tensor-valued scalar computed eagerly (use the ops vocabulary)")
        if is_number(s):
            s = float(s)
            if _f32_exact(s) or not math.isfinite(s):
                return ("c", s)
            s = self.const(s)
        if isinstance(s, SymScalar):
            if s.idx not in self._operand_of:
                self._operand_of[s.idx] = len(self.operands)
                self.operands.append(s.idx)
            return ("k", self._operand_of[s.idx])
        raise Unsupported(f"a scalar argument of type {type(s).__name__}")

    # element values
    def let(self, expr: tuple) -> int:
        vid = self.n_values
        self.n_values += 1
        self.stmts.append(("let", vid, expr))
        return vid

    def load(self, array: int) -> int:
        vid = self.n_values
        self.n_values += 1
        self.loads[array] = vid
        return vid

    def reduce_sumsq(self, vid: int) -> int:
        r = self.n_reductions
        self.n_reductions += 1
        self.stmts.append(("reduce", r, vid))
        return r

    def tscalar(self, expr: tuple) -> TScalar:
        self.tscalars.append(expr)
        return TScalar(len(self.tscalars) - 1)

    # the host side, as Python source
    def host_source(self) -> str:
        """``def host(h)``: from the input values ``h``, None when a guard fails, else the operands."""
        lines = ["def host(h):"]
        for i, node in enumerate(self.scalars):
            kind = node[0]
            if kind == "in":
                expr = f"h[{node[1]}]"
            elif kind == "const":
                expr = repr(node[1]) if math.isfinite(node[1]) else f"float({str(node[1])!r})"
            else:
                args = {"a": f"s{node[1]}", "b": f"s{node[2]}" if len(node) > 2 else ""}
                expr = _PY_OPS[kind].format(**args)
            lines.append(f"    s{i} = {expr}")
            for op, a, b, expected in self.guards:
                if max(a, b) == i:
                    lines.append(f"    if bool(s{a} {op} s{b}) is not {expected}: return None")
        lines.append(f"    return ({', '.join(f's{i}' for i in self.operands)}{',' if len(self.operands) == 1 else ''})")
        return "\n".join(lines)


def compile_host(prog: Program):
    """The host function of ``prog`` (see ``Program.host_source``)."""
    namespace = {"_sqrt": math.sqrt, "__builtins__": {"float": float, "bool": bool}}
    exec(compile(prog.host_source(), "<hf_win kernel scalars>", "exec"), namespace)  # noqa: S102 - our own source
    return namespace["host"]

