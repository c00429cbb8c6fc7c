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
"""

from __future__ import annotations

MODES = ("win", "win2", "none")

#: How the vanilla (``acceleration_mode="none"``) step applies weight decay after ``p <- p - lr*u``.
#: ``"decoupled"``: ``p <- p*(1 - lr*wd) - lr*u`` (AdamW); ``"proximal"``: ``p <- (p - lr*u)/(1 + lr*wd)``
#: (Adan); ``None``: the base optimizer's direction already holds its decay (Adam, LAMB, SGD).
VANILLA_DECAYS = ("decoupled", "proximal", None)


def extra_state_keys(mode: str) -> tuple:
    """The parameter-sized buffers the acceleration keeps for ``mode``."""
    return {"win": ("x",), "win2": ("x", "y"), "none": ()}[mode]


def win_coefficients(lr: float, lam: float, r1: float, r2: float) -> dict:
    """Scalar coefficients of one Win/Win2 step (Python floats, no division by ``lr``).

    The mixes are applied in difference form, ``p <- keep*p + c_x*(x - p) + ...``: the same number as
    ``c1*(p + r1*x - ...)`` (``c1 + r1*c1 = 1 - r1*c1*lr*lam``), but when ``x == p`` (a first step, or a
    step at ``lr == 0`` such as the one ``torch.distributed.checkpoint`` takes to create the state) the
    difference is exactly 0 and the parameter keeps every bit. ``keep1`` / ``keep2`` are exactly 1 when
    ``lr*lam == 0``."""
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


def accelerate(ops, params, updates, xs, ys, *, mode, lr, lam, r1, r2):
    """Apply one Win (``ys`` unused) or Win2 step in place. ``updates`` is not modified."""
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
    taken from ``target`` before it changes."""
    diffs = [(ops.sub(s, target), c) for s, c in pulls]
    if lam != 0.0:
        ops.mul_(target, keep)
    for d, c in diffs:
        ops.add_(target, d, alpha=c)
    ops.add_(target, updates, alpha=c_u)


def vanilla_step(ops, params, updates, *, lr, weight_decay, decay):
    """The base optimizer's own step for ``acceleration_mode="none"``."""
    if decay == "decoupled" and weight_decay != 0.0:
        ops.mul_(params, 1.0 - lr * weight_decay)
    ops.add_(params, updates, alpha=-lr)
    if decay == "proximal" and weight_decay != 0.0:
        ops.div_(params, 1.0 + lr * weight_decay)
