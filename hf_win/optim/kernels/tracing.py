"""Tracing a step: the optimizer's own ``step_tensors`` run once over symbolic stand-ins (``ir.Program``).

What the step can read, and what becomes of it (``docs/extending.md`` states these rules for authors):

- **The tensors**: one symbolic element per array; the ``_ops`` vocabulary (``SymOps``) records each
  operation. Anything else done to them raises ``Unsupported``.
- **The param group** (``TracedGroup``, a read-only mapping): ``group[key]``, ``get``, ``in``, ``keys``,
  ``items``, ``values``, iteration and ``len`` all work and are all recorded.
- **The optimizer's attributes** (``self``, through a stand-in of the optimizer's class): every data
  attribute read (its own, and its class's) is recorded; methods and properties run on the stand-in, so
  what they read is recorded too. Writing an attribute, or to the group, raises ``Unsupported``.

Every value read is classified once (``classify``): a number or a non-empty sequence of numbers becomes
inputs of the host-scalar program (re-read at every call, so an attribute or hyper-parameter that
changes never needs a new kernel); a string, bool, None, dtype (or a sequence of those) is part of the
kernel's structure. A kernel is reused only for a call whose reads have the same structure
(``Traced.inputs`` returns None otherwise). Any other value (a dict, a tensor, an object) raises
``Unsupported`` naming the optimizer and the access. The host function's inputs are the read values'
numbers in the order of the reads: ``Reads`` creates each input when it records the read, and
``Traced.inputs`` gathers them by walking the same list.

Not seen, and so constants of the kernel: values the step takes from anywhere else (module globals,
closures, other objects).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .ir import Program, Slot, SymScalar, TScalar, Unsupported, compile_host, is_number

__all__ = ["SymOps", "TracedGroup", "Reads", "Traced", "classify", "trace", "group_structure"]


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
        if is_number(s):
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
        if is_number(alpha) and float(alpha) == 1.0:
            self._set(xs, ("+", self._v(xs), self._v(ys)))
        elif is_number(alpha) and float(alpha) == -1.0:  # x + (-1)*y is x - y, bit for bit: one operation
            self._set(xs, ("-", self._v(xs), self._v(ys)))
        else:
            self._set(xs, ("+", self._v(xs), ("*", self.p.operand(alpha), self._v(ys))))

    def sub(self, xs, ys):
        return self._new(("-", self._v(xs), self._v(ys)))

    def addcmul_(self, xs, ys, zs, value=1.0):
        self._set(xs, ("+", self._v(xs), ("*", ("*", self.p.operand(value), self._v(ys)), self._v(zs))))

    def lerp_(self, xs, ys, weight):
        # torch's formula (aten/src/ATen/native/Lerp.h), the branch a guard on the host value: ``x + w*(y - x)``
        # for |w| < 0.5, else ``y - (y - x)*(1 - w)``; each is exact when y == x
        x, y = self._v(xs), self._v(ys)
        diff = ("-", y, x)
        if weight < 0.5 and weight > -0.5:
            self._set(xs, ("+", x, ("*", self.p.operand(weight), diff)))
        else:
            self._set(xs, ("-", y, ("*", diff, self.p.operand(1.0 - weight))))

    def mix_(self, xs, pulls, keep=None):
        # in registers the differences cost nothing: keep*x + c1*(s1 - x) [+ c2*(s2 - x)], each from the old x
        diffs = [(self.sub(s, xs), c) for s, c in pulls]
        if keep is not None:
            self.mul_(xs, keep)
        for d, c in diffs:
            self.add_(xs, d, alpha=c)

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



# ------------------------------------------------------------------------------------------ reads
GROUP, HAS, KEYS, SELF, CALL = "group", "has", "keys", "self", "call"  # where a read value comes from
NUMBER = "number"
_CONSTANTS = (str, bool, type(None), torch.dtype)
_MISSING = object()  # a value the call does not have (its structure is None: never a traced one)


def classify(value) -> Tuple[Any, Tuple[float, ...]]:
    """``(structure, numbers)`` of a value the step reads. ``numbers`` are inputs of the host program;
    ``structure`` is what a kernel is specific to, None for a value the trace cannot see."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and value.dtype.is_floating_point:
            return NUMBER, (float(value),)
        return None, ()
    if is_number(value):
        return NUMBER, (float(value),)
    if isinstance(value, _CONSTANTS):
        return ("const", value), ()
    if isinstance(value, (tuple, list)) and value:
        if all(is_number(v) for v in value):
            return ("numbers", type(value), len(value)), tuple(float(v) for v in value)
        if all(isinstance(v, _CONSTANTS) for v in value):
            return ("consts", type(value), tuple(value)), ()
    return None, ()


