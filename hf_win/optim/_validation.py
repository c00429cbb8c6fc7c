"""The one check of a Win optimizer's hyper-parameters: the constructor's defaults, every param group added
later and every param group of a loaded state dict go through ``check_group``.

Each error is a ``ValueError`` naming the optimizer, the key (with where it was given: " (param group 1)")
and the allowed values, raised before anything is changed.
"""

from __future__ import annotations

import math
import numbers

from torch import Tensor
from torch.optim.optimizer import required

from ._precision import as_dtype
from ._win import MODES

__all__ = ["is_number", "normalize", "check_acceleration", "check_group"]

#: Keys whose values come as lists from JSON/YAML configs and are kept as tuples.
TUPLE_KEYS = ("betas", "reckless_steps")
#: Boolean keys of some base optimizer.
BOOL_KEYS = ("amsgrad", "nesterov", "bias_correction", "grad_averaging", "trust_clip", "always_adapt", "maximize")
#: Non-negative numbers of some base optimizer.
NON_NEGATIVE_KEYS = ("eps", "weight_decay", "momentum", "dampening")
#: torch's flags accepted only at their default (False), and what to use instead.
TORCH_ONLY_FLAGS = {
    "capturable": "torch.optim.AdamW or torch.optim.Adam with capturable=True for CUDA graphs",
    "differentiable": "torch.optim.AdamW(differentiable=True) to differentiate through the step",
}


def is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def normalize(group: dict) -> None:
    """Lists (from JSON/YAML configs) of ``TUPLE_KEYS`` become tuples, in place."""
    for key in TUPLE_KEYS:
        if isinstance(group.get(key), list):
            group[key] = tuple(group[key])


def check_acceleration(name: str, group: dict, where: str = "") -> None:
    """``acceleration_mode`` and ``reckless_steps`` of ``group`` (``name``: the optimizer, in the message);
    hf_win's optimizers and the ``Win`` wrapper check them here."""
    mode = group.get("acceleration_mode")
    if mode not in MODES:
        raise ValueError(f"{name}: acceleration_mode{where} must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    rs = group.get("reckless_steps")
    if (not isinstance(rs, (tuple, list)) or len(rs) != 2
            or not all(is_number(r) and r > 0 and math.isfinite(r) for r in rs)):
        raise ValueError(f"{name}: reckless_steps{where} must be two positive numbers (r1, r2), e.g. (2.0, 8.0); "
                         f"got {rs!r}")


def check_group(cls, group: dict, where: str = "", defaults: dict = None) -> None:
    """Raise ``ValueError`` for the first key of ``group`` that ``cls`` (a ``WinOptimizer`` class) does not
    accept. ``defaults``: the optimizer's defaults when ``group`` is a param group (its ``_global_keys``
    must then equal the defaults'); None when ``group`` is the constructor's defaults, where ``lr`` may
    still be the ``required`` sentinel (SGD: torch's rule, every group must then give its own)."""
    name = cls.__name__
    check_acceleration(name, group, where)
    _check_lr(name, group.get("lr"), where, defaults is None)
    if "max_grad_norm" in group and not is_number(group["max_grad_norm"]):
        raise ValueError(f"{name}: max_grad_norm{where} must be a number (<= 0 disables clipping), "
                         f"got {group['max_grad_norm']!r}")
    for key in NON_NEGATIVE_KEYS:
        if key in group and (not is_number(group[key]) or group[key] < 0):
            raise ValueError(f"{name}: {key}{where} must be a number >= 0, got {group[key]!r}")
    if "momentum" in group and group["momentum"] >= 1:
        raise ValueError(f"{name}: momentum{where} must be in [0, 1), got {group['momentum']!r}")
    if "betas" in group:
        betas = group["betas"]
        if (not isinstance(betas, (tuple, list)) or len(betas) != cls._n_betas
                or not all(is_number(b) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"{name}: betas{where} must be {cls._n_betas} numbers each in [0, 1), got {betas!r}")
    for key in BOOL_KEYS:
        if key in group and not isinstance(group[key], bool):
            raise ValueError(f"{name}: {key}{where} must be True or False, got {group[key]!r}")
    for key, instead in TORCH_ONLY_FLAGS.items():
        value = group.get(key, False)
        if value is not False:
            raise ValueError(f"{name}: {key}{where} must be False (torch's default): {key}={value!r} is not "
                             f"supported (only False is accepted); use {instead}")
    _check_run_flags(name, group, where)
    if defaults is not None:
        for key in cls._global_keys:
            if key in group and group[key] != defaults.get(key):
                raise ValueError(
                    f"{name}: {key}{where} = {group[key]!r} differs from the constructor's {defaults.get(key)!r}; "
                    f"{key} is one value for all param groups (gradient clipping uses one global norm over every "
                    f"group): set it in the constructor")
    _check_low_precision(name, group, where)


def _check_lr(name: str, lr, where: str, constructor: bool) -> None:
    if isinstance(lr, type(required)):
        if not constructor:
            raise ValueError(
                f"{name}: lr is required{where}: give lr= to the constructor or an 'lr' in every param group")
        return
    value = lr
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{name}: lr{where} as a tensor must have one element")
        value = float(lr)
    if not is_number(value) or value < 0:
        raise ValueError(f"{name}: lr{where} must be a number >= 0, got {lr!r}")


def _check_run_flags(name: str, group: dict, where: str) -> None:
    for key in ("foreach", "fused"):
        if group.get(key) not in (None, True, False):
            raise ValueError(f"{name}: {key}{where} must be None, True or False, got {group[key]!r}")
    if group.get("fused") and group.get("foreach") is not None:
        raise ValueError(
            f"{name}: fused=True{where} cannot be combined with foreach={group['foreach']!r} (as in torch.optim): "
            "fused is the kernel, foreach an eager path; leave foreach=None with fused=True")


def _check_low_precision(name: str, group: dict, where: str) -> None:
    if group.get("state_dtype") is not None:
        try:
            as_dtype(group["state_dtype"])
        except (TypeError, ValueError):
            raise ValueError(
                f"{name}: state_dtype{where} must be None (the parameter's dtype), 'float32' or 'bfloat16' "
                f"(or torch.float32 / torch.bfloat16), got {group['state_dtype']!r}") from None
    if not isinstance(group.get("bf16_stochastic_round", False), bool):
        raise ValueError(
            f"{name}: bf16_stochastic_round{where} must be True or False, got {group['bf16_stochastic_round']!r}")
    seed = group.get("rounding_seed", 0)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise ValueError(f"{name}: rounding_seed{where} must be an int in [0, 2**31), got {seed!r}")
