"""``WinOptimizer``: the orchestration and the math shared by every Win-accelerated base optimizer.

A base optimizer (``adamw.py``, ``adam.py``, ...) is a subclass that declares

- ``_state_keys(group)``: the names of its own per-parameter buffers, created by ``_init_state``;
- ``_integrated_decay``: whether Win integrates the weight decay (``lam = wd``) or the base already
  applied it (``lam = 0``);
- ``_vanilla_decay``: how its ``acceleration_mode="none"`` step decays (see ``_win.VANILLA_DECAYS``);
- ``_l2_in_grad``: ``"always"`` / ``"vanilla"`` / ``"never"``: when ``wd * p`` is added to the gradient
  (a copy of it: ``p.grad`` is never written);
- ``_group_step``: whether the step count lives in the param group (LAMB, Adan) or per parameter;
- ``_clip_style``: ``"standard"`` or ``"lamb"`` (see ``_clipping.py``);
- ``_direction(ops, group, params, grads, states, steps)``: the direction ``u`` for a list of parameters,
  written with the ``_ops`` vocabulary; step-dependent scalars with operators or ``_ops.scalar_sqrt``.
  The kernels trace it (``kernels/tracing.py``); what it may read there is in ``docs/extending.md``.

Here: the step's orchestration (state creation, step counts, the arrays each parameter is stepped
through) and its math (``step_tensors``: gradient preparation, the direction, the Win/Win2 step). Elsewhere,
each in its own module: validation (``_validation``), the choice of path and running it (``_dispatch``),
dtypes (``_precision``), rounding (``_rounding``), state dicts (``_state_dict``), older pickles
(``_pickling``), sharding (``_sharding``), clipping (``_clipping``), memory (``_memory``).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from . import _advice, _dispatch, _memory, _pickling, _state_dict
from ._clipping import clip_coefficient
from ._precision import state_dtype
from ._sharding import check_clipping_at_construction, stepping_partitions
from ._validation import check_group, normalize
from ._win import DIFFERENCE_KEYS, accelerate, extra_state_keys, sequence_keys, vanilla_step

__all__ = ["WinOptimizer"]


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


class WinOptimizer(torch.optim.Optimizer):
    _integrated_decay: bool = True
    _vanilla_decay: Optional[str] = None
    _l2_in_grad: str = "never"
    _group_step: bool = False
    _clip_style: str = "standard"
    _n_betas: int = 2

    #: Keys that hold one value for the whole optimizer: the global-norm clipping reads them from
    #: ``defaults``, so a param group may not set another value (``_validation.check_group`` refuses it).
    _global_keys: tuple = ("max_grad_norm",)
    #: The torch.optim classes whose state dicts this class converts on ``load_state_dict``
    #: (``"AdamW"``, ``"Adam"``, ``"SGD"``; see ``_state_dict.py``).
    _torch_sources: tuple = ()

    def __init__(
        self, params, defaults: dict, *, max_grad_norm: float = 0.0, foreach: Optional[bool] = None,
        fused: Optional[bool] = None, maximize: bool = False, capturable: bool = False,
        differentiable: bool = False,
    ):
        defaults = dict(
            defaults, max_grad_norm=max_grad_norm, foreach=foreach, fused=fused, maximize=maximize,
            capturable=capturable, differentiable=differentiable,
        )
        normalize(defaults)
        check_group(type(self), defaults)
        _advice.check_backend_setting()
        defaults["max_grad_norm"] = float(max_grad_norm)
        check_clipping_at_construction(type(self).__name__, max_grad_norm)
        self._registered_ids = set()  # ids of the parameters given to us (see _sharding.foreign_params)
        self._paths_taken = {}  # param group index -> the paths its last step took (step_path)
        self._reuse = {}  # param group index -> _dispatch.Reuse: its last all-kernel step, for the next
        self.last_load_report: Optional[str] = None  # what the last load_state_dict did (see there)
        super().__init__(params, defaults)

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
        check_group(type(self), merged, f" (param group {len(self.param_groups)})", self.defaults)
        normalize(param_group)
        super().add_param_group(param_group)
        self._registered_ids.update(id(p) for p in self.param_groups[-1]["params"])
        _advice.warn_inert_rounding(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_paths_taken", {})
        if "_registered_ids" not in self.__dict__:  # unpickled; load_state_dict() keeps the live set, so
            # flattened partitions (DeepSpeed loads ZeRO checkpoints this way) stay recognised as such
            self._registered_ids = {id(p) for g in self.param_groups for p in g["params"]}
        self.__dict__.setdefault("last_load_report", None)
        self._reuse = {}  # unpickled or loaded: the next step decides afresh
        _pickling.upgrade_groups(self.defaults, self.param_groups)

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

    # ------------------------------------------------------------------ the step
    def step_path(self) -> str:
        """The path each param group's steps took at the last step (before the first step: the path they
        will take), with every fallback and its reason; the Trainer logs it."""
        paths = []
        for i, group in enumerate(self.param_groups):
            taken = self._paths_taken.get(i)
            for path in taken if taken is not None else _dispatch.predict(self, group):
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

        partitioned = stepping_partitions(self, self._registered_ids)
        clip = clip_coefficient(self.param_groups, float(self.defaults.get("max_grad_norm", 0.0)), self._clip_style,
                                float(self.defaults.get("eps", 1e-8)))
        first = 0
        for i, group in enumerate(self.param_groups):
            self._step_group(i, group, clip, partitioned, first)
            first += len(group["params"])
        return loss

    def _new_state(self, p: Tensor, group: dict, like: Optional[Tensor] = None) -> Tensor:
        """A zero buffer for ``p`` in the state dtype (``like``: a copy of that tensor instead)."""
        dtype = state_dtype(group, p)
        if like is not None:
            return like.detach().to(dtype=dtype, copy=True, memory_format=torch.preserve_format)
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _state_for(self, p: Tensor, grad: Tensor, group: dict, clip: Optional[Tensor] = None) -> dict:
        state = self.state[p]
        if any(k not in state for k in self._state_keys(group)):
            # what the step calls the gradient: clipped, negated with maximize (Adan starts its pre_grad from it)
            if clip is not None:
                grad = grad * clip.to(grad.device)
            self._init_state(p, grad.neg() if group.get("maximize", False) else grad, state, group)
        for key in sequence_keys(group, p.dtype):
            if key not in state:
                state[key] = self._new_sequence(p, group, key)
        return state

    def _new_sequence(self, p: Tensor, group: dict, key: str) -> Tensor:
        """Win sequence ``key`` starting at ``x = p``: a copy of ``p``, or for a difference (``x_delta``) 0."""
        return self._new_state(p, group, like=None if key in DIFFERENCE_KEYS.values() else p)

    def step_array_names(self, group: dict, param_dtype: torch.dtype = torch.float32) -> list:
        """The names of the arrays a parameter of ``param_dtype`` is stepped through, in order: ``"param"``,
        ``"grad"``, then the state buffers (the base optimizer's, then the Win sequences, whose keys depend
        on the parameter's dtype: ``_win.sequence_keys``)."""
        return ["param", "grad", *self._state_keys(group), *sequence_keys(group, param_dtype)]

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
        dtypes = [p.dtype for p in params]
        by_dtype = _dispatch.names_by_dtype(self, group, dtypes)
        grads = [p.grad for p in params]
        reuse = self._reuse.get(index)
        if reuse is not None:
            try:
                sig = _dispatch.signature(params, grads, reuse.states, dtypes, by_dtype)
            except (KeyError, IndexError):  # a state buffer was removed, or parameters were added
                sig = None
            if reuse.matches(self, group, by_dtype, present, sig):
                steps = self._advance(group, group_step, reuse.states)
                paths = _dispatch.run_again(self, group, reuse, params, grads, steps, clip)
                if paths is not None:
                    if len(paths) > 1:  # a launch failed: decide afresh next time
                        del self._reuse[index]
                    self._paths_taken[index] = paths
                    return
                self._unadvance(group_step, reuse.states)  # decided afresh below
            del self._reuse[index]
        names = [by_dtype[d] for d in dtypes]
        states = [self._state_for(p, g, group, clip) for p, g in zip(params, grads)]
        steps = self._advance(group, group_step, states)
        # Complex parameters are stepped through their real views (as torch.optim does).
        tensors = [[_real(p), _real(g), *(_real(s[k]) for k in n[2:])] if p.is_complex()
                   else [p, g, *(s[k] for k in n[2:])] for p, g, s, n in zip(params, grads, states, names)]
        plan = _dispatch.decide(self, group, tensors, names, steps, clip)
        _dispatch.run(self, group, plan, tensors, names, steps, pids, clip)
        self._paths_taken[index] = plan.paths
        # not reused: plans with a fallback, of complex parameters, or of DTensor local shards (not in the signature)
        if plan.launches and not plan.eager and not plan.local and not any(p.is_complex() for p in params):
            self._reuse[index] = _dispatch.Reuse(self, group, by_dtype, present, states, tensors, plan, pids,
                                                 _dispatch.signature(params, grads, states, dtypes, by_dtype))

    def _advance(self, group: dict, group_step: bool, states: list) -> list:
        """Count this step (per parameter unless the group counts) and return each parameter's count."""
        if group_step:
            return [group["step"]] * len(states)
        for state in states:
            state["step"] = int(state.get("step", 0)) + 1
        return [s["step"] for s in states]

    def _unadvance(self, group_step: bool, states: list) -> None:
        if not group_step:
            for state in states:
                state["step"] -= 1

    def step_tensors(self, ops, group, params, grads, states, steps, clip) -> None:
        """One step of ``params`` (lists of tensors, ``states`` one dict per parameter) with ``ops`` (the
        ``_ops`` vocabulary): the gradient as the step uses it (``_prepare_grads``), then the base direction
        and the acceleration (``_apply``). The eager paths run exactly this, and the kernels trace it
        (``kernels/tracing.py``)."""
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
        # x (, y), or their differences from the parameter (``_win.sequence_keys``): each form in one call
        for differences in (False, True):
            keys = extra_state_keys(mode, differences)
            idx = [i for i, s in enumerate(states) if keys[0] in s]
            if idx:
                xs = [states[i][keys[0]] for i in idx]
                ys = [states[i][keys[1]] for i in idx] if mode == "win2" else None
                accelerate(ops, [params[i] for i in idx], [updates[i] for i in idx], xs, ys, mode=mode, lr=lr,
                           lam=lam, r1=r1, r2=r2, differences=differences)

    # ------------------------------------------------------------------ memory
    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (all parameters seen so far)."""
        return _memory.state_bytes(self.state)

    @classmethod
    def buffers_per_parameter(cls, mode: str = "win", **hyper) -> int:
        """Parameter-sized buffers this optimizer keeps per parameter in ``mode``."""
        return _memory.buffers_per_parameter(cls, mode, hyper)

    @classmethod
    def state_bytes_per_parameter(cls, mode: str = "win", param_dtype: torch.dtype = torch.float32, **hyper) -> int:
        """State bytes per parameter element in ``mode``: the buffers times the size of the state dtype
        (``hyper["state_dtype"]``, else ``param_dtype``; complex parameters keep complex state)."""
        return _memory.state_bytes_per_parameter(cls, mode, param_dtype, hyper)
