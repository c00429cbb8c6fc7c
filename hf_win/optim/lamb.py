"""LAMB direction (You et al., the NVLAMB variant of the authors' code), with Win/Win2 acceleration.

The step count lives in the param group. Weight decay enters the direction before the layer-wise trust
ratio, so it is not integrated by Win (``lam = 0``). The trust ratio uses the norm of each *whole*
parameter tensor: for sharded parameters (DTensor under FSDP2) the norm is computed over the whole tensor.
"""

from __future__ import annotations

import warnings
from typing import Optional

from ._base import WinOptimizer
from ._ops import scalar_sqrt
from .adamw import adam_moments


class LAMB(WinOptimizer):
    r"""LAMB with Win / Win2 acceleration; ``acceleration_mode="none"`` is plain LAMB.

    ``u = (m/bc1) / (sqrt(v)/sqrt(bc2) + eps)``; with ``weight_decay != 0``: ``u += wd*p``; with
    ``weight_decay != 0`` or ``always_adapt``: ``u *= ||p|| / ||u||`` (1 when a norm is 0; at most 1 with
    ``trust_clip``).

    Args:
        lr (1e-3), bias_correction (True), betas ((0.9, 0.999)), reckless_steps ((2.0, 8.0)), eps (1e-6),
        weight_decay (0.01), grad_averaging (True), max_grad_norm (1.0; ``<= 0`` disables; under the
        Trainer use 0 and ``--max_grad_norm``), trust_clip (False), always_adapt (False),
        acceleration_mode ("win"), foreach (None), fused (None: see AdamW), maximize (False),
        capturable / differentiable (False only; see AdamW).
        state_dtype (None: the parameter's dtype), bf16_stochastic_round (False), rounding_seed (0):
        low-precision state and parameters, see AdamW.

    Without weight decay and without ``always_adapt`` there is no trust ratio: this is then exactly
    Adam(W)-Win with LAMB's defaults (timm's and the authors' semantics); a ``UserWarning`` says so once
    per optimizer. Pass ``always_adapt=True`` (Trainer: ``--optim_args always_adapt=true``) to apply the
    trust ratio anyway. Torch compatibility otherwise as :class:`AdamW` (torch has no LAMB).
    """

    _integrated_decay = False
    _vanilla_decay = None
    _l2_in_grad = "never"
    _group_step = True
    _clip_style = "lamb"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas=(0.9, 0.999),
        reckless_steps=(2.0, 8.0),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        grad_averaging: bool = True,
        max_grad_norm: float = 1.0,
        trust_clip: bool = False,
        always_adapt: bool = False,
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
            lr=lr, bias_correction=bias_correction, betas=betas,
            reckless_steps=reckless_steps,
            eps=eps, weight_decay=weight_decay, grad_averaging=grad_averaging, trust_clip=trust_clip,
            always_adapt=always_adapt, acceleration_mode=acceleration_mode,
            state_dtype=state_dtype, bf16_stochastic_round=bf16_stochastic_round, rounding_seed=rounding_seed,
        )
        super().__init__(
            params, defaults, max_grad_norm=max_grad_norm, foreach=foreach, fused=fused, maximize=maximize,
            capturable=capturable, differentiable=differentiable,
        )
        if not any(g["weight_decay"] != 0.0 or g["always_adapt"] for g in self.param_groups):
            warnings.warn(
                f"{type(self).__name__}: weight_decay is 0 and always_adapt is False in every param group, so the "
                "layer-wise trust ratio is never applied (timm's and the authors' semantics): this optimizer is "
                "then Adam-Win with LAMB's defaults. Pass always_adapt=True (Trainer: --optim_args "
                "always_adapt=true) to apply the trust ratio without weight decay.",
                UserWarning, stacklevel=2,
            )

    @classmethod
    def _state_keys(cls, group):
        return ("exp_avg", "exp_avg_sq")

    def _needs_whole_tensors(self, group):
        return group["weight_decay"] != 0.0 or group["always_adapt"]

    def _direction(self, ops, group, params, grads, states, steps):
        beta1, beta2 = group["betas"]
        t = steps[0]
        if group["bias_correction"]:
            bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
        else:
            bc1, bc2 = 1.0, 1.0
        scale = (1.0 - beta1) if group["grad_averaging"] else 1.0
        exp_avgs, exp_avg_sqs = adam_moments(ops, group, grads, states, first_moment_scale=scale)
        denom = ops.sqrt(exp_avg_sqs)
        ops.div_(denom, scalar_sqrt(bc2))
        ops.add_scalar_(denom, group["eps"])
        ops.reciprocal_(denom)
        ops.mul_tensors_(denom, exp_avgs)
        ops.div_(denom, bc1)
        wd = group["weight_decay"]
        if wd != 0.0:
            ops.add_(denom, params, alpha=wd)
        if wd != 0.0 or group["always_adapt"]:
            ratios = ops.trust_ratio(ops.norm(params), ops.norm(denom), group["trust_clip"])
            ops.mul_(denom, ratios)
        return denom
