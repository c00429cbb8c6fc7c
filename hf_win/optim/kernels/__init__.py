"""Fused optimizer steps: the step traced (``tracing``) into one description (``ir``), scheduled
(``schedule``) and printed by two emitters (``c`` for CPU, ``triton`` for CUDA); a cache that trusts
nothing (``cache``). ``_dispatch`` only asks this module for a kernel (``find``) and for the backend of a
device (``backend_for``).

What ``find`` needs of an optimizer (the ``Steppable`` protocol, which ``WinOptimizer`` implements):
``step_array_names(group)``, the names of the arrays each parameter is stepped through, and
``step_tensors(ops, group, params, grads, states, steps, clip)``, its step over the ``_ops`` vocabulary.

Kernels are shared by every instance of an optimizer class in the process. One is keyed by the class,
the arrays and their dtypes, which arrays are stochastically rounded, the backend and whether the
optimizer clips; within that, by what its trace read (``tracing``: the structure of every group key and
attribute of the optimizer the step read, and the guards of its branches). Numbers, from the group or
from the optimizer's attributes, are never part of a key: they are inputs of every call. At most ``$HF_WIN_MAX_KERNELS`` (default 512) kernels are built
per process; past that a group runs on foreach, with one warning. (Every C kernel is a library mapped into
the process: some 13,000 of them exhausted Linux's default ``vm.max_map_count`` and aborted it. A
training run needs a handful: one per optimizer structure and dtype combination, two for SGD.)

``$HF_WIN_FUSED_BACKEND``: ``auto`` (default: the C kernel for CPU tensors, Triton for CUDA tensors
where ``triton`` imports), ``c``, ``triton`` (also for CPU tensors, which only Triton's interpreter,
``TRITON_INTERPRET=1``, can run: that is how the tests check it) or ``foreach`` (no kernel).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from .cache import KernelUnavailable
from .ir import Unsupported
from .tracing import group_structure, trace

__all__ = ["BACKENDS", "Steppable", "backend_setting", "backend_for", "find", "launch", "Fallback", "counters", "reset",
           "log_once"]

logger = logging.getLogger("hf_win.kernels")
BACKENDS = ("auto", "c", "triton", "foreach")
_LOCK = threading.RLock()
_VARIANTS: Dict[tuple, list] = {}
_FAILED: Dict[tuple, str] = {}
_LOGGED: set = set()
_COUNTS = {"kernels": 0, "traces": 0, "calls": 0}


class Fallback(Exception):
    """No kernel for this call; ``str(e)`` is the reason in words."""


class Steppable(Protocol):
    """What ``find`` traces: an optimizer's step over lists of tensors, written with the ``_ops`` vocabulary."""

    def step_array_names(self, group: dict) -> Sequence[str]:
        """``["param", "grad", *state buffers]``: the arrays of each parameter, in order."""

    def step_tensors(self, ops, group, params, grads, states, steps, clip) -> None:
        """One step of ``params`` (``states``: one dict of buffers per parameter)."""


def max_kernels() -> int:
    raw = os.environ.get("HF_WIN_MAX_KERNELS", "512")
    try:
        return max(0, int(raw))
    except ValueError:
        raise ValueError(f"HF_WIN_MAX_KERNELS must be a whole number >= 0, got {raw!r}") from None


