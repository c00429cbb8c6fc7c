"""Lion-Win: a new base optimizer in one small file (the extension contract, docs/extending.md).

Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"): the direction is the sign of
an interpolation of the momentum and the gradient, with decoupled weight decay::

    c = b1*m + (1-b1)*g ;  u = sign(c) ;  m <- b2*m + (1-b2)*g
    none: p <- p*(1 - lr*wd) - lr*u          (Lion as published)

Everything else (Win / Win2 with the decay integrated, validation, clipping, maximize, complex
parameters, the per-tensor / foreach / fused paths, state dicts, sharding checks, the Trainer) comes from
``WinOptimizer``. Not in the registry: it has no convergence check in this project yet.

Use: ``from lion_win import LionWin`` with this folder on ``sys.path`` (or copy the file), then
``LionWin(model.parameters(), lr=1e-4, weight_decay=0.1, acceleration_mode="win")``; under the Trainer,
``Trainer(..., optimizer_cls_and_kwargs=(LionWin, {"lr": 1e-4, "weight_decay": 0.1}))``.
"""

from __future__ import annotations

from typing import Optional

from hf_win.optim import WinOptimizer


class LionWin(WinOptimizer):
    """Lion with Win / Win2 acceleration; ``acceleration_mode="none"`` is plain Lion.

    Args: lr (1e-4: Lion wants 3-10x less than AdamW), betas ((0.9, 0.99)), reckless_steps ((2.0, 8.0)),
    weight_decay (0.0), max_grad_norm (0), acceleration_mode ("win"), foreach, fused, maximize,
    capturable, differentiable (as :class:`hf_win.AdamW`).
    """

    _integrated_decay = True  # Win applies wd as its proximal term
    _vanilla_decay = "decoupled"  # mode "none": p <- p*(1 - lr*wd) - lr*u
    _l2_in_grad = "never"  # the gradient carries no decay

    def __init__(
        self, params, lr: float = 1e-4, betas=(0.9, 0.99), reckless_steps=(2.0, 8.0), weight_decay: float = 0.0,
        max_grad_norm: float = 0.0, acceleration_mode: str = "win", foreach: Optional[bool] = None,
        fused: Optional[bool] = None, *, maximize: bool = False, capturable: bool = False,
        differentiable: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, reckless_steps=reckless_steps, weight_decay=weight_decay,
                        acceleration_mode=acceleration_mode)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, foreach=foreach, fused=fused,
                         maximize=maximize, capturable=capturable, differentiable=differentiable)

    @classmethod
    def _state_keys(cls, group):
        return ("exp_avg",)  # created as zeros before the first step

    def _direction(self, ops, group, params, grads, states, steps):
        beta1, beta2 = group["betas"]
        exp_avgs = [s["exp_avg"] for s in states]
        c = ops.scaled(exp_avgs, beta1)  # new tensors: the momentum is updated below, after its use
        ops.add_(c, grads, alpha=1.0 - beta1)
        u = ops.sign(c)
        ops.mul_(exp_avgs, beta2)
        ops.add_(exp_avgs, grads, alpha=1.0 - beta2)
        return u
