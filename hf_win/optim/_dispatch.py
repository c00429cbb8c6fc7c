"""Which path steps a param group's tensors, and why; then running it. The one place that decides.

``WinOptimizer.step`` calls ``decide`` for each param group (on the tensors it steps) and ``run`` with the
``Plan`` it returns; ``WinOptimizer.step_path`` reports the plans' ``paths`` of the last step, and before the
first step ``predict``, which is ``decide`` on the group's parameters without building a kernel.

The rules, in order:

1. A group asks for a kernel with ``fused=True``, and by default (``fused=None`` with ``foreach=None``);
   ``foreach=True/False`` or ``fused=False`` ask for an eager path (``kernel_requested``).
2. Each parameter whose tensors (parameter, gradient, state) a kernel cannot take goes to the eager path,
   with the reason (``unfused_reason``: not one local strided storage, empty, layouts that differ). DTensor
   (FSDP2) tensors sharded alike are taken as their local shards (``_sharding.local_shards``; an empty
   local shard too, so that every process makes the same kernel calls), and a kernel call over them sums
   its norms over the processes (``_sharding.sum_over_shards``).
3. The rest is split into partitions of one device, one dtype per array and one step count; each gets the
   backend of its device (``kernels.backend_for``) and a kernel (``kernels.find``), or falls back with the
   reason. Every kernel is obtained before any runs, so a failure never leaves a tensor stepped twice.
4. What is left runs on one eager call: foreach where every tensor is strided and on one device (or
   ``foreach=True``), else one tensor at a time. Arithmetic is in the compute dtype (``_precision``),
   results are written back by ``_rounding.write_back_arrays``.

Every fallback the user did not ask for is logged once with its reason (``kernels.log_once``).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import _rounding, _sharding, kernels
from ._ops import FOREACH, PER_TENSOR
from ._precision import compute_dtype, stochastic_arrays

__all__ = ["Plan", "kernel_requested", "eager_path", "unfused_reason", "names_by_dtype", "decide", "predict", "run",
           "Reuse"]


def kernel_requested(group: dict) -> bool:
    """Whether ``group`` asks for a kernel (``fused=True``, or ``fused=None`` with ``foreach=None``)."""
    return bool(group.get("fused")) or (group.get("fused") is None and group.get("foreach") is None)


def eager_path(group: dict, params) -> str:
    """``"foreach"`` or ``"per-tensor"`` for ``params``: the group's ``foreach`` flag, else foreach wherever
    every tensor is a strided tensor on one device."""
    flag = group.get("foreach")
    if flag is not None:
        return "foreach" if flag else "per-tensor"
    if not params:
        return "per-tensor"
    device = params[0].device
    return "foreach" if all(p.layout == torch.strided and p.device == device for p in params) else "per-tensor"


def names_by_dtype(opt, group: dict, dtypes: list) -> dict:
    """``{dtype: opt.step_array_names(group, dtype)}`` for the distinct ``dtypes`` (a parameter's array names
    follow its dtype: the form of the Win sequences), worked out once per dtype."""
    return {d: opt.step_array_names(group, d) for d in set(dtypes)}


def _strides(t: Tensor) -> tuple:
    """The strides that matter for the order of elements in memory (those of dimensions of size > 1)."""
    return tuple(st for s, st in zip(t.shape, t.stride()) if s > 1)


def unfused_reason(ts) -> str:
    """Why the tensors of one parameter (param, grad, state...) cannot go to a kernel, or ''."""
    p = ts[0]
    if type(p) not in (Tensor, torch.nn.Parameter) or p.layout != torch.strided:
        return f"{type(p).__name__} parameters (no single local storage) are not fused"
    shape, device = p.shape, p.get_device()
    if all(t.is_contiguous() and t.shape == shape and t.get_device() == device for t in ts):
        return "" if p.numel() else "empty parameters are not fused"  # the common case, checked fast
    if p.numel() == 0:
        return "empty parameters are not fused"
    for t in ts:
        if t.device != p.device or t.shape != p.shape:
            return "a gradient or state tensor whose device or shape differs from its parameter's is not fused"
        if _strides(t) != _strides(p) or not _rounding.is_dense(t):
            return ("tensors whose parameter, gradient and state differ in memory layout (e.g. channels_last "
                    "parameters with contiguous gradients) or have gaps are not fused")
    return ""


class Plan:
    """One param group's step: ``launches`` (kernel, tensor indices, scalars, device, the scalars read on the
    device as {operand slot: 0-dim tensor}, the all-reduce of sharded norms or None), the indices left to
    the eager path (``eager``, run as ``eager_path``) and ``paths``, what runs in words (the kernel first,
    then each fallback as ``"<eager path> (<reason>)"``), as ``step_path`` reports them."""

    __slots__ = ("launches", "eager", "eager_path", "paths", "local")

    def __init__(self):
        self.launches: list = []
        self.local: dict = {}  # index -> the local shards a kernel steps for a DTensor parameter
        self.eager: List[int] = []
        self.eager_path = ""
        self.paths: List[str] = []

    def _fallback(self, label: str) -> None:
        if label not in self.paths:
            self.paths.append(label)


def decide(opt, group: dict, tensors: list, names: list, steps: list, clip: Optional[Tensor],
           build: bool = True) -> Plan:
    """The plan for ``tensors`` (per stepped parameter: param, grad, state buffers, named by ``names``,
    that parameter's ``opt.step_array_names(group, dtype)``) at ``steps``. ``build=False`` (``predict``): no
    kernel is built and nothing logged; a partition whose backend is present counts as the kernel."""
    plan = Plan()
    name = type(opt).__name__
    if kernel_requested(group):
        if clip is not None and _sharding.is_dtensor(clip):  # FSDP2: the kernels read the replicated value
            clip = clip.full_tensor()
        parts: dict = {}
        for i, ts in enumerate(tensors):
            sharding = None  # (mesh, placements) of a DTensor parameter stepped on its local shards
            if _sharding.is_dtensor(ts[0]):
                local, why = _sharding.local_shards(ts)
                if local is not None:
                    sharding = (ts[0].device_mesh, ts[0].placements)
                    ts = plan.local[i] = local
                    why = unfused_reason(ts) if ts[0].numel() else ""
            else:
                why = unfused_reason(ts)
            if why:
                eager = eager_path(group, [ts[0]])
                if build:
                    kernels.log_once(f"{name}: {why}; those tensors run on {eager}")
                plan.eager.append(i)
                plan._fallback(f"{eager} ({why})")
                continue
            parts.setdefault((ts[0].device, tuple(t.dtype for t in ts), tuple(names[i]), steps[i], sharding),
                             []).append(i)
        for (device, dtypes, arrays, step, sharding), idx in parts.items():
            backend, why = kernels.backend_for(device)
            rounding = stochastic_arrays(group, dtypes)
            try:
                if backend is None:
                    raise kernels.Fallback(why)
                if not build:
                    missing = kernels.c_compiler_missing() if backend == "c" else ""
                    if missing:
                        raise kernels.Fallback(missing)
                else:
                    kernel, operands, clip_slot = kernels.find(opt, group, list(arrays), list(dtypes), rounding,
                                                               backend, step, clip, device)
            except kernels.Fallback as e:
                reason, eager = str(e), eager_path(group, [tensors[i][0] for i in idx])
                if build and kernels.backend_setting() != "foreach":  # a fallback the user did not ask for
                    kernels.log_once(f"{reason}; the step runs on {eager} instead")
                plan.eager.extend(idx)
                plan.paths.append(f"{eager} ({reason})")
                continue
            if build:
                seed = int(group.get("rounding_seed", 0))
                streams = [_rounding.stream(seed, step, a) for a, on in enumerate(rounding) if on]
                sync = _sharding.sum_over_shards(tensors[idx[0]][0]) if sharding is not None else None
                plan.launches.append((kernel, idx, list(operands) + streams, device,
                                      {} if clip_slot is None else {clip_slot: clip}, sync))
            if f"{backend} kernel" not in plan.paths:
                plan.paths.insert(0, f"{backend} kernel")
        plan.eager.sort()
    else:
        plan.eager = list(range(len(tensors)))
    if plan.eager:
        plan.eager_path = eager_path(group, [tensors[i][0] for i in plan.eager])
        if not plan.paths:
            plan.paths.append(plan.eager_path)
    return plan


def predict(opt, group: dict) -> List[str]:
    """The paths ``group``'s next step will take, from its parameters alone (``step_path`` before the
    first step)."""
    params = group["params"]
    kinds = names_by_dtype(opt, group, [p.dtype for p in params])
    names = [kinds[p.dtype] for p in params]
    plan = decide(opt, group, [[p] for p in params], names, [0] * len(params), None, build=False)
    return plan.paths or [eager_path(group, params)]


def run(opt, group: dict, plan: Plan, tensors: list, names: list, steps: list, pids: list,
        clip: Optional[Tensor]) -> None:
    """Step ``tensors`` as ``plan`` says. ``pids``: each parameter's index among all the optimizer's
    parameters (the stochastic rounding's ``tensor``)."""
    for n, (kernel, idx, scalars, device, on_device, sync) in enumerate(plan.launches):
        stepped = [plan.local.get(i, tensors[i]) for i in idx]
        ptrs = [t.data_ptr() for ts in stepped for t in ts]
        try:
            kernels.launch(kernel, ptrs, [ts[0].numel() for ts in stepped], [pids[i] for i in idx], scalars, device,
                           on_device, sync=sync)
        except Exception as e:  # a launch that failed: this call and the rest go to the eager path
            _launch_failed(opt, group, plan, tensors, kernel, n, e)
            break
    if not plan.eager:
        return
    rest = plan.eager
    if len(rest) != len(tensors):
        tensors, names = [tensors[i] for i in rest], [names[i] for i in rest]
        steps, pids = [steps[i] for i in rest], [pids[i] for i in rest]
    _eager(opt, group, plan.eager_path, tensors, names, steps, pids, clip)


def _eager(opt, group: dict, path: str, tensors: list, names: list, steps: list, pids: list,
           clip: Optional[Tensor]) -> None:
    if path == "foreach":
        run_eager(opt, group, tensors, names, steps, pids, clip, FOREACH)
    else:
        for i in range(len(tensors)):
            run_eager(opt, group, tensors[i : i + 1], names[i : i + 1], steps[i : i + 1], pids[i : i + 1], clip,
                      PER_TENSOR)


def _launch_failed(opt, group: dict, plan: Plan, tensors: list, kernel, n: int, error: Exception,
                   rest: Optional[List[int]] = None) -> None:
    """Launch ``n`` of ``plan`` raised: its tensors and those of the later launches (``rest``; none of
    them touched: every table is built before a kernel's first launch) join the eager ones; the kernel is
    not used again (``kernels.broken``); logged once, reported by ``step_path``."""
    if rest is None:
        rest = sorted(i for launch in plan.launches[n:] for i in launch[1])
    reason = f"{type(opt).__name__}: the {kernel.backend} kernel failed to launch ({type(error).__name__}: {error})"
    kernels.broken(kernel, reason)
    eager = eager_path(group, [tensors[i][0] for i in rest])
    kernels.log_once(f"{reason}; the step runs on {eager} instead")
    plan.launches = plan.launches[:n]
    plan.eager = sorted(plan.eager + rest)
    plan.eager_path = eager_path(group, [tensors[i][0] for i in plan.eager])
    plan._fallback(f"{eager} ({reason})")


def run_eager(opt, group: dict, tensors: list, names: list, steps: list, pids: list, clip: Optional[Tensor],
              ops) -> None:
    """One eager call of ``opt.step_tensors`` over ``tensors`` (named by ``names``, one list per parameter)
    with ``ops`` (``FOREACH`` or ``PER_TENSOR``). Low-precision tensors are upcast to the compute dtype and
    the results written back (stochastically rounded where ``stochastic_arrays`` says)."""
    compute = [compute_dtype([t.dtype for t in a]) for a in tensors]
    work = [[t if t.dtype == c else t.to(c) for t in a] for a, c in zip(tensors, compute)]
    if clip is not None:
        clip = clip.to(tensors[0][0].device)
    opt.step_tensors(ops, group, [w[0] for w in work], [w[1] for w in work],
                     [dict(zip(n[2:], w[2:])) for n, w in zip(names, work)], steps, clip)
    seed = int(group.get("rounding_seed", 0))
    for a, w, step, pid in zip(tensors, work, steps, pids):
        _rounding.write_back_arrays(a, w, stochastic_arrays(group, [t.dtype for t in a]), seed, step, pid)


class Reuse:
    """What a group's last all-kernel step worked out, for the next step to reuse while nothing it depends
    on changed: the same param group, parameter list and state dict objects, a group that still asks for a
    kernel under the same ``HF_WIN_FUSED_BACKEND``, the same parameters with a gradient, the same array
    names (mode, amsgrad, ...), and per parameter (``signature``) the same
    address, element count and dtype of the parameter (which set its array names), the same memory layout
    of the parameter and its gradient and the same addresses of its state buffers (replaced ``.data``,
    ``model.to()`` or a loaded state dict move one). Gradients may move between steps (``zero_grad(set_to_none=True)``): their addresses are
    read at every step (torch guarantees a gradient's shape, dtype and device are its parameter's). The
    group's numbers (lr, betas, ...) are read at every step too: ``kernels.find`` turns them into the
    kernel's operands, per partition. What is not redone: the eligibility checks, state creation and
    partitioning."""

    __slots__ = ("group", "params", "state", "kinds", "present", "states", "signature", "parts", "setting")

    def __init__(self, opt, group: dict, kinds: dict, present: list, states: list, arrays: list, plan: Plan,
                 pids: list, signature: list):
        # kinds: {dtype: array names} (``names_by_dtype``); with each parameter's dtype in the signature, equal
        # kinds mean equal array names for every parameter, at the cost of a few comparisons
        self.group, self.params, self.state, self.kinds = group, group["params"], opt.state, kinds
        self.present, self.states, self.signature = present, states, signature
        self.setting = kernels.backend_setting()
        # per launch: kernel, device, dtypes, tensor indices, their element counts and ids
        self.parts = [(kernel, device, [t.dtype for t in arrays[idx[0]]], idx, [arrays[i][0].numel() for i in idx],
                       [pids[i] for i in idx]) for kernel, idx, _, device, *_ in plan.launches]

    def matches(self, opt, group: dict, kinds: dict, present: list, signature: list) -> bool:
        return (group is self.group and group["params"] is self.params and opt.state is self.state
                and kinds == self.kinds and present == self.present and signature == self.signature
                and kernel_requested(group) and kernels.backend_setting() == self.setting)


def signature(params: list, grads: list, states: list, dtypes: list, kinds: dict) -> list:
    """Per stepped parameter what a reused plan depends on (see ``Reuse``; ``dtypes``: the parameters'
    dtypes, ``kinds``: {dtype: array names})."""
    keys = {d: n[2:] for d, n in kinds.items()}
    return [(p.data_ptr(), p.numel(), d, p.is_contiguous() or p.stride(), g.is_contiguous() or g.stride(),
             *[s[k].data_ptr() for k in keys[d]]) for p, g, s, d in zip(params, grads, states, dtypes)]


def run_again(opt, group: dict, reuse: Reuse, params: list, grads: list, steps: list,
              clip: Optional[Tensor]) -> Optional[List[str]]:
    """Step with ``reuse``'s partitions and tables; the operands are computed anew for this step's group
    values. Returns the paths taken, or None (nothing stepped) when a partition has no kernel for these
    values: the caller then decides afresh. A launch that fails sends its tensors and the later ones to
    the eager path, as ``run`` does."""
    calls = []
    sig = reuse.signature
    names = [reuse.kinds[s[2]] for s in sig]  # each parameter's array names, from its dtype
    for kernel, device, dtypes, idx, numels, pids in reuse.parts:
        step = steps[idx[0]]
        ptrs = [x for i in idx for x in (sig[i][0], grads[i].data_ptr(), *sig[i][5:])]
        rounding = stochastic_arrays(group, dtypes)
        try:
            found, operands, clip_slot = kernels.find(opt, group, names[idx[0]], dtypes, rounding, kernel.backend,
                                                      step, clip, device)
        except kernels.Fallback:
            return None
        seed = int(group.get("rounding_seed", 0))
        streams = [_rounding.stream(seed, step, a) for a, on in enumerate(rounding) if on]
        calls.append((found, ptrs, numels, pids, list(operands) + streams, device,
                      {} if clip_slot is None else {clip_slot: clip}))
    for n, (found, ptrs, numels, pids, scalars, device, on_device) in enumerate(calls):
        try:
            kernels.launch(found, ptrs, numels, pids, scalars, device, on_device)
        except Exception as e:
            rest = [(i, pid) for part in reuse.parts[n:] for i, pid in zip(part[3], part[5])]
            arrays = [[params[i], grads[i], *(reuse.states[i][k] for k in names[i][2:])] for i, _ in rest]
            plan = Plan()
            plan.launches = [(c[0], [], [], c[5], {}, None) for c in calls[: n + 1]]
            plan.paths = [f"{found.backend} kernel"]
            _launch_failed(opt, group, plan, arrays, found, n, e, rest=list(range(len(arrays))))
            _eager(opt, group, plan.eager_path, arrays, [names[i] for i, _ in rest], [steps[i] for i, _ in rest],
                   [pid for _, pid in rest], clip)
            return plan.paths
    return [f"{calls[0][0].backend} kernel"] if calls else None
