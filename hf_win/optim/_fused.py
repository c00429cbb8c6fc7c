"""The fused path: the same step as foreach, as one fused loop per tensor.

On CPU, ``fused_apply`` runs the C kernel generated from the optimizer's code (``_ckernel.py``: one call
per param group and step; also the default path there). This module's ``torch.compile`` graph serves
``fused=True`` on other devices and on CPU for what that kernel cannot express (LAMB's trust ratio), or
when no C kernel can be built. The rest of this docstring is about the graph.

Nothing here restates the math. The compiled function calls the optimizer's own ``_apply`` (its
``_direction`` and ``_win.accelerate`` / ``_win.vanilla_step``) over the ``FOREACH`` operations; the
compiler fuses the ~15 multi-tensor passes of the eager foreach step into one loop per tensor, which
reads and writes each array once (parameter, gradient, moments, ``x``, ``y``): the memory-bandwidth floor.

How it is compiled, and why:

- **Step-varying scalars are tensors.** The learning rate and the step count enter as 0-dim float64
  tensors, so the bias corrections and the Win coefficients are computed inside the graph from them and
  a scheduler changing ``lr`` every step does not recompile. Every other hyper-parameter (betas, eps,
  weight decay, ...) is a constant of the graph: changing one recompiles.
- **Scalars are computed once per call.** Every tensor scalar handed to an operation is also returned
  by the compiled function, which makes the compiler compute it once into a buffer instead of inlining
  ``pow``/``sqrt`` into the per-element loop (which made the loop compute-bound).
- **Compile time does not grow with the model.** A graph over all ~150 tensors of a ViT takes minutes to
  compile on 2 cores (the scheduler is super-linear in the number of nodes). Instead, parameters are
  viewed as 1-D tensors and stepped in buckets of ``BUCKET`` tensors by one graph with dynamic sizes;
  the last bucket is padded with small scratch tensors, so one compiled graph serves every bucket of
  every model with that optimizer, mode, dtype and device.
- **Calls skip the guarded entry point.** After its first call compiles (or finds) the graph for a
  dtype and device, ``fused_apply`` calls the compiled graph directly: entering through
  ``torch.compile``'s frame (guards over ~50 tensors, ~0.2 ms a call) cost 3 to 5 ms of a ViT-S step.
  See ``_direct_call`` for why that is safe here and when the guarded entry is kept.
- **First steps run eagerly.** A parameter's first step (state creation, SGD's buffer initialisation)
  runs on the foreach path; so do tensors the graph cannot take as flat views (non-contiguous, fewer
  than 2 elements). Results are the same: it is the same code.

The compiled graph is cached per (optimizer class, mode, backend); ``torch.compile``'s guards then
specialise it per dtype, device and constant hyper-parameters. ``compile_counter()`` counts the graphs
compiled so far (tests assert that a cosine schedule compiles once).
"""

from __future__ import annotations

import ctypes
import os
import re
import types
import warnings
from typing import Dict, List, Optional

import torch
from torch import Tensor

from . import _ckernel
from ._ops import _ForeachOps
from ._win import extra_state_keys

#: Tensors per compiled call. Larger buckets amortise the per-call overhead (~0.1 ms) but compile longer.
BUCKET = int(os.environ.get("HF_WIN_FUSED_BUCKET", "8"))
#: ``torch.compile`` backend; ``"inductor"`` generates the fused kernels. Tests may use ``"aot_eager"``.
BACKEND = os.environ.get("HF_WIN_FUSED_BACKEND", "inductor")
_SCRATCH_NUMEL = 2  # padding tensors: dynamic sizes of 0 and 1 would be specialised by the compiler

_COMPILED: Dict[tuple, object] = {}
_WARNED: set = set()
#: Distinct sets of constant hyper-parameters compiled per (optimizer, mode) before falling back.
MAX_VARIANTS = 8
_COUNTS = {"compiles": 0, "calls": 0, "direct_calls": 0}
#: Set to "0" to always call through ``torch.compile``'s guarded entry point (see ``_direct_call``).
DIRECT = os.environ.get("HF_WIN_FUSED_DIRECT", "1") != "0"
_DIRECT: Dict[tuple, object] = {}  # (id(compiled fn), dtype, device, bucket) -> direct caller, or None
_CAPTURED: list = []  # (graph module, compiled callable) of the compile in progress
#: CPU parameter groups use the generated C kernel (``_ckernel.py``) when it can express the step; set
#: ``HF_WIN_FUSED_CPU_KERNEL=0`` to compile them with ``torch.compile`` like other devices.
CPU_KERNEL = os.environ.get("HF_WIN_FUSED_CPU_KERNEL", "1") != "0"
_IMPLS: Dict[type, object] = {}


