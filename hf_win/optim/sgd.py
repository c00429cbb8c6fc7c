"""SGD with (Nesterov) momentum, with Win/Win2 acceleration.

Weight decay is integrated by Win; in mode ``none`` it is L2 decay folded into (a copy of) the gradient,
as in the authors' code.
"""

from __future__ import annotations

from typing import Optional


from torch.optim.optimizer import required

from ._base import WinOptimizer


class SGD(WinOptimizer):
    r"""SGD with momentum and Win / Win2 acceleration; ``acceleration_mode="none"`` is plain SGD.

    ``buf <- g`` on the first step, then ``buf <- momentum*buf + (1-dampening)*g``;
    ``u = g + momentum*buf`` with ``nesterov``, else ``buf``.

    Args:
        lr (required), momentum (0.9), dampening (0), reckless_steps ((2.0, 8.0)), weight_decay (0),
        max_grad_norm (0; ``<= 0`` disables), nesterov (True), acceleration_mode ("win"),
        eps (1e-8, used only by gradient clipping, so one value for all groups), foreach (None),
        fused (None: see AdamW), maximize (False), capturable / differentiable (False only; see AdamW).
        state_dtype (None: the parameter's dtype), bf16_stochastic_round (False), rounding_seed (0):
        low-precision state and parameters, see AdamW.

    As ``torch.optim.SGD`` with its ``required`` lr: lr may be given in the param groups only; an error
    is raised only when some group ends up without one. ``load_state_dict`` converts a
    ``torch.optim.SGD`` state dict (``momentum_buffer`` becomes ``momentum``). Torch compatibility
    otherwise as :class:`AdamW`.
    """

    _integrated_decay = True
    _vanilla_decay = None
    _l2_in_grad = "vanilla"
    _global_keys = ("max_grad_norm", "eps")  # eps is only the clipping's
    _torch_sources = ("SGD",)

    def __init__(
        self,
        params,
        lr: float = required,
        momentum: float = 0.9,
        dampening: float = 0.0,
        reckless_steps=(2.0, 8.0),
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        nesterov: bool = True,
        acceleration_mode: str = "win",
        eps: float = 1e-8,
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
        if lr is None:  # the authors' signature had lr=None for "required"
            lr = required
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening,
            reckless_steps=reckless_steps,
            weight_decay=weight_decay, nesterov=nesterov, acceleration_mode=acceleration_mode, eps=eps,
            state_dtype=state_dtype, bf16_stochastic_round=bf16_stochastic_round, rounding_seed=rounding_seed,
        )
        super().__init__(
            params, defaults, max_grad_norm=max_grad_norm, foreach=foreach, fused=fused, maximize=maximize,
            capturable=capturable, differentiable=differentiable,
        )

    @classmethod
    def _state_keys(cls, group):
        return ("momentum",)

    def _direction(self, ops, group, params, grads, states, steps):
        momentum, dampening = group["momentum"], group["dampening"]
        bufs = [s["momentum"] for s in states]
        # ``t == 1`` on a traced step records a guard (kernels/tracing.py): the kernel of the first step and
        # that of later steps are two kernels.
        first = [i for i, t in enumerate(steps) if t == 1]
        later = [i for i, t in enumerate(steps) if not t == 1]
        if first:
            ops.copy_([bufs[i] for i in first], [grads[i] for i in first])
        if later:
            lb = [bufs[i] for i in later]
            ops.mul_(lb, momentum)
            ops.add_(lb, [grads[i] for i in later], alpha=1.0 - dampening)
        if group["nesterov"]:
            updates = ops.clone(grads)
            ops.add_(updates, bufs, alpha=momentum)
            return updates
        return bufs
