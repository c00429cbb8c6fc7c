"""The ``fused=True`` step on CPU: one C loop over every tensor, generated from the optimizer's own code.

Why not ``torch.compile`` on CPU (it is still used on other devices and as the fallback here): its
kernels are near the memory-bandwidth floor, but a ViT's ~150 tensors need one compiled call per bucket
of tensors (a graph over all of them takes minutes to compile), and each call costs ~0.1 ms of Python
and allocation; per step that was ~2 ms against a ~20 ms fused AdamW step. Here the whole step of a
param group is **one call** into a small shared library, whatever the number and the sizes of the
tensors, so nothing ever recompiles for a new model or a new learning rate.

Nothing restates the math. ``trace`` runs the optimizer's ``_apply`` (its ``_direction`` and
``_win.accelerate`` / ``_win.vanilla_step``) once over symbolic stand-ins:

- each tensor list is one symbolic element (``p[i]``, ``g[i]``, ``exp_avg[i]``, ...); every list
  operation (``ops.mul_``, ``ops.addcmul_``, ...) appends one C statement to the loop body, in the same
  order and with the same operands as the foreach path, so float32 results agree with it to rounding
  (no FMA contraction, no fast-math) and float64 replays the golden trajectories;
- the step count and the learning rate are symbolic scalars: bias corrections and Win coefficients
  become C expressions computed once per call, in double, from the two numbers passed at run time;
  every other hyper-parameter (betas, eps, weight decay, reckless steps) is a constant of the source,
  written exactly (hexadecimal floats).

An optimizer whose direction needs more than elementwise operations (LAMB's per-tensor norms) raises
``Unsupported`` while tracing and takes the ``torch.compile`` path instead.

The source is compiled by the C compiler that ``torch.compile`` also needs on CPU (``$CC``, else
``cc``/``gcc``/``clang``) with ``-O3 -march=native`` into a cache directory (``$HF_WIN_CACHE_DIR``,
default ``~/.cache/hf_win/kernels``), keyed by a hash of the source, the compiler, the flags and the
CPU, and loaded with ``ctypes``: 0.1 to 0.2 s the first time, a load in a later process.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Dict, List, Optional

import torch

__all__ = ["Unsupported", "kernel_for", "counters"]

_COUNTS = {"builds": 0, "loads": 0, "calls": 0}
_LOCK = threading.Lock()
_KERNELS: Dict[tuple, object] = {}
#: Tensors smaller than this are not split between threads.
MIN_SPLIT = 32768


class Unsupported(Exception):
    """The optimizer's step uses an operation the C kernel cannot express (e.g. a norm)."""


def counters() -> Dict[str, int]:
    """Kernels compiled (``builds``), loaded from the cache (``loads``) and calls made."""
    return dict(_COUNTS)


# --------------------------------------------------------------------------------------------- tracing
def _lit(v: float) -> str:
    """An exact C double literal."""
    v = float(v)
    if math.isnan(v):
        return "(0.0/0.0)"
    if math.isinf(v):
        return "(1.0/0.0)" if v > 0 else "(-1.0/0.0)"
    return f"{v.hex()}" if v != int(v) or abs(v) > 2**52 else f"{v!r}"