class _FusedOps(_ForeachOps):
    """``FOREACH`` that also records the tensor scalars it is given (see "computed once" above)."""

    name = "fused"

    def __init__(self):
        self.scalars: List[Tensor] = []

    def _keep(self, s):
        if isinstance(s, Tensor):
            self.scalars.append(s)
        elif isinstance(s, (list, tuple)):
            self.scalars.extend(x for x in s if isinstance(x, Tensor))
        return s

    def mul_(self, xs, scalar):
        _ForeachOps.mul_(xs, self._keep(scalar))

    def div_(self, xs, scalar):
        # Divide by a tensor scalar as multiply by its reciprocal, computed once: a division per element
        # costs more than the memory traffic on CPU. (Within an ulp of the eager division.)
        if isinstance(scalar, Tensor):
            _ForeachOps.mul_(xs, self._keep(1.0 / scalar))
        elif isinstance(scalar, (list, tuple)) and scalar and isinstance(scalar[0], Tensor):
            _ForeachOps.mul_(xs, self._keep([1.0 / s for s in scalar]))
        else:
            _ForeachOps.div_(xs, scalar)

    def add_scalar_(self, xs, scalar):
        _ForeachOps.add_scalar_(xs, self._keep(scalar))

    def add_(self, xs, ys, alpha=1.0):
        _ForeachOps.add_(xs, ys, alpha=self._keep(alpha))

    def scaled(self, xs, scalar):
        return _ForeachOps.scaled(xs, self._keep(scalar))


def _stateless(cls):
    """An object with the optimizer class's methods and attributes but none of an optimizer's state.

    The compiled function calls ``_apply`` on it, so that the compiler traces the optimizer's own code
    without guarding on (or trying to interpret) the ``torch.optim.Optimizer`` instance."""
    namespace = {}
    for klass in reversed(cls.__mro__):
        if klass in (object, torch.optim.Optimizer) or not issubclass(klass, torch.optim.Optimizer):
            continue
        namespace.update({k: v for k, v in vars(klass).items() if not k.startswith("__")})
    return type(f"{cls.__name__}FusedStep", (), namespace)()


def _compiled(cls, mode: str, hyper: dict):
    """The compiled step for these constants, or None when too many variants were compiled already
    (a scheduler changing betas every step, e.g. ``OneCycleLR(cycle_momentum=True)``)."""
    key = (cls, mode, BACKEND, tuple(sorted(hyper.items())))
    fn = _COMPILED.get(key)
    if fn is not None:
        return fn
    if sum(k[:3] == key[:3] for k in _COMPILED) >= MAX_VARIANTS:
        if key[:3] not in _WARNED:
            _WARNED.add(key[:3])
            warnings.warn(
                f"{cls.__name__}(fused=True): hyper-parameters other than lr changed more than {MAX_VARIANTS} "
                "times; each change compiles the step again, so the remaining steps use the foreach path "
                "(same results, slower). Keep betas/eps/weight_decay fixed to keep the fused path.",
                RuntimeWarning,
                stacklevel=4,
            )
        return None
    impl = _impl(cls)

    def fused_step(hyper, params, grads, states, step, lr):
        ops = _FusedOps()
        impl._apply(ops, hyper, params, grads, states, [step] * len(params), lr=lr)
        return ops.scalars

    # A code object of its own per (class, mode, hyper-parameters): torch.compile keeps its cache (and
    # its limit of 8 recompilations) per code object, so optimizers, modes and param groups with other
    # constants do not evict each other's graphs.
    code = fused_step.__code__.replace(co_name=f"hf_win_fused_{cls.__name__}_{mode}_{len(_COMPILED)}")
    fn = types.FunctionType(code, fused_step.__globals__, code.co_name, None, fused_step.__closure__)
    fn = torch.compile(fn, fullgraph=True, dynamic=True, backend=_counting(BACKEND))
    _COMPILED[key] = fn
    return fn


