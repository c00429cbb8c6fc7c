"""``Win(base_optimizer)``: Win / Win2 around any constructed ``torch.optim.Optimizer``.

Each step the base optimizer makes its own step at the current parameters (its state, schedules,
orthogonalisation or factorisation, all its own). The wrapper recovers that step as
``lr*u = p_before - p_after`` and applies the shared acceleration of ``_win.py`` to it (``win_pass``: one
kernel, or foreach), keeping ``x`` (and ``y``) per parameter in the base's state (``ALGORITHM.md``, "Win
around another optimizer").

The wrapper owns nothing the base has: ``param_groups``, ``state`` and ``defaults`` are the base's (plus
three group keys, :data:`WIN_KEYS`), so a scheduler built on the wrapper drives the base, and the base's
``state_dict`` carries ``x``/``y`` beside its own buffers.

Precision: the recovered step is exact up to the rounding of the base's own write ``p + step``, at most
half a unit in the last place of the parameter; the wrapper never rounds the parameter it restores (the
subtraction and the restoring addition are exact in the usual case, Sterbenz's lemma). ``docs/wrapper.md``
states the bound and what it costs.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from . import _dispatch, _state_dict
from ._base import WinOptimizer
from ._ops import FOREACH
from ._validation import check_acceleration, is_number
from ._win import extra_state_keys
from .win_pass import WIN_PASS, pass_group

__all__ = ["Win", "WIN_KEYS"]

#: The param group keys the wrapper adds to the base's groups (per-group settings, saved with them).
WIN_KEYS = ("acceleration_mode", "reckless_steps", "win_weight_decay")
#: Parameter dtypes whose acceleration is computed in float32 and rounded back (to nearest).
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _base_name(base) -> str:
    cls = type(base)
    return f"{cls.__module__}.{cls.__qualname__}"


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


class Win(torch.optim.Optimizer):
    r"""Win or Win2 acceleration around ``base_optimizer``, any constructed ``torch.optim.Optimizer``.

    Args:
        base_optimizer: the optimizer whose step direction is accelerated. Its param groups, state and
            hooks stay its own; it must not be an hf_win optimizer (those are accelerated already).
        acceleration_mode: ``"win"`` (default), ``"win2"`` or ``"none"`` (the base's step, unchanged).
        reckless_steps: ``(r1, r2)`` (default ``(2.0, 8.0)``).
        weight_decay: the decay Win integrates (proximal, ``lam`` of ``ALGORITHM.md``; default 0). The
            base's own ``weight_decay`` must then be 0 in every group, or the constructor refuses, naming
            both. Per group it is the key ``win_weight_decay``.
        keep_base_weight_decay: leave the base's own weight decay in its step (``lam = 0``, as for Adam
            and LAMB); ``weight_decay`` must then be 0.
        fused: the acceleration as one generated kernel per param group (``win_pass``; C on CPU, Triton on
            CUDA). None (default): that kernel where one applies, else foreach; True: the kernel, with a
            logged reason when it falls back; False: foreach.

    Each param group of the base gets the keys of :data:`WIN_KEYS` (settable per group like any
    hyper-parameter). ``lr`` is read from the base's group at every step (needed only when
    ``win_weight_decay`` is not 0), so ``lr = 0`` and every scheduler work. A closure given to
    :meth:`step` is evaluated once, here, before the base's step (optimizers that re-evaluate it, such as
    LBFGS, are refused). Parameters without a gradient are left to the base (which skips them) and their
    ``x``/``y`` do not advance. ``maximize`` and complex parameters are the base's business; the wrapper
    steps complex parameters through their real views. For bfloat16/float16 parameters the acceleration
    is computed in float32 and rounded to nearest.

    Memory: ``x`` (and ``y``) per parameter in the parameter's dtype, plus one parameter-sized copy
    during a step (the parameters before the base's step; float32 work copies for low-precision ones).
    Time: the base's step, that copy, and one pass over ``param``, the copy, ``x`` (and ``y``).
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, acceleration_mode: str = "win",
                 reckless_steps=(2.0, 8.0), weight_decay: float = 0.0, *, keep_base_weight_decay: bool = False,
                 fused: Optional[bool] = None):
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"Win: base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        if isinstance(base_optimizer, (WinOptimizer, Win)):
            raise ValueError(
                f"Win: base_optimizer is hf_win's {type(base_optimizer).__name__}, which is Win-accelerated "
                "already; wrap the plain optimizer (e.g. torch.optim.AdamW) or use its acceleration_mode")
        if isinstance(base_optimizer, torch.optim.LBFGS):
            raise ValueError("Win: torch.optim.LBFGS re-evaluates the closure inside its step (a line search); "
                             "its step is not a direction Win can accelerate")
        if fused not in (None, True, False):
            raise ValueError(f"Win: fused must be None, True or False, got {fused!r}")
        if not isinstance(keep_base_weight_decay, bool):
            raise ValueError(f"Win: keep_base_weight_decay must be True or False, got {keep_base_weight_decay!r}")
        if isinstance(reckless_steps, list):
            reckless_steps = tuple(reckless_steps)
        win_defaults = {"acceleration_mode": acceleration_mode, "reckless_steps": reckless_steps,
                        "win_weight_decay": weight_decay}
        self._win_defaults = win_defaults
        self.base_optimizer = base_optimizer
        self.keep_base_weight_decay = keep_base_weight_decay
        self.fused = fused
        self._paths = {}  # param group index -> the paths its last acceleration took (step_path)
        self._check_group({**win_defaults, "lr": None}, "", base_decay=0.0)
        groups = base_optimizer.param_groups
        merged = [{**win_defaults, **{k: g[k] for k in WIN_KEYS if k in g}} for g in groups]
        for i, (g, m) in enumerate(zip(groups, merged)):
            self._check_group({**g, **m}, f" (param group {i})")
        for p in (p for g in groups for p in g["params"]):
            taken = [k for k in ("x", "y") if k in base_optimizer.state.get(p, {})]
            if taken:
                raise ValueError(f"Win: the base optimizer {_base_name(base_optimizer)} keeps state {taken} of its "
                                 "own; Win's sequences use those names")
        for g, m in zip(groups, merged):
            g.update(m)
        self.last_load_report: Optional[str] = None
        # torch.optim.Optimizer's hook tables and step patching, without its param groups (the base's)
        super().__setstate__({})

    # ------------------------------------------------------------------ the base's, seen through the wrapper
    @property
    def param_groups(self):
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.base_optimizer.param_groups = value

    @property
    def state(self):
        return self.base_optimizer.state

    @state.setter
    def state(self, value):
        self.base_optimizer.state = value

    @property
    def defaults(self):
        return {**self.base_optimizer.defaults, **self._win_defaults}

    def __getstate__(self):
        return {"base_optimizer": self.base_optimizer, "_win_defaults": self._win_defaults,
                "keep_base_weight_decay": self.keep_base_weight_decay, "fused": self.fused, "_paths": {},
                "last_load_report": self.last_load_report}

    def __setstate__(self, state):
        super().__setstate__(state)

    def __repr__(self) -> str:
        return f"Win({self.base_optimizer!r})"

    # ------------------------------------------------------------------ validation
    def _check_group(self, group: dict, where: str, base_decay=None) -> None:
        """``ValueError`` naming the key and the allowed values, before anything is changed."""
        check_acceleration("Win", group, where)
        mode = group["acceleration_mode"]
        wd = group.get("win_weight_decay")
        if not is_number(wd) or wd < 0 or not math.isfinite(wd):
            raise ValueError(f"Win: weight_decay (win_weight_decay){where} must be a number >= 0, got {wd!r}")
        if wd and mode == "none":
            raise ValueError(
                f"Win: weight_decay (win_weight_decay){where} = {wd!r} with acceleration_mode='none': the base's "
                "step runs unchanged, so Win integrates no decay; give the decay to the base optimizer")
        if wd and self.keep_base_weight_decay:
            raise ValueError(f"Win: weight_decay (win_weight_decay){where} = {wd!r} with keep_base_weight_decay=True: "
                             "the decay is either the base's or Win's, not both")
        base_decay = group.get("weight_decay", 0.0) if base_decay is None else base_decay
        if mode != "none" and not self.keep_base_weight_decay and is_number(base_decay) and base_decay != 0:
            raise ValueError(
                f"Win: the base optimizer {_base_name(self.base_optimizer)} has weight_decay={base_decay!r}{where}, "
                f"and Win integrates weight decay itself (Win's weight_decay={wd!r}): build the base with "
                "weight_decay=0 and give the decay to Win(weight_decay=...), or pass keep_base_weight_decay=True "
                "to keep the base's decay in its step")
        if wd and "lr" not in group:
            raise ValueError(f"Win: weight_decay{where} needs the base's param group to hold 'lr' (the decay per "
                             "step is lr * weight_decay)")

    def add_param_group(self, param_group: dict) -> None:
        """The base's ``add_param_group`` with the Win keys filled from the wrapper's defaults (validated
        first: nothing is added on an error)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        merged = {**self._win_defaults, **param_group}
        if isinstance(merged["reckless_steps"], list):
            merged["reckless_steps"] = tuple(merged["reckless_steps"])
        base_decay = merged.get("weight_decay", self.base_optimizer.defaults.get("weight_decay", 0.0))
        self._check_group({**self.base_optimizer.defaults, **merged}, f" (param group {len(self.param_groups)})",
                          base_decay=base_decay)
        self.base_optimizer.add_param_group(merged)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none)

    # ------------------------------------------------------------------ state dicts
    def state_dict(self) -> dict:
        """The base's state dict (its buffers and ``x``/``y`` per parameter, the Win keys in its groups)
        plus ``"hf_win": {"class": "Win", "base": <the base's class>}``."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = dict(self.base_optimizer.state_dict())
        sd[_state_dict.MARK] = {"class": "Win", "base": _base_name(self.base_optimizer)}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this wrapper, or a plain one of the base optimizer (then ``x``/``y`` start
        from the current parameters at the next step, and ``last_load_report`` says so). A saved
        ``acceleration_mode`` other than this optimizer's is converted to this one's (kept ``x``, ``y``
        started or dropped), as hf_win's optimizers do; anything else is the checkpoint's."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        mark = state_dict.pop(_state_dict.MARK, None)
        ours = _base_name(self.base_optimizer)
        if mark is not None and (mark.get("class") != "Win" or mark.get("base") != ours):
            raise ValueError(f"Win.load_state_dict: the state dict was saved by hf_win {mark.get('class')} "
                             f"(base {mark.get('base')}), this optimizer is Win around {ours}")
        groups = [dict(g) for g in state_dict["param_groups"]]
        notes = [] if mark is not None else [
            f"loaded a {ours} state dict without Win's sequences: x (and y) start from the parameters at the next step"]
        if len(groups) == len(self.param_groups):
            for i, (g, own) in enumerate(zip(groups, self.param_groups)):
                for k in WIN_KEYS:
                    g.setdefault(k, own[k])
                if isinstance(g["reckless_steps"], list):
                    g["reckless_steps"] = tuple(g["reckless_steps"])
                if g["acceleration_mode"] != own["acceleration_mode"]:
                    notes.append(f"param group {i} was saved with acceleration_mode={g['acceleration_mode']!r}; "
                                 f"this optimizer's {own['acceleration_mode']!r} is kept")
                    g["acceleration_mode"] = own["acceleration_mode"]
                self._check_group(g, f" (param group {i} of the loaded state dict)")
        self.base_optimizer.load_state_dict({**state_dict, "param_groups": groups})
        for group in self.param_groups:  # the Win sequences a group's mode does not keep
            unwanted = {"x", "y"} - set(extra_state_keys(group["acceleration_mode"]))
            for p in group["params"]:
                for k in unwanted & set(self.state.get(p, ())):
                    del self.state[p][k]
        modes = "/".join(sorted({g["acceleration_mode"] for g in self.param_groups}))
        self.last_load_report = (f"Win({type(self.base_optimizer).__name__}).load_state_dict: "
                                 + ("; ".join(notes) if notes else f"loaded as saved (acceleration_mode {modes})"))
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # ------------------------------------------------------------------ the step
    def step_path(self) -> str:
        """What a step runs: the base's own step, then the acceleration on the paths its last step took
        (before the first step: the paths it will take), with every fallback and its reason."""
        modes = sorted({g["acceleration_mode"] for g in self.param_groups})
        accel = [m for m in modes if m != "none"]
        if not accel:
            return f"{type(self.base_optimizer).__name__} step (acceleration_mode='none')"
        paths = []
        for i, group in enumerate(self.param_groups):
            if group["acceleration_mode"] == "none":
                continue
            taken = self._paths.get(i) or _dispatch.predict(WIN_PASS, dict(pass_group(group, self.fused),
                                                                           params=group["params"]))
            paths.extend(p for p in taken if p not in paths)
        return f"{type(self.base_optimizer).__name__} step, then {'/'.join(accel)} on {' / '.join(paths)}"

    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            plans = []
            for i, group in enumerate(self.param_groups):
                self._check_group(group, f" (param group {i})")
                if group["acceleration_mode"] != "none":
                    params = [p for p in group["params"] if p.grad is not None]
                    fresh = [not any(k in self.state.get(p, ()) for k in ("x", "y")) for p in params]
                    plans.append((i, group, params, fresh, [p.detach().clone() for p in params]))
            self.base_optimizer.step()
            for index, group, params, fresh, before in plans:
                self._accelerate(index, group, params, fresh, before)
        return loss

    def _accelerate(self, index, group, params, fresh, before) -> None:
        """Create or drop ``x``/``y`` as the group's mode says (new ones start as copies of the parameter
        before the step), then run the pass (``win_pass``) on a kernel or foreach, as ``_dispatch`` plans it;
        low-precision parameters step in float32 here, rounded back to nearest."""
        mode = group["acceleration_mode"]
        keys = extra_state_keys(mode)
        for p, new, b in zip(params, fresh, before):
            state = self.state[p]
            taken = [k for k in ("x", "y") if new and k in state]
            if taken:
                raise RuntimeError(f"Win: the base optimizer {_base_name(self.base_optimizer)} created state "
                                   f"{taken} of its own; Win's sequences use those names")
            for k in keys:
                if k not in state:
                    state[k] = b.clone(memory_format=torch.preserve_format)
            for k in {"x", "y"} - set(keys):
                state.pop(k, None)
        view = pass_group(group, self.fused)
        arrays = [[_real(t) for t in (p, b, *(self.state[p][k] for k in keys))] for p, b in zip(params, before)]
        full = [i for i, p in enumerate(params) if p.dtype not in _LOW_PRECISION]
        if full:
            names = [WIN_PASS.step_array_names(view, params[i].dtype) for i in full]
            plan = _dispatch.decide(WIN_PASS, view, [arrays[i] for i in full], names, [0] * len(full), None)
            _dispatch.run(WIN_PASS, view, plan, [arrays[i] for i in full], names, [0] * len(full), [0] * len(full),
                          None)
            self._paths[index] = plan.paths
        for i in (i for i, p in enumerate(params) if p.dtype in _LOW_PRECISION):
            work = [t.float() for t in arrays[i]]
            WIN_PASS.step_tensors(FOREACH, view, work[:1], work[1:2], [dict(zip(keys, work[2:]))], [0], None)
            for dst, src in zip(arrays[i], work):
                if dst is not arrays[i][1]:
                    dst.copy_(src)
            if not full:
                self._paths[index] = ["foreach (float32 work copies of low-precision parameters)"]

    def state_bytes(self) -> int:
        """Bytes held in state tensors (the base's and ``x``/``y``), for every parameter stepped so far."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values()
                   if isinstance(v, Tensor))
