"""Tensor-list operations with two interchangeable implementations.

Every base optimizer writes its direction once, over lists of tensors, in terms of the small vocabulary
below. ``FOREACH`` maps each operation to one ``torch._foreach_*`` call (multi-tensor path, as
``torch.optim`` does with ``foreach=True``); ``PER_TENSOR`` applies the same operation tensor by tensor.
The per-tensor path of an optimizer calls its direction with one-element lists, one parameter at a time,
which is the classic single-tensor loop of ``torch.optim``.

A ``scalar`` argument may be a Python number (the same for every tensor), a list of numbers (one per
tensor) or a list of 0-dim tensors (one per tensor). The fused step runs the same directions over
symbolic elements (``kernels.tracing.SymOps``), where step-dependent scalars are symbolic:
``scalar_sqrt`` is the square root of a scalar, whichever kind it is.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._sharding import is_dtensor


def scalar_sqrt(x):
    """Square root of a step scalar: a Python number (eager paths) or a symbolic scalar (the kernels'
    trace, ``kernels.ir.SymScalar``)."""
    return math.sqrt(x) if isinstance(x, (int, float)) else x.sqrt()


def _trust_ratio(w: Tensor, u: Tensor, clip: bool) -> Tensor:
    """LAMB's layer-wise ratio ``||p|| / ||u||`` (1 when either norm is 0; at most 1 with ``clip``)."""
    one = torch.ones_like(w)
    r = torch.where(w > 0, torch.where(u > 0, w / u, one), one)
    return torch.minimum(r, one) if clip else r


def _per_item(scalar, n):
    if isinstance(scalar, (list, tuple)):
        return scalar
    return [scalar] * n


def _mix_by_lerp(ops, xs, pulls, keep):
    """``mix_`` on an eager path, in place, as interpolations (no temporaries): ``keep*lerp(x, s, c/keep)``
    for one pull, ``keep*lerp(lerp(x, s1, a), s2, b)`` with ``b = c2/keep`` and ``a = (c1/keep)/(1 - b)`` for
    two (``lerp(lerp(x, s1, a), s2, b) = x + a(1-b)(s1 - x) + b(s2 - x)``). torch's lerp returns ``x``
    exactly when ``s == x``."""
    k = 1.0 if keep is None else keep
    if len(pulls) == 1:
        (s, c), = pulls
        ops.lerp_(xs, s, c / k)
    elif len(pulls) == 2:
        (s1, c1), (s2, c2) = pulls
        b = c2 / k
        ops.lerp_(xs, s1, (c1 / k) / (1.0 - b))
        ops.lerp_(xs, s2, b)
    else:  # pragma: no cover - Win pulls towards x, Win2's parameter towards x and y
        raise ValueError(f"mix_ takes one or two pulls, got {len(pulls)}")
    if keep is not None:
        ops.mul_(xs, keep)