def _counting(backend):
    if backend == "inductor":
        from torch._inductor.compile_fx import compile_fx as inner
    else:
        from torch._dynamo.backends.registry import lookup_backend

        inner = lookup_backend(backend)

    def counted(gm, example_inputs):
        if backend == "inductor":
            # Inputs are built by fused_apply (flat, contiguous, matching sizes): skip the per-call
            # size/stride assertions of the generated wrapper (~40 per call).
            with torch._inductor.config.patch(size_asserts=False):
                compiled = inner(gm, example_inputs)
        else:
            compiled = inner(gm, example_inputs)  # may raise to restart tracing: not counted then
        _COUNTS["compiles"] += 1
        _CAPTURED.append((gm, compiled))
        return compiled

    return counted


def compile_counter() -> Dict[str, int]:
    """Graphs compiled and compiled calls made so far by the fused path (all optimizers); ``direct_calls``:
    those of the calls that skipped ``torch.compile``'s guarded entry point (see ``_direct_call``);
    ``kernel_builds`` / ``kernel_loads`` / ``kernel_calls``: the generated CPU kernels compiled, found in
    the cache, and called."""
    out = dict(_COUNTS)
    out.update({f"kernel_{k}": v for k, v in _ckernel.counters().items()})
    return out


def reset() -> None:
    """Forget the compiled graphs and kernels (built again on next use) and zero the counters."""
    _COMPILED.clear()
    _DIRECT.clear()
    _COUNTS.update(compiles=0, calls=0, direct_calls=0)
    _ckernel.reset()
    torch._dynamo.reset()


_PLACEHOLDER = re.compile(r"l_(?:(params|grads)_(\d+)|states_(\d+)_(\w+)|(step|lr))_")


def _direct_call(gm, compiled):
    """A caller of the compiled graph that skips ``torch.compile``'s per-call machinery (frame
    evaluation, guards over ~50 tensors: ~0.2 ms a call, 19 calls a ViT-S step), or None.

    Safe because ``fused_apply`` builds the inputs itself: 1-D contiguous tensors of >= 2 elements
    (sizes are dynamic in the graph), of the dtype and device the graph was compiled for (one caller
    per dtype/device), hyper-parameters fixed by the cache key. The graph's inputs are mapped from the
    names ``torch.compile`` gives its placeholders (``l_params_3_``, ``l_states_2_exp_avg_``, a size
    symbol ``s12`` before the tensor it sizes); any name not understood means None (guarded path). Not
    used when the compiling call's tensors aliased each other (the graph would then read one for both)."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    getters = []
    for i, name in enumerate(names):
        size_of = None
        if re.fullmatch(r"s\d+", name) and i + 1 < len(names):
            size_of, name = name, names[i + 1]
        m = _PLACEHOLDER.fullmatch(name)
        if m is None:
            return None
        kind, j, sj, key, scalar = m.groups()
        if kind:
            get = (lambda a, k=kind, j=int(j): a[k][j])
        elif sj is not None:
            get = (lambda a, j=int(sj), key=key: a["states"][j][key])
        else:
            if size_of:
                return None
            get = (lambda a, k=scalar: a[k])
        getters.append((lambda a, g=get: g(a).shape[0]) if size_of else get)

    def call(hyper, params, grads, states, step, lr):
        a = {"params": params, "grads": grads, "states": states, "step": step, "lr": lr}
        return compiled(*[g(a) for g in getters])

    return call


class _Scratch:
    """Small tensors padding the last bucket, per (dtype, device): never read back."""

    def __init__(self):
        self._pool = {}

    def get(self, like: Tensor, n: int, keys) -> tuple:
        k = (like.dtype, like.device, n, tuple(keys))
        if k not in self._pool:
            def t():
                return torch.zeros(_SCRATCH_NUMEL, dtype=like.dtype, device=like.device)

            self._pool[k] = ([t() for _ in range(n)], [t() for _ in range(n)], [{key: t() for key in keys} for _ in range(n)])
        return self._pool[k]


_SCRATCH = _Scratch()


def fusable(p: Tensor) -> bool:
    # plain tensors only: a subclass (FSDP2's DTensor) has no single storage to step in place
    return (type(p) in (Tensor, torch.nn.Parameter) and p.layout == torch.strided and p.is_contiguous()
            and p.numel() >= _SCRATCH_NUMEL)


def _flat(t: Tensor) -> Tensor:
    """A 1-D alias of contiguous ``t`` sharing its version counter. ``detach()`` drops the view's
    ``_base``: the compiler would otherwise guard on the base's shape, which differs between tensors."""
    return t.view(-1).detach()


