"""The Win / Win2 acceleration, written once for every base optimizer.

Given the base optimizer's direction ``u`` for a list of parameters, move the parameters (and the extra
sequences ``x`` and, for Win2, ``y``) as in ``ALGORITHM.md``::

    x  <- (x - lr*u) / (1 + lr*lam)                       conservative step with proximal decay
    c1 = 1 / (1 + r1 + r1*lr*lam)
    Win:   p <- c1 * (p + r1*x - r1*lr*u)       (computed as p + r1*c1*(x - p) + ..., see win_coefficients)
    Win2:  y <- c1 * (y + r1*x - r1*lr*u)
           c2 = 1 / (1 + r2 + r2/r1 + r2*lr*lam)
           p <- c2 * (p + r2*x + (r2/r1)*y - r2*lr*u)
    none:  the base optimizer's vanilla step (``vanilla_step``)

``lam`` is the weight decay when the base optimizer integrates it (AdamW, SGD, Adan) and 0 when the base
optimizer already applied it (Adam, LAMB). The constants are ``r1``, ``r2`` and ``r2/r1`` rather than the
public code's ``lr_y/lr_x``, so ``lr == 0`` (the first step of a linear warmup) is an ordinary step.

**Where the sequences are kept.** In the state dtype as ``x`` and ``y``, except for float32 and float64
parameters with bfloat16 state (``state_dtype="bfloat16"``): then as their differences from the
parameter, ``x_delta = x - p`` and ``y_delta = y - p``. The sequences stay within a few steps of the
parameter, so their differences are small numbers, and bfloat16's 8-bit relative precision becomes a tiny
absolute error: a float32 parameter, which
Win rebuilds from ``x`` at every step, stays float32-precise (kept as ``x`` in bfloat16 it would be rounded
to bfloat16 every step), at the same 2 bytes per element. The step is the same math written in differences
(``_accelerate_differences``); the differences start at 0 (``x = p``). Not for bfloat16 (or float16)
parameters: their own rounding would then be carried into the sequences, which keep the updates that a
parameter rounded to nearest loses.
"""

from __future__ import annotations

import torch

from ._precision import state_dtype_for

MODES = ("win", "win2", "none")

#: The state keys of the Win sequences when kept as differences from the parameter (bfloat16 state).
DIFFERENCE_KEYS = {"x": "x_delta", "y": "y_delta"}

#: How the vanilla (``acceleration_mode="none"``) step applies weight decay after ``p <- p - lr*u``.
#: ``"decoupled"``: ``p <- p*(1 - lr*wd) - lr*u`` (AdamW); ``"proximal"``: ``p <- (p - lr*u)/(1 + lr*wd)``
#: (Adan); ``None``: the base optimizer's direction already holds its decay (Adam, LAMB, SGD).
VANILLA_DECAYS = ("decoupled", "proximal", None)


def extra_state_keys(mode: str, differences: bool = False) -> tuple:
    """The parameter-sized buffers the acceleration keeps for ``mode``: the sequences (``x``, ``y``), or
    their differences from the parameter (``x_delta``, ``y_delta``) with ``differences``."""
    keys = {"win": ("x",), "win2": ("x", "y"), "none": ()}[mode]
    return tuple(DIFFERENCE_KEYS[k] for k in keys) if differences else keys


def stores_differences(group, param_dtype: torch.dtype) -> bool:
    """Whether a param group keeps the Win sequences of a ``param_dtype`` parameter as differences from
    the parameter: bfloat16 state of a float32 or float64 parameter."""
    return param_dtype in (torch.float32, torch.float64) and state_dtype_for(group, param_dtype) == torch.bfloat16


def sequence_keys(group, param_dtype: torch.dtype) -> tuple:
    """The Win sequences' state keys of a ``param_dtype`` parameter in a param group (its
    ``acceleration_mode`` and ``state_dtype``)."""
    return extra_state_keys(group["acceleration_mode"], stores_differences(group, param_dtype))


def win_coefficients(lr: float, lam: float, r1: float, r2: float) -> dict:
    """Scalar coefficients of one Win/Win2 step (Python floats, no division by ``lr``).

    The mixes are applied in difference form, ``p <- keep*p + c_x*(x - p) + ...``: the same number as
    ``c1*(p + r1*x - ...)`` (``c1 + r1*c1 = 1 - r1*c1*lr*lam``), but when ``x == p`` (a first step, or a
    step at ``lr == 0`` such as the one ``torch.distributed.checkpoint`` takes to create the state) the
    difference is exactly 0 and the parameter keeps every bit. ``keep1`` / ``keep2`` are exactly 1 when
    ``lr*lam == 0``. (The eager paths compute them as interpolations, in place: ``_ops.mix_``.)"""
    c1 = 1.0 / (1.0 + r1 + r1 * lr * lam)
    c2 = 1.0 / (1.0 + r2 + r2 / r1 + r2 * lr * lam)
    return {
        "x_decay": 1.0 / (1.0 + lr * lam),
        "keep1": 1.0 - r1 * c1 * lr * lam,
        "c1_x": r1 * c1,
        "c1_u": -r1 * lr * c1,
        "keep2": 1.0 - r2 * c2 * lr * lam,
        "c2_x": r2 * c2,
        "c2_y": (r2 / r1) * c2,
        "c2_u": -r2 * lr * c2,
    }


