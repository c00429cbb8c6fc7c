"""The traced description of one optimizer step: what both kernel emitters (C, Triton) render.

Nothing here restates the math. ``trace`` runs the optimizer's own step function
(``WinOptimizer._step_fn``: gradient preparation, its ``_direction``, the shared Win/Win2 step) once over
symbolic stand-ins:

- **Element values.** Each tensor list is one symbolic element (``param[i]``, ``grad[i]``,
  ``exp_avg[i]``, ...). Every list operation of the ``_ops`` vocabulary appends one statement in SSA form
  (a new value; an in-place operation rebinds the array to it), in the order and with the operands of the
  eager path, so float32 results agree with foreach to rounding and float64 replays the golden file.
- **Host scalars.** Every number the step reads from its param group (lr, betas, eps, weight decay,
  momentum, reckless steps, ...), the step count and the clipping coefficient are *inputs* of a small
  scalar program. Arithmetic on them (bias corrections, Win coefficients) is recorded, and the program is
  turned into a Python function evaluated on the host at every call, in double precision exactly as the
  eager path computes those scalars. The kernels receive only its outputs: **no hyper-parameter is a
  constant of a kernel**, so schedules that move any of them compile nothing.
- **Guards.** A branch on a number (``if weight_decay != 0``, SGD's ``t == 1``) takes the branch the
  current value takes and records a guard; a kernel is reused only while its guards hold (the same rule
  as Dynamo's). A weight-decay ramp starting at 0 thus builds two kernels, not one per step.
- **Per-tensor reductions** (``ops.norm``: LAMB's trust ratio, and anything written with it) split the
  loop into stages: every stage before a reduction only computes it; values needed later are recomputed
  from what is still in memory, and every store happens in the last stage (see ``schedule``).
- Anything else (a Python ``float()`` of a traced scalar, an operation outside the vocabulary) raises
  ``Unsupported``, and that param group runs on foreach (logged once, with the reason).

``Program`` is backend-neutral; ``schedule`` turns it into stages of loads, expression statements,
reductions and stores that ``c.py`` and ``triton.py`` print in their own syntax.
"""

from __future__ import annotations

import math
import numbers
import struct
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["Unsupported", "SymScalar", "Program", "trace", "schedule", "flatten_group", "compute_dtype", "exact_arrays",
           "render", "spelling"]


class Unsupported(Exception):
    """The step uses something the kernels cannot express; ``str(e)`` says what."""


def _is_num(x) -> bool:
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
        if _is_num(o):
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
        self.inputs: List[str] = []             # names of the input slots, in order
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
        if _is_num(s):
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