class _Plan:
    """What does not change from step to step for a param group: which parameters the graph can take
    (contiguous, >= 2 elements, contiguous state), their 1-D aliases and those of their state. Rebuilt
    when the parameters or any state tensor change (``load_state_dict``, new parameters)."""

    def __init__(self, params, states, keys):
        self.param_ids = [id(p) for p in params]
        self.sources = [[st[k] for k in keys] for st in states]
        self.eligible = [
            fusable(p) and all(fusable(t) and t.dtype == p.dtype and t.shape == p.shape and t.device == p.device
                               for t in src)
            for p, src in zip(params, self.sources)
        ]
        self.kind = [(p.dtype, p.device) for p in params]
        self.numel = [p.numel() for p in params]
        self.all_cpu = all(p.device.type == "cpu" for p in params)
        self.flat_p = [_flat(p) if ok else None for p, ok in zip(params, self.eligible)]
        self.flat_s = [
            {k: _flat(t) for k, t in zip(keys, src)} if ok else None for src, ok in zip(self.sources, self.eligible)
        ]

    def valid(self, params, states, keys) -> bool:
        if len(params) != len(self.param_ids):
            return False
        for p, pid in zip(params, self.param_ids):
            if id(p) != pid:
                return False
        for st, src in zip(states, self.sources):
            for k, t in zip(keys, src):
                if st[k] is not t:
                    return False
        return True


def _impl(cls):
    impl = _IMPLS.get(cls)
    if impl is None:
        impl = _IMPLS[cls] = _stateless(cls)
    return impl


def kernel_available(group) -> bool:
    """Whether ``fused=None`` (the default) takes the CPU kernel for this group: on CPU, with neither
    ``fused`` nor ``foreach`` set, and ``HF_WIN_FUSED_CPU_KERNEL`` not 0."""
    return CPU_KERNEL and group.get("fused") is None and group.get("foreach") is None


def _kernel_apply(opt, group, plan, params, grads, states, steps, keys, hyper, lr_value, auto=False) -> Optional[List[int]]:
    """The CPU path: every eligible tensor of the group in one call of the generated C kernel (see
    ``_ckernel.py``). Returns the indices left over, or None when the kernel cannot serve this group
    (an operation it cannot express, no C compiler): the caller then uses the compiled graph."""
    rest: List[int] = []
    calls: Dict[tuple, List[int]] = {}
    for i, (ok, kind, g, t) in enumerate(zip(plan.eligible, plan.kind, grads, steps)):
        if ok and t != 1 and kind[0] in _ckernel.DTYPES and g.dtype == kind[0] and type(g) is Tensor \
                and g.is_contiguous() and g.numel() == plan.numel[i]:
            calls.setdefault((t, kind[0]), []).append(i)
        else:
            rest.append(i)
    kernels = {}
    for dtype in {dtype for _, dtype in calls}:  # all of them before any step: never half a group
        try:
            kernels[dtype] = _ckernel.kernel_for(type(opt), _impl(type(opt)), hyper, keys, dtype)
        except _ckernel.Unsupported:
            return None
        except (RuntimeError, OSError) as e:
            if auto:  # the default path: foreach, quietly (fused=None promises nothing)
                return None
            if "ckernel" not in _WARNED:
                _WARNED.add("ckernel")
                warnings.warn(f"fused=True: the CPU kernel could not be built ({e}); using torch.compile instead",
                              RuntimeWarning, stacklevel=4)
            return None
    for (t, dtype), idx in calls.items():
        kernel = kernels[dtype]
        ptrs = []
        for i in idx:
            st = states[i]
            ptrs.append(params[i].data_ptr())
            ptrs.append(grads[i].data_ptr())
            ptrs.extend(st[k].data_ptr() for k in keys)
        numels = (ctypes.c_int64 * len(idx))(*[plan.numel[i] for i in idx])
        _ckernel.call(kernel, (ctypes.c_void_p * len(ptrs))(*ptrs), numels, t, lr_value)
    return rest