def _spell(source: str, key) -> str:
    return {GROUP: f"group[{key!r}]", HAS: f"{key!r} in group", KEYS: "the group's keys",
            SELF: f"self.{key}"}.get(source, str(key))


class Reads:
    """What a trace read, in order: ``(source, key, structure)``. Recording a read creates the host
    program's inputs for its numbers, so the inputs are laid out as ``Traced.inputs`` gathers them."""

    def __init__(self, prog: Program, owner: str):
        self.prog, self.owner = prog, owner
        self.list: List[tuple] = []
        self._traced: dict = {}  # (source, key) -> what the step got

    def read(self, source: str, key, value):
        if (source, key) in self._traced:
            return self._traced[(source, key)]
        if source in (HAS, KEYS):
            structure, numbers = value, ()
        else:
            structure, numbers = classify(value)
        if structure is None:
            raise Unsupported(
                f"{self.owner}: the step reads {_spell(source, key)}, a {type(value).__name__}: a kernel sees "
                "numbers (inputs of every call), strings, booleans, None and dtypes (or sequences of them) "
                "from self and the param group")
        self.list.append((source, key, structure))
        if structure == NUMBER:
            traced = self.prog.input(_spell(source, key), numbers[0])
        elif numbers:
            traced = type(value)(self.prog.input(f"{_spell(source, key)}[{i}]", v) for i, v in enumerate(numbers))
        else:
            traced = value
        self._traced[(source, key)] = traced
        return traced


class _Unseen:
    """``group["params"]`` in a trace: the group's tensors, which a kernel does not see; any use refuses."""

    def __init__(self, owner: str):
        object.__setattr__(self, "_owner", owner)

    def _refuse(self, *args, **kwargs):
        raise Unsupported(f"{object.__getattribute__(self, '_owner')}: the step uses group['params'] (the group's "
                          "tensors); a kernel steps one element of each array: use the params argument")

    __len__ = __iter__ = __getitem__ = __bool__ = __float__ = __index__ = __contains__ = _refuse

    def __getattr__(self, name):
        self._refuse()


class TracedGroup(Mapping):
    """The param group as the traced step sees it: read-only, every access recorded in ``Reads``."""

    def __init__(self, group: dict, reads: Reads):
        self._src, self._reads = group, reads

    def __getitem__(self, key):
        if key == "params":
            return _Unseen(self._reads.owner)
        return self._reads.read(GROUP, key, self._src[key])

    def get(self, key, default=None):
        if key in self._src:  # a read of the value: a call whose group lacks the key does not match it
            return self[key]
        self._reads.read(HAS, key, False)
        return default

    def __contains__(self, key):
        return self._reads.read(HAS, key, key in self._src)

    def __iter__(self):
        self._reads.read(KEYS, None, frozenset(self._src))
        return iter(list(self._src))

    def __len__(self):
        return len(self._reads.read(KEYS, None, frozenset(self._src)))

    def copy(self) -> dict:
        return dict(self.items())

    def _write(self, key, *args):
        raise Unsupported(f"{self._reads.owner}: the step writes group[{key!r}]; a kernel cannot replay writes "
                          "to the param group")

    __setitem__ = __delitem__ = setdefault = pop = _write

    def update(self, *args, **kwargs):
        self._write(next(iter(dict(*args, **kwargs)), None))