class _Program:
    def __init__(self, ctype: str):
        self.ctype = ctype
        self.scalar_lines: List[str] = []
        self.body: List[str] = []
        self.n_tmp = 0
        self.n_scalar = 0
        self.float_scalars: Dict[str, str] = {}  # double scalar name -> its cast to the element type

    def scalar(self, expr: str) -> "SymScalar":
        name = f"s{self.n_scalar}"
        self.n_scalar += 1
        self.scalar_lines.append(f"const double {name} = {expr};")
        return SymScalar(self, name)

    def tmp(self, expr: str) -> str:
        name = f"t{self.n_tmp}"
        self.n_tmp += 1
        self.body.append(f"{self.ctype} {name} = {expr};")
        return name

    def operand(self, s) -> str:
        """A scalar operand of an element operation, in the element type (cast once, before the loop)."""
        if isinstance(s, (list, tuple)):
            if not s:
                raise Unsupported("empty scalar list")
            first = s[0]
            if any((x is not first) and not (_is_num(x) and _is_num(first) and float(x) == float(first)) for x in s):
                raise Unsupported("per-tensor scalars that differ")
            s = first
        if isinstance(s, SymScalar):
            if s.name not in self.float_scalars:
                name = f"k{len(self.float_scalars)}"
                self.float_scalars[s.name] = name
                self.scalar_lines.append(f"const {self.ctype} {name} = ({self.ctype}){s.name};")
            return self.float_scalars[s.name]
        if _is_num(s):
            return f"(({self.ctype}){_lit(s)})"
        raise Unsupported(f"scalar of type {type(s).__name__}")

    def reciprocal_operand(self, s) -> str:
        """``1/s`` as an operand: scalar divisions become multiplications (one division per call, not
        per element; within an ulp of the eager division)."""
        if isinstance(s, (list, tuple)):
            s = s[0] if s and all(x is s[0] for x in s) else s
        if isinstance(s, SymScalar):
            return self.operand(1.0 / s)
        if _is_num(s):
            return self.operand(1.0 / float(s))
        return self.operand(s)  # raises Unsupported


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class SymScalar:
    """A step-dependent scalar (from the step count and the learning rate): a C double expression."""

    __slots__ = ("prog", "name")

    def __init__(self, prog: _Program, name: str):
        self.prog, self.name = prog, name

    def _c(self, other) -> str:
        if isinstance(other, SymScalar):
            return other.name
        if _is_num(other):
            return _lit(other)
        raise Unsupported(f"scalar arithmetic with {type(other).__name__}")

    def _bin(self, op, other, reverse=False):
        a, b = (self._c(other), self.name) if reverse else (self.name, self._c(other))
        return self.prog.scalar(f"({a} {op} {b})")

    def __add__(self, o): return self._bin("+", o)
    def __radd__(self, o): return self._bin("+", o, True)
    def __sub__(self, o): return self._bin("-", o)
    def __rsub__(self, o): return self._bin("-", o, True)
    def __mul__(self, o): return self._bin("*", o)
    def __rmul__(self, o): return self._bin("*", o, True)
    def __truediv__(self, o): return self._bin("/", o)
    def __rtruediv__(self, o): return self._bin("/", o, True)
    def __neg__(self): return self.prog.scalar(f"(-{self.name})")
    def __pow__(self, o): return self.prog.scalar(f"pow({self.name}, {self._c(o)})")
    def __rpow__(self, o): return self.prog.scalar(f"pow({self._c(o)}, {self.name})")
    def sqrt(self): return self.prog.scalar(f"sqrt({self.name})")

    def __bool__(self):
        raise Unsupported("a branch on a step-dependent scalar")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = lambda self, o: self.__bool__()  # noqa: E731
    __hash__ = object.__hash__


class SymArray:
    """One symbolic element of a tensor list: ``cur`` is the C variable holding its current value."""

    __slots__ = ("name", "cur", "written", "is_input")

    def __init__(self, name: str, cur: str, is_input: bool):
        self.name, self.cur, self.written, self.is_input = name, cur, False, is_input