def fused_apply(opt, group, params, grads, states, steps, auto: bool = False) -> List[int]:
    """Step the fusable parameters of ``group`` with the generated CPU kernel or the compiled graph;
    return the indices left over.

    ``params``/``grads``/``states``/``steps`` are as given to ``WinOptimizer._apply``. The caller runs
    the left-over indices (first steps, non-contiguous or tiny tensors) on the foreach path. ``auto``
    (``fused=None``): only the CPU kernel, never a ``torch.compile``; everything left over when the
    kernel cannot serve the group."""
    mode = group["acceleration_mode"]
    keys = tuple(opt._state_keys(group)) + tuple(extra_state_keys(mode))
    plans = opt.__dict__.setdefault("_fused_plans", {})
    plan = plans.get(id(group))
    if plan is None or plan.keys != keys or not plan.valid(params, states, keys):
        plan = plans[id(group)] = _Plan(params, states, keys)
        plan.keys = keys
    hyper = {k: v for k, v in group.items() if k not in ("params", "lr", "step")}
    lr_value = float(group["lr"])

    if CPU_KERNEL and plan.all_cpu:
        rest = _kernel_apply(opt, group, plan, params, grads, states, steps, keys, hyper, lr_value, auto)
        if rest is not None:
            return rest
    if auto:
        return list(range(len(params)))

    rest: List[int] = []
    buckets: Dict[tuple, List[int]] = {}
    for i, (ok, kind, g, t) in enumerate(zip(plan.eligible, plan.kind, grads, steps)):
        if ok and t != 1 and g.dtype == kind[0] and g.is_contiguous():
            buckets.setdefault((t,) + kind, []).append(i)
        else:
            rest.append(i)
    if not buckets:
        return rest

    fn = _compiled(type(opt), mode, hyper)
    if fn is None:
        return list(range(len(params)))
    from torch.fx.experimental import _config as fx_config

    saved = fx_config.use_duck_shape, torch._dynamo.config.specialize_float
    fx_config.use_duck_shape = False  # sizes are independent symbols: no guard "tensor 3 == tensor 5"
    torch._dynamo.config.specialize_float = True  # hyper-parameters are constants of the graph
    try:
        for (t, dtype, device), idx in buckets.items():
            scalar_dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
            step = torch.tensor(float(t), dtype=scalar_dtype, device=device)
            lr = torch.tensor(lr_value, dtype=scalar_dtype, device=device)
            flat_p = [plan.flat_p[i] for i in idx]
            flat_s = [plan.flat_s[i] for i in idx]
            flat_g = [_flat(grads[i]) for i in idx]
            for start in range(0, len(idx), BUCKET):
                bp, bg, bs = flat_p[start : start + BUCKET], flat_g[start : start + BUCKET], flat_s[start : start + BUCKET]
                pad = BUCKET - len(bp)
                if pad:
                    sp, sg, ss = _SCRATCH.get(bp[0], pad, keys)
                    bp, bg, bs = bp + sp, bg + sg, bs + ss
                dkey = (id(fn), dtype, device, len(bp))  # (tests change BUCKET)
                direct = _DIRECT.get(dkey)
                if direct is not None:
                    direct(hyper, bp, bg, bs, step, lr)
                    _COUNTS["direct_calls"] += 1
                else:
                    _CAPTURED.clear()
                    fn(hyper, bp, bg, bs, step, lr)
                    if DIRECT and len(_CAPTURED) == 1 and dkey not in _DIRECT:
                        inputs = bp + bg + [t for st in bs for t in st.values()]
                        distinct = len({t.data_ptr() for t in inputs}) == len(inputs)
                        _DIRECT[dkey] = _direct_call(*_CAPTURED[0]) if distinct else None
                    _CAPTURED.clear()
                _COUNTS["calls"] += 1
    finally:
        fx_config.use_duck_shape, torch._dynamo.config.specialize_float = saved
    return rest
