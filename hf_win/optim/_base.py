"""``WinOptimizer``: the machinery shared by every Win-accelerated base optimizer.

A base optimizer (``adamw.py``, ``adam.py``, ...) is a subclass that declares

- ``_state_keys(group)``: the names of its own per-parameter buffers, created by ``_init_state``;
- ``_integrated_decay``: whether Win integrates the weight decay (``lam = wd``) or the base already
  applied it (``lam = 0``);
- ``_vanilla_decay``: how its ``acceleration_mode="none"`` step decays (see ``_win.VANILLA_DECAYS``);
- ``_l2_in_grad``: ``"always"`` / ``"vanilla"`` / ``"never"``: when ``wd * p`` is added to the gradient
  (a copy of it: ``p.grad`` is never written);
- ``_group_step``: whether the step count lives in the param group (LAMB, Adan) or per parameter;
- ``_clip_style``: ``"standard"`` or ``"lamb"`` (see ``clip_coefficient``);
- ``_direction(ops, group, params, grads, states, steps)``: the direction ``u`` for a list of parameters.
  It must read only ``group`` and class attributes (the fused path calls it without the instance), and
  compute step-dependent scalars with operators or ``_ops.scalar_sqrt`` (on the fused path ``steps``
  and ``lr`` are 0-dim tensors).

Everything else (validation, clipping, state creation, the two execution paths, the Win/Win2 step) is
here, once.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.optim.optimizer import required

from . import _advice, _rounding, _state_dict, kernels
from ._ops import FOREACH, PER_TENSOR
from ._sharding import CLIP_ADVICE, ShardingError, check_partitioned, foreign_params, inside_zero_redundancy_optimizer
from ._win import MODES, accelerate, extra_state_keys, vanilla_step

__all__ = ["WinOptimizer"]


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


#: ``state_dtype`` values: None (the parameter's dtype), float32, bfloat16 (names or torch dtypes).
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _as_dtype(value) -> torch.dtype:
    if isinstance(value, str):
        value = STATE_DTYPES.get(value.replace("torch.", ""), value)
    if value not in STATE_DTYPES.values():
        raise ValueError(f"state_dtype must be None, 'float32' or 'bfloat16' (or the torch dtypes), got {value!r}")
    return value


#: Elements rounded stochastically at a time on the eager paths (bounds the rounding's temporaries).
_SR_CHUNK = 1 << 16


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _strides(t: Tensor) -> tuple:
    """The strides that matter for the order of elements in memory (those of dimensions of size > 1)."""
    return tuple(st for s, st in zip(t.shape, t.stride()) if s > 1)


def _kernel_eligible(ts) -> str:
    """Why the tensors of one parameter (param, grad, state) cannot go to a kernel, or ''."""
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


class WinOptimizer(torch.optim.Optimizer):
    _integrated_decay: bool = True
    _vanilla_decay: Optional[str] = None
    _l2_in_grad: str = "never"
    _group_step: bool = False
    _clip_style: str = "standard"
    _n_betas: int = 2

    #: Keys that hold one value for the whole optimizer: the global-norm clipping reads them from
    #: ``defaults``, so a param group may not set another value (``_validate_group`` refuses it).
    _global_keys: tuple = ("max_grad_norm",)
    #: The torch.optim classes whose state dicts this class converts on ``load_state_dict``
    #: (``"AdamW"``, ``"Adam"``, ``"SGD"``; see ``_state_dict.py``).
    _torch_sources: tuple = ()

    def __init__(
        self, params, defaults: dict, *, max_grad_norm: float = 0.0, foreach: Optional[bool] = None,
        fused: Optional[bool] = None, maximize: bool = False, capturable: bool = False,
        differentiable: bool = False,
    ):
        name = type(self).__name__
        if not _is_number(max_grad_norm):
            raise ValueError(f"max_grad_norm must be a number (<= 0 disables clipping), got {max_grad_norm!r}")
        if foreach not in (None, True, False):
            raise ValueError(f"foreach must be None, True or False, got {foreach!r}")
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        for flag, value, instead in (
            ("capturable", capturable, "torch.optim.AdamW or torch.optim.Adam with capturable=True for CUDA graphs"),
            ("differentiable", differentiable,
             "torch.optim.AdamW(differentiable=True) to differentiate through the step"),
        ):
            if value is not False:
                raise ValueError(
                    f"{name}: {flag}={value!r} is not supported (only False, torch's default, is accepted); "
                    f"use {instead}"
                )
        defaults = dict(
            defaults, max_grad_norm=float(max_grad_norm), foreach=foreach, fused=fused, maximize=maximize,
            capturable=False, differentiable=False,
        )
        for key in ("betas", "reckless_steps"):  # lists (from JSON/YAML configs) become tuples
            if isinstance(defaults.get(key), list):
                defaults[key] = tuple(defaults[key])
        self._validate_group(defaults, where="", defaults=True)
        _advice.check_backend_setting()
        if max_grad_norm > 0 and inside_zero_redundancy_optimizer():
            raise ShardingError(
                f"{name}: max_grad_norm={max_grad_norm} inside ZeroRedundancyOptimizer would clip "
                "with the norm of this process's share of the parameters only. " + CLIP_ADVICE
            )
        self._registered_ids = set()  # ids of the parameters given to us (see _sharding.foreign_params)
        self._paths_taken = {}  # param group index -> the paths its last step took (step_path)
        self.last_load_report: Optional[str] = None  # what the last load_state_dict did (see there)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: dict) -> None:
        """``torch.optim.Optimizer.add_param_group``, validated first (nothing is added on an error).

        Every hyper-parameter of the constructor may be given per group and is honoured per group,
        except the keys of ``_global_keys`` (``max_grad_norm``; SGD's ``eps``, which only the clipping
        uses): one value for all groups, so a group giving another value is refused. Keys this optimizer
        does not know are kept in the group, as torch does."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        merged = dict(self.defaults)
        merged.update({k: v for k, v in param_group.items() if k != "params"})
        self._validate_group(merged, where=f" (param group {len(self.param_groups)})")
        for key in ("betas", "reckless_steps"):  # lists (from JSON/YAML configs) become tuples
            if isinstance(param_group.get(key), list):
                param_group[key] = tuple(param_group[key])
        super().add_param_group(param_group)
        self._registered_ids.update(id(p) for p in self.param_groups[-1]["params"])
        _advice.warn_inert_rounding(self)

    def _validate_group(self, group: dict, where: str, defaults: bool = False) -> None:
        """Raise ``ValueError`` naming the key and the allowed values. ``defaults``: ``group`` is the
        constructor's defaults, where ``lr`` may still be the ``required`` sentinel (SGD: torch's rule,
        every group must then give its own)."""
        name = type(self).__name__
        mode = group.get("acceleration_mode")
        if mode not in MODES:
            raise ValueError(
                f"{name}: acceleration_mode{where} must be one of {', '.join(map(repr, MODES))}, got {mode!r}"
            )
        rs = group.get("reckless_steps")
        if (
            not isinstance(rs, (tuple, list))
            or len(rs) != 2
            or not all(_is_number(r) and r > 0 and math.isfinite(r) for r in rs)
        ):
            raise ValueError(
                f"{name}: reckless_steps{where} must be two positive numbers (r1, r2), e.g. (2.0, 8.0); got {rs!r}"
            )
        lr = group.get("lr")
        if isinstance(lr, type(required)):
            if not defaults:
                raise ValueError(
                    f"{name}: lr is required{where}: give lr= to the constructor or an 'lr' in every param group"
                )
        else:
            if isinstance(lr, Tensor):
                if lr.numel() != 1:
                    raise ValueError(f"{name}: lr{where} as a tensor must have one element")
                lr_value = float(lr)
            else:
                lr_value = lr
            if not _is_number(lr_value) or lr_value < 0:
                raise ValueError(f"{name}: lr{where} must be a number >= 0, got {lr!r}")
        for key in ("eps", "weight_decay", "momentum", "dampening"):
            if key in group and (not _is_number(group[key]) or group[key] < 0):
                raise ValueError(f"{name}: {key}{where} must be a number >= 0, got {group[key]!r}")
        if "momentum" in group and group["momentum"] >= 1:
            raise ValueError(f"{name}: momentum{where} must be in [0, 1), got {group['momentum']!r}")
        if "betas" in group:
            betas = group["betas"]
            if (
                not isinstance(betas, (tuple, list))
                or len(betas) != self._n_betas
                or not all(_is_number(b) and 0.0 <= b < 1.0 for b in betas)
            ):
                raise ValueError(
                    f"{name}: betas{where} must be {self._n_betas} numbers each in [0, 1), got {betas!r}"
                )
        for key in ("amsgrad", "nesterov", "bias_correction", "grad_averaging", "trust_clip", "always_adapt",
                    "maximize"):
            if key in group and not isinstance(group[key], bool):
                raise ValueError(f"{name}: {key}{where} must be True or False, got {group[key]!r}")
        for key in ("capturable", "differentiable"):
            if group.get(key, False) is not False:
                raise ValueError(
                    f"{name}: {key}{where} must be False (torch's default); use the torch.optim optimizer "
                    f"with {key}=True instead"
                )
        if group.get("foreach") not in (None, True, False):
            raise ValueError(f"{name}: foreach{where} must be None, True or False, got {group['foreach']!r}")
        if group.get("fused") not in (None, True, False):
            raise ValueError(f"{name}: fused{where} must be None, True or False, got {group['fused']!r}")
        if group.get("fused") and group.get("foreach") is not None:
            raise ValueError(
                f"{name}: fused=True{where} cannot be combined with foreach={group['foreach']!r} (as in torch.optim): "
                "fused is the kernel, foreach an eager path; leave foreach=None with fused=True"
            )
        if not defaults and hasattr(self, "defaults"):
            for key in self._global_keys:
                if key in group and group[key] != self.defaults.get(key):
                    raise ValueError(
                        f"{name}: {key}{where} = {group[key]!r} differs from the constructor's "
                        f"{self.defaults.get(key)!r}; {key} is one value for all param groups (gradient "
                        f"clipping uses one global norm over every group): set it in the constructor"
                    )
        if group.get("state_dtype") is not None:
            try:
                _as_dtype(group["state_dtype"])
            except (TypeError, ValueError):
                raise ValueError(
                    f"{name}: state_dtype{where} must be None (the parameter's dtype), 'float32' or 'bfloat16' "
                    f"(or torch.float32 / torch.bfloat16), got {group['state_dtype']!r}"
                ) from None
        if not isinstance(group.get("bf16_stochastic_round", False), bool):
            raise ValueError(
                f"{name}: bf16_stochastic_round{where} must be True or False, got {group['bf16_stochastic_round']!r}"
            )
        seed = group.get("rounding_seed", 0)
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2**31:
            raise ValueError(f"{name}: rounding_seed{where} must be an int in [0, 2**31), got {seed!r}")

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_paths_taken", {})
        if not hasattr(self, "_registered_ids"):  # unpickled; load_state_dict() keeps the live set, so
            # flattened partitions (DeepSpeed loads ZeRO checkpoints this way) stay recognised as such
            self._registered_ids = {id(p) for g in self.param_groups for p in g["params"]}
        if not hasattr(self, "last_load_report"):
            self.last_load_report = None
        self.defaults.setdefault("maximize", False)
        self.defaults.setdefault("capturable", False)
        self.defaults.setdefault("differentiable", False)
        for group in self.param_groups:  # groups of checkpoints older than these keys (as torch does)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("max_grad_norm", self.defaults.get("max_grad_norm", 0.0))
            group.setdefault("maximize", False)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)

    # ------------------------------------------------------------------ state dicts
    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict()`` plus ``"hf_win": {"class": ...}``: which optimizer's state
        it is (the class whose ``_direction`` keeps it), read by ``load_state_dict``."""
        sd = super().state_dict()
        sd[_state_dict.MARK] = {"class": _state_dict.checkpoint_name(type(self))}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict`` with these rules; what is refused raises ``ValueError``
        naming both sides before anything is loaded, what is converted emits a ``UserWarning`` and
        ``self.last_load_report`` says what was done (the Trainer logs it on resume).

        - **Hyper-parameters** (lr, betas, eps, weight_decay, ...) are the checkpoint's, as in torch.
          Keys the checkpoint lacks (older versions, the authors' code, torch) are this optimizer's.
        - **Same class** (the state dict's ``"hf_win"`` mark, or no mark with Win param groups: the
          authors' code, older hf_win): loaded. Each stepped parameter's state must hold exactly the
          buffers this class keeps with the loaded options, shaped like the parameter; else refused.
        - **Another hf_win class** (by its mark): refused (e.g. SGD-Win's ``momentum`` is not a moment of
          AdamW-Win; AdamW-Win's and Adam-Win's moments differ by the decay in the gradient).
        - **torch.optim.AdamW into AdamW-Win, Adam into Adam-Win, SGD into SGD-Win**: converted with a
          warning: the moments (SGD's ``momentum_buffer`` becomes ``momentum``) and step counts are taken
          over (a torch SGD buffer counts as one step), the hyper-parameters too; ``acceleration_mode``,
          ``reckless_steps``, ``max_grad_norm`` and the run flags (foreach, fused, capturable,
          differentiable) are this optimizer's, and ``x`` (and ``y``) start from the current parameters,
          as at a first step. A torch state dict that says it used the other decay
          (``decoupled_weight_decay``) or of any other torch class is refused.
        - **Another acceleration_mode** (e.g. a ``win`` checkpoint into an optimizer built as ``win2``):
          the optimizer keeps the mode it was built with, never the checkpoint's; the base state is kept,
          Win sequences it lacks start from the current parameters, those it does not use are dropped;
          warned.
        - ``max_grad_norm`` (SGD: also ``eps``) is one value for the optimizer: a checkpoint's other value
          is replaced by this optimizer's, warned.
        - ``state_dtype``: the one this optimizer was built with, when not None: the saved buffers are
          converted to it (rounded to nearest), warned. Built with None, the checkpoint's (torch's rule;
          None there too: the parameter's dtype), so bfloat16 state of float32 parameters stays bfloat16
          (torch would cast it to the parameter's dtype).
        - ``bf16_stochastic_round`` and ``rounding_seed``: the checkpoint's (torch's rule), warned when this
          optimizer was built with other values.
        """
        converted, notes = _state_dict.prepare(self, state_dict)
        super().load_state_dict(converted)
        notes += _state_dict.set_loaded_dtypes(self, converted)
        _state_dict.finish(self)
        name = _state_dict.checkpoint_name(type(self))
        modes = sorted({g["acceleration_mode"] for g in self.param_groups})
        if notes:
            self.last_load_report = f"{name}.load_state_dict: " + "; ".join(notes)
            warnings.warn(self.last_load_report, UserWarning, stacklevel=2)
        else:
            self.last_load_report = f"{name}.load_state_dict: loaded as saved (acceleration_mode {'/'.join(modes)})"

    # ------------------------------------------------------------------ subclass hooks
    @classmethod
    def _state_keys(cls, group: dict) -> tuple:
        """Names of the base optimizer's parameter-sized buffers (``step`` not included)."""
        raise NotImplementedError

    def _init_state(self, p: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        """Create the base optimizer's missing buffers (zeros in the state dtype by default)."""
        for key in self._state_keys(group):
            if key not in state:
                state[key] = self._new_state(p, group)

    def _direction(self, ops, group, params, grads, states, steps) -> list:
        raise NotImplementedError

    def _needs_whole_tensors(self, group: dict) -> bool:
        """Whether the direction uses a norm of each whole parameter (LAMB's trust ratio)."""
        return False

    # ------------------------------------------------------------------ sharded parameters
    def _partitioned(self) -> bool:
        """True when we are stepping flattened partitions we were not built with (DeepSpeed ZeRO); then
        ``check_partitioned`` raises ``ShardingError`` (before any state is touched) for what would be
        silently wrong there: the optimizer's own clipping and per-parameter norms (LAMB's trust ratio)."""
        if not any(foreign_params(g["params"], self._registered_ids) for g in self.param_groups):
            return False
        check_partitioned(self)
        return True

    # ------------------------------------------------------------------ clipping
    def _clip_coefficient(self) -> Optional[Tensor]:
        """Multiplier for every gradient (a 0-dim tensor), or None when clipping is off."""
        max_norm = float(self.defaults.get("max_grad_norm", 0.0))
        if max_norm <= 0.0:
            return None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        device = grads[0].device
        if all(type(g) is Tensor and g.layout == torch.strided and g.device == device for g in grads):
            norms = list(torch._foreach_norm([g.detach() for g in grads], 2.0))  # one call, as clip_grad_norm_
        else:  # DTensor (FSDP2) gradients: their norms are reduced over the processes
            norms = [torch.linalg.vector_norm(g.detach(), 2.0) for g in grads]
        total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)
        if self._clip_style == "lamb":
            # LAMB divides by norm/max_norm when the norm is above max_norm.
            return torch.where(total > max_norm, max_norm / total, torch.ones_like(total))
        eps = float(self.defaults.get("eps", 1e-8))
        return torch.clamp(max_norm / (total + eps), max=1.0)

    # ------------------------------------------------------------------ the step
    def _wants_kernel(self, group) -> bool:
        """A kernel where one applies: with ``fused=True``, and by default (``fused=None`` with
        ``foreach=None``); ``foreach=True/False`` or ``fused=False`` ask for an eager path. A fallback
        from a kernel is logged once with its reason either way."""
        return bool(group.get("fused")) or (group.get("fused") is None and group.get("foreach") is None)

    def _use_foreach(self, group, params) -> bool:
        flag = group.get("foreach")
        if flag is not None:
            return bool(flag)
        # None: multi-tensor wherever every tensor is a dense, strided tensor on one device.
        if not params:
            return False
        device = params[0].device
        return all(p.layout == torch.strided and p.device == device for p in params)

    def _eager_path(self, group, params) -> str:
        return "foreach" if self._use_foreach(group, params) else "per-tensor"

    def step_path(self) -> str:
        """The path each param group's steps took at the last step (before the first step: the path they
        will take), with every fallback and its reason; the Trainer logs it."""
        paths = []
        for i, group in enumerate(self.param_groups):
            taken = self._paths_taken.get(i)
            if taken is None:
                params = group["params"]
                taken = [self._eager_path(group, params)]
                if self._wants_kernel(group) and params:
                    backend, why = kernels.backend_for(params[0].device)
                    if backend == "c":
                        why = kernels.c_compiler_missing()
                        backend = None if why else backend
                    taken = [f"{backend} kernel" if backend else f"{taken[0]} ({why})"]
            for path in taken:
                if path not in paths:
                    paths.append(path)
        return " / ".join(paths) if paths else "no parameters"

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients; "
                        "use torch.optim.SparseAdam or a dense embedding"
                    )

        partitioned = self._partitioned()
        clip = self._clip_coefficient()
        first = 0
        for i, group in enumerate(self.param_groups):
            self._step_group(i, group, clip, partitioned, first)
            first += len(group["params"])
        return loss

    # state
    def _state_dtype(self, group, p: Tensor) -> torch.dtype:
        """The dtype of ``p``'s state buffers: the group's ``state_dtype``, else the parameter's (complex
        parameters keep complex state: it is stepped through its real view)."""
        dtype = group.get("state_dtype")
        return p.dtype if dtype is None or p.is_complex() else _as_dtype(dtype)

    def _new_state(self, p: Tensor, group: dict, like: Optional[Tensor] = None) -> Tensor:
        """A zero buffer for ``p`` in the state dtype (``like``: a copy of that tensor instead)."""
        dtype = self._state_dtype(group, p)
        if like is not None:
            return like.detach().to(dtype=dtype, copy=True, memory_format=torch.preserve_format)
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _state_for(self, p: Tensor, grad: Tensor, group: dict, mode: str) -> dict:
        state = self.state[p]
        if any(k not in state for k in self._state_keys(group)):
            # what the step calls the gradient: negated with maximize (Adan starts its pre_grad from it)
            self._init_state(p, grad.neg() if group.get("maximize", False) else grad, state, group)
        for key in extra_state_keys(mode):
            if key not in state:
                state[key] = self._new_state(p, group, like=p)
        return state

    def _arrays(self, group) -> list:
        """The kernel's arrays, in order: ``param``, ``grad``, then the state buffers."""
        return ["param", "grad", *self._state_keys(group), *extra_state_keys(group["acceleration_mode"])]

    def _step_group(self, index: int, group: dict, clip: Optional[Tensor], partitioned: bool = False,
                    first_pid: int = 0) -> None:
        present = [i for i, p in enumerate(group["params"]) if p.grad is not None]
        params = [group["params"][i] for i in present]
        pids = [first_pid + i for i in present]
        # Flattened partitions (DeepSpeed ZeRO) count steps per partition: ZeRO-3 calls step() once per
        # sub-group, which would advance a count kept in the group several times per real step.
        group_step = self._group_step and not partitioned
        if group_step:
            group["step"] = group.get("step", 0) + 1
        if not params:
            return
        mode = group["acceleration_mode"]
        grads = [p.grad for p in params]
        states = [self._state_for(p, g, group, mode) for p, g in zip(params, grads)]
        if not group_step:
            for state in states:
                state["step"] = int(state.get("step", 0)) + 1
        steps = [group["step"]] * len(params) if group_step else [s["step"] for s in states]
        keys = self._arrays(group)[2:]
        # Complex parameters are stepped through their real views (as torch.optim does).
        arrays = [[_real(p), _real(g), *(_real(s[k]) for k in keys)] if p.is_complex() else [p, g, *(s[k] for k in keys)]
                  for p, g, s in zip(params, grads, states)]

        taken = []
        rest = list(range(len(params)))
        if self._wants_kernel(group):
            rest = self._run_kernels(group, arrays, steps, pids, clip, rest, taken)
        if rest:
            path = self._eager_path(group, [params[i] for i in rest])
            self._run_eager(group, [arrays[i] for i in rest], [steps[i] for i in rest], [pids[i] for i in rest],
                            clip, FOREACH if path == "foreach" else None)
            if not taken:
                taken.append(path)
        self._paths_taken[index] = taken

    def _rounding(self, group, dtypes) -> list:
        """Per array: stored with stochastic rounding? bfloat16 state always; a bfloat16 parameter with
        ``bf16_stochastic_round``; never the gradient (it is only read)."""
        sr_param = bool(group.get("bf16_stochastic_round", False))
        return [d == torch.bfloat16 and (a > 1 or (a == 0 and sr_param)) for a, d in enumerate(dtypes)]

    def _streams(self, group, step, rounding) -> list:
        seed = int(group.get("rounding_seed", 0))
        return [_rounding.stream(seed, step, a) for a, on in enumerate(rounding) if on]

    def _run_kernels(self, group, arrays, steps, pids, clip, todo, taken: list) -> list:
        """Step what a kernel can take; return the indices left for the eager path. Every kernel is
        obtained before any runs, so a failure never leaves a tensor stepped twice."""
        names = self._arrays(group)
        clip_value = None if clip is None else float(clip)
        parts: dict = {}
        rest = []
        for i in todo:
            why = _kernel_eligible(arrays[i])
            if why:
                eager = self._eager_path(group, [arrays[i][0]])
                kernels.log_once(f"{type(self).__name__}: {why}; those tensors run on {eager}")
                path = f"{eager} ({why})"
                rest.append(i)
                if path not in taken:
                    taken.append(path)
                continue
            ts = arrays[i]
            parts.setdefault((ts[0].device, tuple(t.dtype for t in ts), steps[i]), []).append(i)
        calls = []
        for (device, dtypes, step), idx in parts.items():
            backend, why = kernels.backend_for(device)
            rounding = self._rounding(group, dtypes)
            try:
                if backend is None:
                    raise kernels.Fallback(why)
                kernel, operands = kernels.find(self, group, names, list(dtypes), rounding, backend, step, clip_value)
            except kernels.Fallback as e:
                reason, eager = str(e), self._eager_path(group, [arrays[i][0] for i in idx])
                if kernels.backend_setting() != "foreach":  # a fallback the user did not ask for
                    kernels.log_once(f"{reason}; the step runs on {eager} instead")
                rest.extend(idx)
                taken.append(f"{eager} ({reason})")
                continue
            calls.append((kernel, idx, list(operands) + self._streams(group, step, rounding), device))
            if f"{backend} kernel" not in taken:
                taken.insert(0, f"{backend} kernel")
        for kernel, idx, scalars, device in calls:
            ptrs = [t.data_ptr() for i in idx for t in arrays[i]]
            kernels.launch(kernel, ptrs, [arrays[i][0].numel() for i in idx], [pids[i] for i in idx], scalars, device)
        return sorted(rest)

    def _run_eager(self, group, arrays, steps, pids, clip, ops) -> None:
        """The eager paths: foreach (``ops=FOREACH``) or one tensor at a time. Arithmetic is in float32
        for low-precision tensors (float64 for float64 parameters): inputs are upcast, results rounded
        back (stochastically where ``_rounding`` says)."""
        if ops is None:
            for i in range(len(arrays)):
                self._run_eager(group, arrays[i : i + 1], steps[i : i + 1], pids[i : i + 1], clip, PER_TENSOR)
            return
        names = self._arrays(group)
        compute = [kernels.ir.compute_dtype([t.dtype for t in a]) for a in arrays]
        work = [[t if t.dtype == c else t.to(c) for t in a] for a, c in zip(arrays, compute)]
        if clip is not None:
            clip = clip.to(arrays[0][0].device)
        self._step_fn(ops, group, [w[0] for w in work], [w[1] for w in work],
                      [dict(zip(names[2:], w[2:])) for w in work], steps, clip)
        for a, w, step, pid in zip(arrays, work, steps, pids):
            rounding = self._rounding(group, [t.dtype for t in a])
            seed = int(group.get("rounding_seed", 0))
            for j, (dst, src) in enumerate(zip(a, w)):
                if dst is src or j == 1:
                    continue
                if rounding[j]:
                    key = _rounding.tensor_key(_rounding.stream(seed, step, j), pid)
                    if dst.is_contiguous() and src.is_contiguous():
                        # in chunks: the rounding's int64 temporaries are ~40 bytes per element
                        d, s = dst.view(-1), src.view(-1)
                        for lo in range(0, d.numel(), _SR_CHUNK):
                            hi = min(lo + _SR_CHUNK, d.numel())
                            offsets = torch.arange(lo, hi, device=d.device, dtype=torch.int64)
                            d[lo:hi].copy_(_rounding.to_bf16(s[lo:hi], key, offsets))
                    else:
                        dst.copy_(_rounding.to_bf16(src, key, _rounding.memory_offsets(dst)))
                else:
                    dst.copy_(src)

    def _step_fn(self, ops, group, params, grads, states, steps, clip) -> None:
        """One step of ``params``: the gradient as the step uses it (``_prepare_grads``), then the base
        direction and the acceleration (``_apply``). The kernels trace exactly this (kernels/ir.py)."""
        grads = self._prepare_grads(ops, group, params, grads, clip)
        self._apply(ops, group, params, grads, states, steps)

    def _prepare_grads(self, ops, group, params, grads, clip):
        """Clipping, ``maximize`` and L2 decay, on copies: ``p.grad`` is never written."""
        owned = False
        if clip is not None:
            grads, owned = ops.scaled(grads, clip), True
        if group.get("maximize", False):
            if owned:
                ops.mul_(grads, -1.0)
            else:
                grads, owned = ops.scaled(grads, -1.0), True
        mode = group["acceleration_mode"]
        if self._l2_in_grad == "always" or (self._l2_in_grad == "vanilla" and mode == "none"):
            wd = group["weight_decay"]
            if wd != 0.0:
                if not owned:
                    grads = ops.clone(grads)
                ops.add_(grads, params, alpha=wd)
        return grads

    def _apply(self, ops, group, params, grads, states, steps) -> None:
        """The base direction and the acceleration for ``params`` (``grads`` already prepared)."""
        mode = group["acceleration_mode"]
        lr = group["lr"]
        if isinstance(lr, Tensor):
            lr = float(lr)
        updates = self._direction(ops, group, params, grads, states, steps)
        if mode == "none":
            vanilla_step(ops, params, updates, lr=lr, weight_decay=group["weight_decay"], decay=self._vanilla_decay)
            return
        r1, r2 = group["reckless_steps"]
        lam = group["weight_decay"] if self._integrated_decay else 0.0
        xs = [s["x"] for s in states]
        ys = [s["y"] for s in states] if mode == "win2" else None
        accelerate(ops, params, updates, xs, ys, mode=mode, lr=lr, lam=lam, r1=r1, r2=r2)

    # ------------------------------------------------------------------ introspection
    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (all parameters seen so far)."""
        total = 0
        for state in self.state.values():
            for v in state.values():
                if isinstance(v, Tensor):
                    total += v.numel() * v.element_size()
        return total

    @classmethod
    def buffers_per_parameter(cls, mode: str = "win", **hyper) -> int:
        """Parameter-sized buffers this optimizer keeps per parameter in ``mode``."""
        return len(cls._state_keys(hyper)) + len(extra_state_keys(mode))

    @classmethod
    def state_bytes_per_parameter(cls, mode: str = "win", param_dtype: torch.dtype = torch.float32, **hyper) -> int:
        """State bytes per parameter element in ``mode``: the buffers times the size of the state dtype
        (``hyper["state_dtype"]``, else ``param_dtype``; complex parameters keep complex state)."""
        return cls.buffers_per_parameter(mode, **hyper) * state_element_size(hyper.get("state_dtype"), param_dtype)


def state_element_size(state_dtype, param_dtype: torch.dtype) -> int:
    """Bytes of one state element for a parameter of ``param_dtype`` under ``state_dtype`` (None: the
    parameter's dtype, as for complex parameters)."""
    if state_dtype is None or param_dtype.is_complex:
        return param_dtype.itemsize
    return _as_dtype(state_dtype).itemsize