# ------------------------------------------------------------------------------------------- the ops
class SymOps:
    """The ``_ops`` vocabulary (see ``hf_win/optim/_ops.py``) over symbolic elements."""

    def __init__(self, prog: Program):
        self.p = prog

    @staticmethod
    def _one(xs) -> Slot:
        if len(xs) != 1 or not isinstance(xs[0], Slot):
            raise Unsupported("a tensor list that is not one traced element")
        return xs[0]

    def _v(self, xs) -> tuple:
        return ("v", self._one(xs).cur)

    def _set(self, xs, expr: tuple) -> None:
        self._one(xs).cur = self.p.let(expr)

    def _new(self, expr: tuple) -> list:
        return [Slot(None, self.p.let(expr))]

    def _inv(self, s) -> tuple:
        """``1/s`` as an operand: a division by a host scalar becomes a multiplication (one division per
        call, as the eager ``div_`` by a Python number is within an ulp of it)."""
        if isinstance(s, (list, tuple)) and len(s) == 1:
            s = s[0]
        if isinstance(s, SymScalar):
            return self.p.operand(1.0 / s)
        if _is_num(s):
            return self.p.operand(1.0 / float(s))
        return None

    def mul_(self, xs, scalar):
        self._set(xs, ("*", self._v(xs), self.p.operand(scalar)))

    def div_(self, xs, scalar):
        inv = self._inv(scalar)
        if inv is None:
            self._set(xs, ("/", self._v(xs), self.p.operand(scalar)))
        else:
            self._set(xs, ("*", self._v(xs), inv))

    def add_scalar_(self, xs, scalar):
        self._set(xs, ("+", self._v(xs), self.p.operand(scalar)))

    def add_(self, xs, ys, alpha=1.0):
        if _is_num(alpha) and float(alpha) == 1.0:
            self._set(xs, ("+", self._v(xs), self._v(ys)))
        else:
            self._set(xs, ("+", self._v(xs), ("*", self.p.operand(alpha), self._v(ys))))

    def sub(self, xs, ys):
        return self._new(("-", self._v(xs), self._v(ys)))

    def addcmul_(self, xs, ys, zs, value=1.0):
        self._set(xs, ("+", self._v(xs), ("*", ("*", self.p.operand(value), self._v(ys)), self._v(zs))))

    def maximum_(self, xs, ys):
        self._set(xs, ("max", self._v(xs), self._v(ys)))

    def sqrt(self, xs):
        return self._new(("sqrt", self._v(xs)))

    def reciprocal_(self, xs):
        self._set(xs, ("/", ("c", 1.0), self._v(xs)))

    def mul_tensors_(self, xs, ys):
        self._set(xs, ("*", self._v(xs), self._v(ys)))

    def div_tensors_(self, xs, ys):
        self._set(xs, ("/", self._v(xs), self._v(ys)))

    def copy_(self, xs, ys):
        self._one(xs).cur = self._one(ys).cur

    def clone(self, xs):
        return [Slot(None, self._one(xs).cur)]

    def scaled(self, xs, scalar):
        return self._new(("*", self._v(xs), self.p.operand(scalar)))

    def sign(self, xs):
        return self._new(("sign", self._v(xs)))

    def norm(self, xs):
        return [self.p.tscalar(("norm", self.p.reduce_sumsq(self._one(xs).cur)))]

    def trust_ratio(self, w_norms, u_norms, clip: bool):
        w, u = w_norms[0], u_norms[0]
        if not (isinstance(w, TScalar) and isinstance(u, TScalar)):
            raise Unsupported("a trust ratio of norms not computed by ops.norm")
        return [self.p.tscalar(("ratio", w.idx, u.idx, bool(clip)))]


# ------------------------------------------------------------------------------------------ tracing
class _Group(dict):
    """The param group as the traced step sees it: every number an input of the scalar program; the keys
    read are recorded (``used``) so that the kernel's structural key only holds what the step depends on."""

    def __init__(self, group: dict, prog: Program):
        super().__init__()
        self._src, self._prog, self.used = group, prog, {}

    def _wrap(self, key, value):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype.is_floating_point:
            value = float(value)
        if _is_num(value):
            return self._prog.input(key, value)
        if isinstance(value, (tuple, list)) and value and all(_is_num(v) for v in value):
            return type(value)(self._prog.input(f"{key}[{i}]", v) for i, v in enumerate(value))
        return value

    def __getitem__(self, key):
        if key not in self.used:
            value = self._src[key]
            self.used[key] = self._wrap(key, value)
        return self.used[key]

    def get(self, key, default=None):
        if key in self._src:
            return self[key]
        self.used.setdefault(key, ABSENT)  # a later group that has the key is another structure
        return default

    def __contains__(self, key):
        if key not in self._src:
            self.used.setdefault(key, ABSENT)
        return key in self._src

    def keys(self):
        return self._src.keys()


ABSENT = "<absent>"


