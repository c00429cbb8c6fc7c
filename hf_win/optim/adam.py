"""Adam direction (Kingma & Ba) with L2 weight decay, with Win/Win2 acceleration.

The decay is folded into (a copy of) the gradient, ``g <- g + wd*p``, so it is not integrated (``lam = 0``).
As in the authors' code, ``eps`` is added to ``sqrt(v)`` before bias correction.
"""

from __future__ import annotations

from typing import Optional

from ._ops import scalar_sqrt
from .adamw import AdamW, adam_moments


class Adam(AdamW):
    r"""Adam (L2 weight decay) with Win / Win2 acceleration; ``acceleration_mode="none"`` is plain Adam.

    ``u = m / (sqrt(v) + eps) * sqrt(bc2) / bc1`` with ``g <- g + wd*p`` first.
    Same arguments (``maximize``, ``capturable``, ``differentiable``, ``state_dtype``,
    ``bf16_stochastic_round`` and ``rounding_seed`` included) and the same torch
    compatibility as :class:`AdamW`; ``weight_decay`` defaults to 0. ``load_state_dict`` converts a
    ``torch.optim.Adam`` state dict (whose ``eps`` is added after the bias correction; here before it).
    """

    _integrated_decay = False
    _vanilla_decay = None
    _l2_in_grad = "always"
    _torch_sources = ("Adam",)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        reckless_steps=(2.0, 8.0),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        max_grad_norm: float = 0.0,
        acceleration_mode: str = "win",
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        *,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        state_dtype=None,
        bf16_stochastic_round: bool = False,
        rounding_seed: int = 0,
    ):
        super().__init__(
            params, lr=lr, betas=betas, reckless_steps=reckless_steps, eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, max_grad_norm=max_grad_norm, acceleration_mode=acceleration_mode, foreach=foreach,
            fused=fused, maximize=maximize, capturable=capturable, differentiable=differentiable,
            state_dtype=state_dtype, bf16_stochastic_round=bf16_stochastic_round, rounding_seed=rounding_seed,
        )

    def _direction(self, ops, group, params, grads, states, steps):
        beta1, beta2 = group["betas"]
        exp_avgs, second = adam_moments(ops, group, grads, states)
        denom = ops.sqrt(second)
        ops.add_scalar_(denom, group["eps"])
        ops.reciprocal_(denom)
        ops.mul_tensors_(denom, exp_avgs)
        ops.mul_(denom, [scalar_sqrt(1.0 - beta2**t) / (1.0 - beta1**t) for t in steps])
        return denom
