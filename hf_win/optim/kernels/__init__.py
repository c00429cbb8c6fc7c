"""Fused optimizer steps: the step traced (``tracing``) into one description (``ir``), scheduled
(``schedule``) and printed by two emitters (``c`` for CPU, ``triton`` for CUDA); a cache that trusts
nothing (``cache``). ``_dispatch`` only asks this module for a kernel (``find``) and for the backend of a
device (``backend_for``).

What ``find`` needs of an optimizer (the ``Steppable`` protocol, which ``WinOptimizer`` implements):
``step_array_names(group, param_dtype)``, the names of the arrays a parameter is stepped through, and
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

import contextlib
import logging
import os
import threading
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from .cache import KernelUnavailable
from .ir import Unsupported
from .tracing import group_structure, trace

__all__ = ["BACKENDS", "Steppable", "backend_setting", "backend_for", "find", "launch", "Fallback", "counters", "reset",
           "log_once", "collect", "broken"]

logger = logging.getLogger("hf_win.kernels")
BACKENDS = ("auto", "c", "triton", "foreach")
_LOCK = threading.RLock()
_VARIANTS: Dict[tuple, list] = {}
_FAILED: Dict[tuple, str] = {}
_BROKEN: Dict[int, str] = {}  # id(kernel) -> why it may not run any more
_KEEP: list = []
_LOGGED: set = set()
_COUNTS = {"kernels": 0, "traces": 0, "calls": 0}
_COLLECTING: List[list] = []  # open ``collect`` lists: kernels built are appended, launches are skipped


class Fallback(Exception):
    """No kernel for this call; ``str(e)`` is the reason in words."""


class Steppable(Protocol):
    """What ``find`` traces: an optimizer's step over lists of tensors, written with the ``_ops`` vocabulary."""

    def step_array_names(self, group: dict, param_dtype: torch.dtype) -> Sequence[str]:
        """``["param", "grad", *state buffers]``: the arrays of a ``param_dtype`` parameter, in order."""

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


def _clip_for_host(traced, clip, backend: str):
    """(the clip value the host function gets, the operand slot the kernel fills from the device). A
    Triton kernel reads a passed-through coefficient from the device (no host-device synchronisation);
    otherwise the host needs its value."""
    if clip is None:
        return None, None
    slot = traced.passthrough("clip") if backend == "triton" and isinstance(clip, torch.Tensor) else None
    if slot is not None:
        return 1.0, (slot if slot >= 0 else None)
    return float(clip), None


def _operands(traced, group, optimizer, step, clip, backend):
    """(the kernel's operands for this call, or None when ``traced`` is not the step for it; the clip slot)."""
    value, slot = _clip_for_host(traced, clip, backend)
    inputs = traced.inputs(group, optimizer, step, value)
    if inputs is None:
        return None, None
    try:
        return traced.host(inputs), slot
    except ArithmeticError as e:
        raise Fallback(f"a step scalar could not be computed ({e})") from None


def _prepare(kernel, device, name: str, backend: str) -> None:
    """Compile (and load) ``kernel`` for ``device`` now, before any tensor of the step is touched."""
    if _BROKEN.get(id(kernel)):
        raise Fallback(_BROKEN[id(kernel)])
    prepare = getattr(kernel, "prepare", None)
    if prepare is None or device is None:
        return
    try:
        prepare(device)
    except Exception as e:  # the compiler's or the loader's error, whatever its type
        reason = f"{name}: the {backend} kernel could not be compiled for {device} ({type(e).__name__}: {e})"
        broken(kernel, reason)
        raise Fallback(reason) from None


def find(optimizer: Steppable, group: dict, arrays: List[str], dtypes: List[torch.dtype], rounding: List[bool],
         backend: str, step: int, clip=None, device=None):
    """``(kernel, operands, clip_slot)`` for one call, building the kernel at most once per structure and
    guards and compiling it for ``device`` before it is returned. ``clip``: None, a number or a 0-dim
    tensor; ``clip_slot``: the operand the kernel reads from that tensor on the device (else None).
    Raises ``Fallback`` with the reason when there is none."""
    key = (type(optimizer), tuple(arrays), tuple(dtypes), tuple(rounding), backend, clip is not None)
    name = type(optimizer).__name__
    for traced, kernel in _VARIANTS.get(key, ()):
        operands, slot = _operands(traced, group, optimizer, step, clip, backend)
        if operands is not None:
            _prepare(kernel, device, name, backend)
            return _found(kernel), operands, slot
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
            on_device = backend == "triton" and isinstance(clip, torch.Tensor)
            host_clip = None if clip is None else 1.0 if on_device else float(clip)
            traced = trace(optimizer, group, arrays, step, host_clip)
            if on_device and traced.passthrough("clip") is None:  # the host needs the value: a guard must see it
                traced = trace(optimizer, group, arrays, step, float(clip))
            kernel = _build(backend, traced.prog, dtypes, rounding)
        except Unsupported as e:
            reason = f"{name}: the step cannot be fused ({e})"
            _FAILED[whole] = reason
            raise Fallback(reason) from None
        except (KernelUnavailable, OSError, RuntimeError, ImportError) as e:
            reason = f"{name}: the {backend} kernel is unavailable ({e})"
            _FAILED[whole] = reason
            raise Fallback(reason) from None
        _COUNTS["kernels"] += 1
        _VARIANTS.setdefault(key, []).append((traced, kernel))
        operands, slot = _operands(traced, group, optimizer, step, clip, backend)
        if operands is None:  # pragma: no cover - the trace took the branches these values take
            raise Fallback("internal: a fresh kernel's guards do not hold")
        _prepare(kernel, device, name, backend)
        return _found(kernel), operands, slot


def broken(kernel, reason: str) -> None:
    """From now on ``find`` falls back instead of returning ``kernel`` (it failed to compile or launch)."""
    with _LOCK:
        _BROKEN[id(kernel)] = reason
        _KEEP.append(kernel)  # its id stays unique while the process lives


def _found(kernel):
    for found in _COLLECTING:
        if all(k is not kernel for k in found):
            found.append(kernel)
    return kernel


def launch(kernel, ptrs: List[int], numels: List[int], keys: List[int], scalars: List[float], device,
           device_scalars: Optional[dict] = None, sync=None) -> None:
    """Run ``kernel`` over tensors (see ``CKernel.run``); ``device_scalars``: operand slot -> 0-dim tensor
    read on the device (Triton only); ``sync`` for sharded tensors whose step takes norms. Counted in
    ``counters()["calls"]``."""
    if _COLLECTING:
        return
    if device_scalars:
        kernel.run(ptrs, numels, keys, scalars, device, device_scalars, sync=sync)
    else:
        kernel.run(ptrs, numels, keys, scalars, device, sync=sync)
    _COUNTS["calls"] += 1


@contextlib.contextmanager
def collect():
    """Inside: kernels are found and built as usual but never launched (steps change no tensor); yields
    the list of kernels found (built or reused). How ``aot`` learns every kernel a configuration generates."""
    found: list = []
    with _LOCK:
        _COLLECTING.append(found)
    try:
        yield found
    finally:
        with _LOCK:
            _COLLECTING.remove(found)


def counters() -> Dict[str, int]:
    """``kernels`` built or loaded in this process, ``traces`` made, kernel ``calls``."""
    return dict(_COUNTS)


def reset() -> None:
    """Forget every kernel, failure and logged reason (tests)."""
    with _LOCK:
        _VARIANTS.clear()
        _FAILED.clear()
        _BROKEN.clear()
        _KEEP.clear()
        _LOGGED.clear()
        _COUNTS.update(kernels=0, traces=0, calls=0)