class _PerTensorOps:
    """The reference path: one eager op per tensor."""

    @staticmethod
    def mul_(xs, scalar):
        for x, s in zip(xs, _per_item(scalar, len(xs))):
            x.mul_(s)

    @staticmethod
    def div_(xs, scalar):
        for x, s in zip(xs, _per_item(scalar, len(xs))):
            x.div_(s)

    @staticmethod
    def add_scalar_(xs, scalar):
        for x, s in zip(xs, _per_item(scalar, len(xs))):
            x.add_(s)

    @staticmethod
    def add_(xs, ys, alpha=1.0):
        for x, y in zip(xs, ys):
            x.add_(y, alpha=alpha)

    @staticmethod
    def sub(xs, ys):
        return [x - y for x, y in zip(xs, ys)]

    @staticmethod
    def addcmul_(xs, ys, zs, value=1.0):
        for x, y, z in zip(xs, ys, zs):
            x.addcmul_(y, z, value=value)

    @staticmethod
    def lerp_(xs, ys, weight):
        """``x <- x + weight*(y - x)`` (torch's ``lerp_``, a number ``weight``): ``x`` exactly when ``y == x``."""
        for x, y in zip(xs, ys):
            x.lerp_(y, weight)

    def mix_(self, xs, pulls, keep=None):
        """``x <- keep*x + sum(c*(s - x) for s, c in pulls)`` (``keep`` None: 1), the differences taken before
        ``x`` changes: exactly ``x`` when every ``s == x`` and ``keep`` is None (the Win mix, ``_win._mix``)."""
        _mix_by_lerp(self, xs, pulls, keep)

    @staticmethod
    def maximum_(xs, ys):
        for x, y in zip(xs, ys):
            torch.maximum(x, y, out=x)

    @staticmethod
    def sqrt(xs):
        return [x.sqrt() for x in xs]

    @staticmethod
    def reciprocal_(xs):
        for x in xs:
            x.reciprocal_()

    @staticmethod
    def mul_tensors_(xs, ys):
        for x, y in zip(xs, ys):
            x.mul_(y)

    @staticmethod
    def div_tensors_(xs, ys):
        for x, y in zip(xs, ys):
            x.div_(y)

    @staticmethod
    def copy_(xs, ys):
        for x, y in zip(xs, ys):
            x.copy_(y)

    @staticmethod
    def clone(xs):
        return [x.clone() for x in xs]

    @staticmethod
    def scaled(xs, scalar):
        """New tensors ``x * s``."""
        return [x * s for x, s in zip(xs, _per_item(scalar, len(xs)))]

    @staticmethod
    def norm(xs):
        return [torch.linalg.vector_norm(x) for x in xs]

    @staticmethod
    def sign(xs):
        """New tensors ``sign(x)`` (-1, 0 or 1 elementwise)."""
        return [x.sign() for x in xs]

    @staticmethod
    def trust_ratio(w_norms, u_norms, clip: bool):
        return [_trust_ratio(w, u, clip) for w, u in zip(w_norms, u_norms)]


class _ForeachOps:
    """The multi-tensor path: one ``torch._foreach_*`` kernel per operation over the whole list."""

    @staticmethod
    def mul_(xs, scalar):
        torch._foreach_mul_(xs, scalar)

    @staticmethod
    def div_(xs, scalar):
        torch._foreach_div_(xs, scalar)

    @staticmethod
    def add_scalar_(xs, scalar):
        torch._foreach_add_(xs, scalar)

    @staticmethod
    def add_(xs, ys, alpha=1.0):
        torch._foreach_add_(xs, ys, alpha=alpha)

    @staticmethod
    def sub(xs, ys):
        return torch._foreach_sub(xs, ys)

    @staticmethod
    def addcmul_(xs, ys, zs, value=1.0):
        torch._foreach_addcmul_(xs, ys, zs, value=value)

    @staticmethod
    def lerp_(xs, ys, weight):
        torch._foreach_lerp_(xs, ys, weight)

    def mix_(self, xs, pulls, keep=None):
        _mix_by_lerp(self, xs, pulls, keep)

    @staticmethod
    def maximum_(xs, ys):
        torch._foreach_maximum_(xs, ys)

    @staticmethod
    def sqrt(xs):
        return torch._foreach_sqrt(xs)

    @staticmethod
    def reciprocal_(xs):
        torch._foreach_reciprocal_(xs)

    @staticmethod
    def mul_tensors_(xs, ys):
        torch._foreach_mul_(xs, ys)

    @staticmethod
    def div_tensors_(xs, ys):
        torch._foreach_div_(xs, ys)

    @staticmethod
    def copy_(xs, ys):
        if xs and is_dtensor(xs[0]):  # DTensor (FSDP2) has no sharding rule for _foreach_copy_
            for x, y in zip(xs, ys):
                x.copy_(y)
            return
        torch._foreach_copy_(xs, ys)

    @staticmethod
    def clone(xs):
        return [x.clone() for x in xs]

    @staticmethod
    def scaled(xs, scalar):
        return torch._foreach_mul(xs, scalar)

    @staticmethod
    def norm(xs):
        return list(torch._foreach_norm(xs))

    @staticmethod
    def sign(xs):
        return list(torch._foreach_sign(xs))

    trust_ratio = staticmethod(_PerTensorOps.trust_ratio)


PER_TENSOR = _PerTensorOps()
FOREACH = _ForeachOps()