def backend_setting() -> str:
    value = os.environ.get("HF_WIN_FUSED_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"HF_WIN_FUSED_BACKEND must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


def log_once(reason: str) -> None:
    """Log a fallback's reason once per process (logger ``hf_win.kernels``, level WARNING)."""
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        logger.warning("hf_win: %s", reason)


def _triton_error() -> Optional[str]:
    try:
        from . import triton as _t  # noqa: F401
    except Exception as e:  # ImportError, or a triton too old for the kernel
        return f"triton does not import ({type(e).__name__}: {e})"
    return None


def backend_for(device: torch.device) -> Tuple[Optional[str], str]:
    """(``"c"`` / ``"triton"`` / None, the reason when None) for tensors on ``device``."""
    setting = backend_setting()
    if setting == "foreach":
        return None, "HF_WIN_FUSED_BACKEND=foreach"
    if setting == "triton" or (setting == "auto" and device.type == "cuda"):
        if device.type not in ("cuda", "cpu"):
            return None, f"no kernel for {device.type} tensors"
        err = _triton_error()
        return (None, err) if err else ("triton", "")
    if device.type == "cpu":
        return "c", ""
    if setting == "c":
        return None, f"HF_WIN_FUSED_BACKEND=c runs on CPU tensors only, these are on {device.type}"
    return None, f"no kernel for {device.type} tensors"


def c_compiler_missing() -> str:
    """Why no C kernel can be built here ('' when a compiler is found)."""
    from . import cache

    try:
        cache.compiler()
    except KernelUnavailable as e:
        return str(e)
    return ""


def _build(backend: str, prog, dtypes, rounding):
    if backend == "c":
        from .c import CKernel
        return CKernel(prog, dtypes, rounding)
    from .triton import TritonKernel
    return TritonKernel(prog, dtypes, rounding)


def find(optimizer: Steppable, group: dict, arrays: List[str], dtypes: List[torch.dtype], rounding: List[bool],
         backend: str, step: int, clip: Optional[float]):
    """``(kernel, operands)`` for one call, building the kernel at most once per structure and guards.
    Raises ``Fallback`` with the reason when there is none."""
    key = (type(optimizer), tuple(arrays), tuple(dtypes), tuple(rounding), backend, clip is not None)
    for traced, kernel in _VARIANTS.get(key, ()):
        inputs = traced.inputs(group, optimizer, step, clip)
        if inputs is None:
            continue
        try:
            operands = traced.host(inputs)
        except ArithmeticError as e:
            raise Fallback(f"a step scalar could not be computed ({e})") from None
        if operands is not None:
            return kernel, operands
    whole = (key, group_structure(group))
    with _LOCK:
        if whole in _FAILED:
            raise Fallback(_FAILED[whole])
        try:
            if _COUNTS["kernels"] >= max_kernels():
                raise Fallback(
                    f"{_COUNTS['kernels']} kernels were built in this process, the bound "
                    f"(HF_WIN_MAX_KERNELS={max_kernels()}); further step structures run on foreach")
            _COUNTS["traces"] += 1
            traced = trace(optimizer, group, arrays, step, clip)
            kernel = _build(backend, traced.prog, dtypes, rounding)
        except Unsupported as e:
            reason = f"{type(optimizer).__name__}: the step cannot be fused ({e})"
            _FAILED[whole] = reason
            raise Fallback(reason) from None
        except (KernelUnavailable, OSError, RuntimeError, ImportError) as e:
            reason = f"{type(optimizer).__name__}: the {backend} kernel is unavailable ({e})"
            _FAILED[whole] = reason
            raise Fallback(reason) from None
        _COUNTS["kernels"] += 1
        _VARIANTS.setdefault(key, []).append((traced, kernel))
        operands = traced.host(traced.inputs(group, optimizer, step, clip))
        if operands is None:  # pragma: no cover - the trace took the branches these values take
            raise Fallback("internal: a fresh kernel's guards do not hold")
        return kernel, operands


def launch(kernel, ptrs: List[int], numels: List[int], keys: List[int], scalars: List[float], device,
           sync=None) -> None:
    """Run ``kernel`` over tensors (see ``CKernel.run``; ``sync`` for sharded tensors whose step takes
    norms); counted in ``counters()["calls"]``."""
    kernel.run(ptrs, numels, keys, scalars, device, sync=sync)
    _COUNTS["calls"] += 1


def counters() -> Dict[str, int]:
    """``kernels`` built or loaded in this process, ``traces`` made, kernel ``calls``."""
    return dict(_COUNTS)


def reset() -> None:
    """Forget every kernel, failure and logged reason (tests)."""
    with _LOCK:
        _VARIANTS.clear()
        _FAILED.clear()
        _LOGGED.clear()
        _COUNTS.update(kernels=0, traces=0, calls=0)
