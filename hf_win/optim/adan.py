"""Adan direction (Xie et al., 2022), with Win/Win2 acceleration.

No Win-accelerated Adan has been published; this project defines it as Adan's direction fed to the
shared acceleration with integrated weight decay. Mode ``none`` is Adan as published (proximal decay, the
``no_prox=False`` variant). The step count lives in the param group, and ``pre_grad`` starts as the
parameter's first gradient as the step uses it, after clipping (``max_grad_norm``), as in the published
code, so the first gradient difference is zero.
"""

from __future__ import annotations

from typing import Optional

from ._base import WinOptimizer
from ._ops import scalar_sqrt


class Adan(WinOptimizer):
    r"""Adan with Win / Win2 acceleration; ``acceleration_mode="none"`` is plain Adan.

    ``diff = g - g_prev``; ``m <- b1*m + (1-b1)*g``; ``d <- b2*d + (1-b2)*diff``;
    ``n <- b3*n + (1-b3)*(g + b2*diff)^2``; ``u = (m/bc1 + b2*d/bc2) / (sqrt(n)/sqrt(bc3) + eps)``.

    Args:
        lr (1e-3), betas ((0.98, 0.92, 0.99)), reckless_steps ((2.0, 8.0)), eps (1e-8), weight_decay (0;
        the Adan paper's ViT recipes use 0.02), max_grad_norm (0; ``<= 0`` disables),
        acceleration_mode ("win"), foreach (None), fused (None: see AdamW), maximize (False),
        capturable / differentiable (False only; see AdamW). Torch compatibility as :class:`AdamW`.
        state_dtype (None: the parameter's dtype), bf16_stochastic_round (False), rounding_seed (0):
        low-precision state and parameters, see AdamW.
    """

    _integrated_decay = True
    _vanilla_decay = "proximal"
    _l2_in_grad = "never"
    _group_step = True
    _n_betas = 3

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.98, 0.92, 0.99),
        reckless_steps=(2.0, 8.0),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
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
        defaults = dict(
            lr=lr, betas=betas,
            reckless_steps=reckless_steps,
            eps=eps, weight_decay=weight_decay, acceleration_mode=acceleration_mode,
            state_dtype=state_dtype, bf16_stochastic_round=bf16_stochastic_round, rounding_seed=rounding_seed,
        )
        super().__init__(
            params, defaults, max_grad_norm=max_grad_norm, foreach=foreach, fused=fused, maximize=maximize,
            capturable=capturable, differentiable=differentiable,
        )

    @classmethod
    def _state_keys(cls, group):
        return ("exp_avg", "exp_avg_diff", "exp_avg_sq", "pre_grad")

    def _init_state(self, p, grad, state, group):
        for key in ("exp_avg", "exp_avg_diff", "exp_avg_sq"):
            state[key] = self._new_state(p, group)
        state["pre_grad"] = self._new_state(p, group, like=grad)

    def _direction(self, ops, group, params, grads, states, steps):
        beta1, beta2, beta3 = group["betas"]
        t = steps[0]
        bc1, bc2, bc3 = 1.0 - beta1**t, 1.0 - beta2**t, 1.0 - beta3**t
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_diffs = [s["exp_avg_diff"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        pre_grads = [s["pre_grad"] for s in states]

        diffs = ops.sub(grads, pre_grads)
        ops.mul_(exp_avgs, beta1)
        ops.add_(exp_avgs, grads, alpha=1.0 - beta1)
        ops.mul_(exp_avg_diffs, beta2)
        ops.add_(exp_avg_diffs, diffs, alpha=1.0 - beta2)
        # w = g + b2*diff, reusing the diff buffer
        ops.mul_(diffs, beta2)
        ops.add_(diffs, grads)
        ops.mul_(exp_avg_sqs, beta3)
        ops.addcmul_(exp_avg_sqs, diffs, diffs, value=1.0 - beta3)
        ops.copy_(pre_grads, grads)

        # u = (m/bc1 + b2*d/bc2) / (sqrt(n)/sqrt(bc3) + eps), built in the diff buffer
        denom = ops.sqrt(exp_avg_sqs)
        ops.div_(denom, scalar_sqrt(bc3))
        ops.add_scalar_(denom, group["eps"])
        updates = diffs
        ops.copy_(updates, exp_avgs)
        ops.div_(updates, bc1)
        ops.add_(updates, exp_avg_diffs, alpha=beta2 / bc2)
        ops.div_tensors_(updates, denom)
        return updates