class _SymOps:
    """The ``_ops`` vocabulary over symbolic elements: each operation appends C statements."""

    name = "ckernel"

    def __init__(self, prog: _Program):
        self.p = prog

    @staticmethod
    def _one(xs) -> SymArray:
        if len(xs) != 1 or not isinstance(xs[0], SymArray):
            raise Unsupported("a tensor list that is not one symbolic element")
        return xs[0]

    def _set(self, xs, expr: str) -> None:
        x = self._one(xs)
        if x.is_input:
            self.p.body.append(f"{x.cur} = {expr};")
            x.written = True
        else:
            self.p.body.append(f"{x.cur} = {expr};")

    def _new(self, expr: str) -> list:
        return [SymArray("tmp", self.p.tmp(expr), False)]

    def mul_(self, xs, scalar):
        self._set(xs, f"{self._one(xs).cur} * {self.p.operand(scalar)}")

    def div_(self, xs, scalar):
        self._set(xs, f"{self._one(xs).cur} * {self.p.reciprocal_operand(scalar)}")

    def add_scalar_(self, xs, scalar):
        self._set(xs, f"{self._one(xs).cur} + {self.p.operand(scalar)}")

    def add_(self, xs, ys, alpha=1.0):
        y = self._one(ys).cur
        if _is_num(alpha) and float(alpha) == 1.0:
            self._set(xs, f"{self._one(xs).cur} + {y}")
        else:
            self._set(xs, f"{self._one(xs).cur} + {self.p.operand(alpha)} * {y}")

    def sub(self, xs, ys):
        return self._new(f"{self._one(xs).cur} - {self._one(ys).cur}")

    def addcmul_(self, xs, ys, zs, value=1.0):
        x, y, z = self._one(xs).cur, self._one(ys).cur, self._one(zs).cur
        self._set(xs, f"{x} + {self.p.operand(value)} * {y} * {z}")

    def maximum_(self, xs, ys):
        x, y = self._one(xs).cur, self._one(ys).cur
        self._set(xs, f"(({x} != {x} || {y} != {y}) ? {x} + {y} : ({x} > {y} ? {x} : {y}))")

    def sqrt(self, xs):
        fn = "sqrtf" if self.p.ctype == "float" else "sqrt"
        return self._new(f"{fn}({self._one(xs).cur})")

    def reciprocal_(self, xs):
        self._set(xs, f"(({self.p.ctype})1) / {self._one(xs).cur}")

    def mul_tensors_(self, xs, ys):
        self._set(xs, f"{self._one(xs).cur} * {self._one(ys).cur}")

    def div_tensors_(self, xs, ys):
        self._set(xs, f"{self._one(xs).cur} / {self._one(ys).cur}")

    def copy_(self, xs, ys):
        self._set(xs, self._one(ys).cur)

    def clone(self, xs):
        return self._new(self._one(xs).cur)

    def scaled(self, xs, scalar):
        return self._new(f"{self._one(xs).cur} * {self.p.operand(scalar)}")

    def norm(self, xs):
        raise Unsupported("a norm over each tensor (not elementwise)")


_CTYPES = {torch.float32: "float", torch.float64: "double"}
DTYPES = tuple(_CTYPES)


def trace(impl, hyper: dict, state_keys: tuple, dtype: torch.dtype) -> str:
    """C source of one step of ``impl._apply`` for these constants; raises ``Unsupported``."""
    ctype = _CTYPES.get(dtype)
    if ctype is None:
        raise Unsupported(f"dtype {dtype}")
    prog = _Program(ctype)
    prog.scalar_lines += ["const double step = sc[0];", "const double lr_in = sc[1];"]
    step, lr = SymScalar(prog, "step"), SymScalar(prog, "lr_in")
    names = ["param", "grad"] + [f"state_{k}" for k in state_keys]
    arrays = [SymArray(n, f"v{i}", True) for i, n in enumerate(names)]
    p, g = arrays[0], arrays[1]
    states = [dict(zip(state_keys, arrays[2:]))]
    impl._apply(_SymOps(prog), hyper, [p], [g], states, [step], lr=lr)

    a = len(arrays)
    ks = list(prog.float_scalars.values())
    loads = "\n".join(f"        {ctype} v{i} = a{i}[i];" for i in range(a))
    stores = "\n".join(f"        a{i}[i] = v{i};" for i, x in enumerate(arrays) if x.written)
    body = "\n".join(f"        {line}" for line in prog.body)
    # restrict-qualified parameters (not locals): compilers honour them, so the loop is vectorised
    # without run-time alias checks (too many arrays for those: gcc then gives up vectorising).
    params = ", ".join(
        [f"{'' if x.written else 'const '}{ctype} *restrict a{i}" for i, x in enumerate(arrays)]
        + [f"const {ctype} {k}" for k in ks]
    )
    args = ", ".join([f"({ctype} *)ptrs[j * {a} + {i}] + lo" for i in range(a)] + ks)
    loop = f"""    for (int64_t i = 0; i < n; i++) {{
{loads}
{body}
{stores}
    }}"""
    scalars = "\n".join(f"    {line}" for line in prog.scalar_lines)
    return f"""/* hf_win fused step: {', '.join(names)} ({ctype}). Generated by hf_win/optim/_ckernel.py. */
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static void tensor_step(const int64_t n, {params}) {{
{loop}
}}

/* Threads (torch.get_num_threads()) each take one contiguous slice of every tensor: elementwise, so
   no synchronisation between tensors; one parallel region per call. */
void hf_win_step(int64_t n_tensors, void **ptrs, const int64_t *numel, const double *sc, int n_threads) {{
{scalars}
#ifdef _OPENMP
#pragma omp parallel num_threads(n_threads) if (n_threads > 1)
#endif
    {{
#ifdef _OPENMP
        const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int64_t tid = 0, nt = 1;
#endif
        for (int64_t j = 0; j < n_tensors; j++) {{
            const int64_t n = numel[j];
            int64_t lo = 0, hi = n;
            if (nt > 1 && n < {MIN_SPLIT}) {{  /* small tensors whole, round robin */
                if (j % nt != tid) continue;
            }} else if (nt > 1) {{
                const int64_t chunk = ((n + nt - 1) / nt + 15) / 16 * 16;
                lo = tid * chunk < n ? tid * chunk : n;
                hi = lo + chunk < n ? lo + chunk : n;
            }}
            if (lo < hi)
                tensor_step(hi - lo, {args});
        }}
    }}
}}
"""