def accelerate(ops, params, updates, xs, ys, *, mode, lr, lam, r1, r2, differences=False):
    """Apply one Win (``ys`` unused) or Win2 step in place. ``updates`` is not modified. With
    ``differences``, ``xs`` and ``ys`` hold ``x - p`` and ``y - p`` (see the module docstring)."""
    if differences:
        _accelerate_differences(ops, params, updates, xs, ys, mode=mode, lr=lr, lam=lam, r1=r1, r2=r2)
        return
    k = win_coefficients(lr, lam, r1, r2)
    ops.add_(xs, updates, alpha=-lr)
    if lam != 0.0:
        ops.mul_(xs, k["x_decay"])
    if mode == "win":
        _mix(ops, params, [(xs, k["c1_x"])], updates, k["c1_u"], k["keep1"], lam)
    elif mode == "win2":
        _mix(ops, ys, [(xs, k["c1_x"])], updates, k["c1_u"], k["keep1"], lam)
        _mix(ops, params, [(xs, k["c2_x"]), (ys, k["c2_y"])], updates, k["c2_u"], k["keep2"], lam)
    else:  # pragma: no cover - guarded by validation
        raise ValueError(f"acceleration_mode must be one of {MODES}, got {mode!r}")


def _mix(ops, target, pulls, updates, c_u, keep, lam):
    """``target <- keep*target + sum(c*(s - target) for s, c in pulls) + c_u*updates``, the differences
    taken from ``target`` before it changes (``ops.mix_``: exact when every ``s == target``)."""
    ops.mix_(target, pulls, keep if lam != 0.0 else None)
    ops.add_(target, updates, alpha=c_u)


def _accelerate_differences(ops, params, updates, dxs, dys, *, mode, lr, lam, r1, r2):
    """``accelerate`` on ``dx = x - p`` and ``dy = y - p``: the same steps, each sequence's new value taken
    relative to the old parameter, then the parameter's move ``dp`` subtracted from them. With
    ``w = u + lam*p`` (the decay folded into the direction: ``keep - 1 = lam*c_u``, ``x_decay - 1 =
    -lr*lam*x_decay``)::

        Dx = x_new - p   = x_decay*(dx - lr*w)
        Dy = y_new - p   = (keep1 - c1_x)*dy + c1_x*Dx + c1_u*w                      (Win2)
        dp = p_new - p   = c_x*Dx [+ c2_y*Dy] + c_u*w
        p += dp;  dx = Dx - dp;  dy = Dy - dp

    A step at ``lr == 0`` with ``dx == dy == 0`` leaves every bit of ``p``: its move is a sum of zeros."""
    k = win_coefficients(lr, lam, r1, r2)
    if lam != 0.0:
        ws = ops.scaled(params, lam)
        ops.add_(ws, updates)
    else:
        ws = updates
    ops.add_(dxs, ws, alpha=-lr)
    if lam != 0.0:
        ops.mul_(dxs, k["x_decay"])
    if mode == "win":
        moves = ops.scaled(dxs, k["c1_x"])
        c_u = k["c1_u"]
    elif mode == "win2":
        ops.mul_(dys, k["keep1"] - k["c1_x"])
        ops.add_(dys, dxs, alpha=k["c1_x"])
        ops.add_(dys, ws, alpha=k["c1_u"])
        moves = ops.scaled(dxs, k["c2_x"])
        ops.add_(moves, dys, alpha=k["c2_y"])
        c_u = k["c2_u"]
    else:  # pragma: no cover - guarded by validation
        raise ValueError(f"acceleration_mode must be one of {MODES}, got {mode!r}")
    ops.add_(moves, ws, alpha=c_u)
    ops.add_(params, moves)
    ops.add_(dxs, moves, alpha=-1.0)
    if mode == "win2":
        ops.add_(dys, moves, alpha=-1.0)


def vanilla_step(ops, params, updates, *, lr, weight_decay, decay):
    """The base optimizer's own step for ``acceleration_mode="none"``."""
    if decay == "decoupled" and weight_decay != 0.0:
        ops.mul_(params, 1.0 - lr * weight_decay)
    ops.add_(params, updates, alpha=-lr)
    if decay == "proximal" and weight_decay != 0.0:
        ops.div_(params, 1.0 + lr * weight_decay)