def _traced_self(owner, reads: Reads):
    """A stand-in for ``owner`` (an instance of a subclass of its class, so methods and ``super()`` work)
    whose data attributes, its own and its class's, are read through ``reads``."""
    cls, own = type(owner), owner.__dict__

    def __getattribute__(self, name):
        if name.startswith("__"):
            return object.__getattribute__(self, name)
        if name in own:
            return reads.read(SELF, name, own[name])
        for klass in cls.__mro__:
            if name in vars(klass):
                attr = vars(klass)[name]
                if hasattr(type(attr), "__get__"):  # a method or property: it runs on the stand-in
                    return object.__getattribute__(self, name)
                return reads.read(SELF, name, attr)
        return object.__getattribute__(self, name)

    def __setattr__(self, name, value):
        raise Unsupported(f"{cls.__name__}: the step writes self.{name}; a kernel cannot replay writes to the "
                          "optimizer")

    stand_in = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__setattr__": __setattr__,
                                           "__delattr__": lambda self, name: __setattr__(self, name, None),
                                           "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return object.__new__(stand_in)


class Traced:
    """The result of ``trace``: the program, its host function and the reads that key it."""

    def __init__(self, prog: Program, reads: Sequence[tuple]):
        self.prog = prog
        self.reads = list(reads)
        self.host = compile_host(prog)

    def inputs(self, group: dict, owner, step: float, clip: Optional[float]) -> Optional[List[float]]:
        """The host function's inputs for a call, or None when a read value's structure differs from the
        traced one (then this kernel is not the step for this call)."""
        out: List[float] = []
        for source, key, structure in self.reads:
            if source == GROUP:
                value = group.get(key, _MISSING)
            elif source == SELF:
                value = getattr(owner, key, _MISSING)
            elif source == HAS:
                if (key in group) != structure:
                    return None
                continue
            elif source == KEYS:
                if frozenset(group) != structure:
                    return None
                continue
            else:
                value = step if key == "step" else clip
            s, numbers = classify(value)
            if s != structure:
                return None
            out.extend(numbers)
        return out

    def passthrough(self, name: str) -> Optional[int]:
        """The operand index of input ``name`` when the host function only passes it through (no scalar
        arithmetic, no guard reads it): the kernel may then read that value from the device. -1 when no
        operand uses it; None when the host needs its value."""
        prog = self.prog
        node = next(i for i, n in enumerate(prog.scalars) if n[0] == "in" and prog.inputs[n[1]] == name)
        if any(n[0] not in ("in", "const") and node in n[1:] for n in prog.scalars):
            return None
        if any(node in (a, b) for _, a, b, _ in prog.guards):
            return None
        return prog._operand_of.get(node, -1)


def trace(owner, group: dict, arrays: Sequence[str], step: float, clip: Optional[float]) -> Traced:
    """Trace ``owner.step_tensors(ops, group, params, grads, states, steps, clip)`` for one element of each
    of ``arrays`` (``owner.step_array_names(group, param_dtype)``)."""
    prog = Program()
    reads = Reads(prog, type(owner).__name__)
    step_s = reads.read(CALL, "step", step)
    clip_s = reads.read(CALL, "clip", clip) if clip is not None else None
    slots = [Slot(i, prog.load(i)) for i in range(len(arrays))]
    state = dict(zip(arrays[2:], slots[2:]))
    _traced_self(owner, reads).step_tensors(SymOps(prog), TracedGroup(group, reads), [slots[0]], [slots[1]],
                                            [state], [step_s], clip_s)
    prog.final = {s.array: s.cur for s in slots if s.cur != prog.loads[s.array]}
    if 1 in prog.final:
        raise Unsupported("the step writes the gradient")
    return Traced(prog, reads.list)


def group_structure(group: dict) -> tuple:
    """The structure of every key of ``group`` but its tensors (what a failed trace is remembered by)."""
    return tuple(sorted((k, classify(v)[0]) for k, v in group.items() if k != "params"))