# --------------------------------------------------------------------------------------------- building
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
          "-fPIC", "-shared", "-std=c99"]


def _compiler() -> Optional[str]:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _cpu_id() -> str:
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name", "Features")):
                    text += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return text


def cache_dir() -> str:
    base = os.environ.get("HF_WIN_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "hf_win")
    return os.path.join(base, "kernels")


class _Kernel:
    def __init__(self, lib_path: str):
        self.lib = ctypes.CDLL(lib_path)
        self.fn = self.lib.hf_win_step
        self.fn.restype = None
        self.fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        self.path = lib_path


def build(source: str) -> _Kernel:
    """Compile (or find in the cache) and load ``source``; raises ``RuntimeError`` when it cannot."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    key = hashlib.sha256("\0".join([source, cc, " ".join(_FLAGS), _cpu_id(), sys.platform]).encode()).hexdigest()[:32]
    directory = cache_dir()
    lib = os.path.join(directory, f"hf_win_{key}.so")
    if os.path.exists(lib):
        _COUNTS["loads"] += 1
        return _Kernel(lib)
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src = os.path.join(tmp, "step.c")
        with open(src, "w") as f:
            f.write(source)
        out = os.path.join(tmp, "step.so")
        proc = subprocess.run([cc, *_FLAGS, "-fopenmp", src, "-o", out, "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:  # no OpenMP (e.g. Apple clang): one thread
            proc = subprocess.run([cc, *_FLAGS, src, "-o", out, "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed to compile the fused step:\n{proc.stderr[-2000:]}")
        os.replace(out, lib)  # atomic: concurrent processes see a whole library or none
    _COUNTS["builds"] += 1
    return _Kernel(lib)


def kernel_for(cls, impl, hyper: dict, state_keys: tuple, dtype: torch.dtype):
    """The loaded kernel for this optimizer class, constants and dtype (cached in the process).

    Raises ``Unsupported`` when the step cannot be expressed, ``RuntimeError`` or ``OSError`` when it
    cannot be built or loaded."""
    key = (cls, tuple(sorted((k, repr(v)) for k, v in hyper.items())), state_keys, dtype)
    k = _KERNELS.get(key)
    if isinstance(k, Exception):
        raise k
    if k is None:
        with _LOCK:
            try:
                k = build(trace(impl, hyper, state_keys, dtype))
            except (Unsupported, RuntimeError, OSError) as e:  # remembered: not retried every step
                _KERNELS[key] = e
                raise
            _KERNELS[key] = k
    return k


def call(kernel: _Kernel, ptrs, numels, step: float, lr: float) -> None:
    """Run one step over ``len(numels)`` tensors; ``ptrs``: data pointers, tensor-major."""
    n = len(numels)
    sc = (ctypes.c_double * 2)(float(step), float(lr))
    kernel.fn(n, ptrs, numels, sc, torch.get_num_threads())
    _COUNTS["calls"] += 1


def reset() -> None:
    _KERNELS.clear()
    _COUNTS.update(builds=0, loads=0, calls=0)