def structure_of(value) -> Any:
    """What of a group value is a constant of a kernel: everything but the numbers."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype.is_floating_point:
        return "number"
    if _is_num(value):
        return "number"
    if isinstance(value, (tuple, list)) and value and all(_is_num(v) for v in value):
        return ("numbers", len(value))
    if isinstance(value, (str, bool, type(None), torch.dtype)):
        return value
    return repr(value)


def flatten_group(group: dict, used_keys: Sequence[str]) -> Optional[List[float]]:
    """The input values of the scalar program for ``group`` (keys in trace order), or None when a key's
    structure differs from the traced one (checked by the caller through ``structure_of``)."""
    out = []
    for key in used_keys:
        value = group.get(key)
        if isinstance(value, torch.Tensor):
            value = float(value)
        if _is_num(value):
            out.append(float(value))
        elif isinstance(value, (tuple, list)) and value and all(_is_num(v) for v in value):
            out.extend(float(v) for v in value)
    return out


class Traced:
    """The result of ``trace``: the program, the group keys it read (with their structure) and how to
    build the input vector of the host function at a call."""

    def __init__(self, prog: Program, group: dict, used: Sequence[str]):
        self.prog = prog
        self.used_keys = list(used)
        self.structure = {k: structure_of(group.get(k, ABSENT)) for k in used}
        self.host = compile_host(prog)

    def matches(self, group: dict) -> bool:
        return all(structure_of(group.get(k, ABSENT)) == s for k, s in self.structure.items())


def trace(step_fn, group: dict, arrays: Sequence[str], step: float, clip: Optional[float]) -> Traced:
    """Trace ``step_fn(ops, group, params, grads, states, steps, clip)`` (``WinOptimizer._step_fn``) for
    one element of each of ``arrays`` (``["param", "grad", *state keys]``)."""
    prog = Program()
    g = _Group(group, prog)
    # inputs not from the group come first, in a fixed order
    step_s = prog.input("step", step)
    clip_s = prog.input("clip", clip) if clip is not None else None
    slots = [Slot(i, prog.load(i)) for i in range(len(arrays))]
    state = dict(zip(arrays[2:], slots[2:]))
    step_fn(SymOps(prog), g, [slots[0]], [slots[1]], [state], [step_s], clip_s)
    prog.final = {s.array: s.cur for s in slots if s.cur != prog.loads[s.array]}
    if 1 in prog.final:
        raise Unsupported("the step writes the gradient")
    # the host function reads its inputs as ``host_inputs`` lays them out: step, clip, the group's numbers
    return Traced(prog, group, list(g.used))


def host_inputs(traced: Traced, group: dict, step: float, clip: Optional[float]) -> List[float]:
    values = [float(step)] + ([float(clip)] if clip is not None else [])
    return values + flatten_group(group, traced.used_keys)


# ---------------------------------------------------------------------------------------- scheduling
class Stage:
    """One loop over the elements: ``loads`` (array, value id), ``lets`` (value id, expression),
    ``reductions`` (r, value id: sum of squares), ``stores`` (array, value id), and the per-tensor
    scalars it needs (computed at the start of the stage from the reductions of earlier stages)."""

    def __init__(self):
        self.loads: List[Tuple[int, int]] = []
        self.lets: List[Tuple[int, tuple]] = []
        self.reductions: List[Tuple[int, int]] = []
        self.stores: List[Tuple[int, int]] = []
        self.tscalars: List[int] = []


def render(expr: tuple, spell: Dict[str, Any]) -> str:
    """An element expression in a back end's syntax. ``spell[kind]``: for the leaves (``v``, ``k``, ``t``,
    ``c``) a function of the leaf's payload; for operations a format string over the rendered operands
    ``a`` and ``b``. An operation the back end does not spell raises ``Unsupported``."""
    kind = expr[0]
    if kind not in spell:
        raise Unsupported(f"element operation {kind!r}")
    if kind in ("v", "k", "t", "c"):
        return spell[kind](expr[1])
    args = [render(a, spell) for a in expr[1:]]
    return spell[kind].format(a=args[0], b=args[1] if len(args) > 1 else "")


_ARITHMETIC = {op: f"({{a}} {op} {{b}})" for op in "+-*/"}


def spelling(**kinds) -> Dict[str, Any]:
    """A back end's spelling for ``render``: infix arithmetic, value names ``v<id>``, ``k<i>``, plus
    ``kinds`` (the rest, and any override)."""
    return {**_ARITHMETIC, "v": lambda x: f"v{x}", "k": lambda x: f"k{x}", **kinds}


def compute_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """Arithmetic is in float64 for float64 parameters, else in float32."""
    return torch.float64 if dtypes[0] == torch.float64 else torch.float32


def exact_arrays(dtypes: Sequence[torch.dtype]) -> List[int]:
    """The arrays stored in the compute dtype (a reload gives a stored value back exactly)."""
    ct = compute_dtype(dtypes)
    return [a for a, d in enumerate(dtypes) if d == ct]


def _refs(expr, out: set) -> set:
    """The value ids an expression reads directly."""
    if expr[0] == "v":
        out.add(expr[1])
    elif expr[0] not in ("k", "c", "t"):
        for a in expr[1:]:
            _refs(a, out)
    return out


def schedule(prog: Program, exact: Sequence[int] = ()) -> List[Stage]:
    """Split the program at its reductions. A stage computes what its roots need (its reductions; the
    stored values): a value is loaded when memory holds it, else recomputed from its definition.

    Stores happen in the last stage, except for an array in ``exact`` (stored in the compute dtype, so a
    reload gives the value back exactly) whose final value is complete before a reduction and whose old
    content no later stage needs: that one is stored in the stage that completes it, and later stages load
    it instead of recomputing it (LAMB: the moments are written by the stage that computes the norms, and
    the last stage reads them rather than the gradient)."""
    defs = {vid: expr for kind, vid, expr in (s for s in prog.stmts if s[0] == "let")}
    load_of = {vid: a for a, vid in prog.loads.items()}
    # stages: a new one starts at the first statement after a reduction
    red_groups: List[List[Tuple[int, int]]] = [[]]
    stage_of: Dict[int, int] = {}
    direct: List[set] = [set()]  # value ids each stage's statements and reductions read directly
    for s in prog.stmts:
        if s[0] == "reduce":
            red_groups[-1].append((s[1], s[2]))
            direct[-1].add(s[2])
            continue
        if red_groups[-1]:
            red_groups.append([])
            direct.append(set())
        stage_of[s[1]] = len(red_groups) - 1
        _refs(s[2], direct[-1])
    if red_groups[-1]:
        red_groups.append([])
        direct.append(set())
    last = len(red_groups) - 1
    direct[last] |= set(prog.final.values())

    early: Dict[int, Tuple[int, int]] = {}  # array -> (stage, value) stored early
    for a, vid in prog.final.items():
        s0 = stage_of.get(vid)
        if a not in exact or s0 is None or s0 == last:
            continue
        # what later stages read, recomputed down to what memory holds: must not need a's old content
        todo = [v for t in range(s0 + 1, last + 1) for v in direct[t] if v != vid]
        closure: set = set()
        while todo:
            v = todo.pop()
            if v in closure or v == vid:
                continue
            closure.add(v)
            if v in defs and stage_of.get(v, last) <= s0:
                todo.extend(_refs(defs[v], set()))
        if prog.loads[a] not in closure:
            early[a] = (s0, vid)

    stages = []
    done_reductions: set = set()
    held: Dict[int, int] = {}  # value id -> array that holds it in memory (stored early)
    for si, reductions in enumerate(red_groups):
        st = Stage()
        seen: set = set()
        tseen: set = set()

        def need_t(j):
            if j in tseen:
                return
            e = prog.tscalars[j]
            if e[0] == "norm" and e[1] not in done_reductions:
                raise Unsupported("a per-tensor scalar used in the loop that computes it")
            if e[0] == "ratio":
                need_t(e[1])
                need_t(e[2])
            tseen.add(j)
            st.tscalars.append(j)

        def need(expr):
            kind = expr[0]
            if kind == "v":
                vid = expr[1]
                if vid in seen:
                    return
                seen.add(vid)
                if vid in held:
                    st.loads.append((held[vid], vid))
                elif vid in load_of:
                    st.loads.append((load_of[vid], vid))
                else:
                    e = defs[vid]
                    need(e)
                    st.lets.append((vid, e))
            elif kind == "t":
                need_t(expr[1])
            elif kind not in ("k", "c"):
                for a in expr[1:]:
                    need(a)

        for r, vid in reductions:
            need(("v", vid))
            st.reductions.append((r, vid))
        for a, (s0, vid) in sorted(early.items()):
            if s0 == si:
                need(("v", vid))
                st.stores.append((a, vid))
        if si == last:
            for a, vid in sorted(prog.final.items()):
                if a not in early:
                    need(("v", vid))
                    st.stores.append((a, vid))
        st.loads.sort()
        st.lets.sort()
        st.tscalars.sort()
        stages.append(st)
        done_reductions.update(r for r, _ in reductions)
        held.update({vid: a for a, (s0, vid) in early.items() if s0 == si})
    return stages
