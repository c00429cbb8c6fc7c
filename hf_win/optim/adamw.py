"""AdamW direction (Loshchilov & Hutter), with Win/Win2 acceleration. Weight decay is integrated."""

from __future__ import annotations

from typing import Optional

from ._base import WinOptimizer
from ._ops import scalar_sqrt


def adam_moments(ops, group, grads, states, *, first_moment_scale=None):
    """Update ``exp_avg`` / ``exp_avg_sq`` (and ``max_exp_avg_sq``) in place; return the second moments to use."""
    beta1, beta2 = group["betas"][0], group["betas"][1]
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    ops.mul_(exp_avgs, beta1)
    ops.add_(exp_avgs, grads, alpha=1.0 - beta1 if first_moment_scale is None else first_moment_scale)
    ops.mul_(exp_avg_sqs, beta2)
    ops.addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    if group.get("amsgrad", False):
        maxes = [s["max_exp_avg_sq"] for s in states]
        ops.maximum_(maxes, exp_avg_sqs)
        return exp_avgs, maxes
    return exp_avgs, exp_avg_sqs


class AdamW(WinOptimizer):
    r"""AdamW with Win / Win2 acceleration (``acceleration_mode="none"`` is plain AdamW).

    ``u = m / (sqrt(v)/sqrt(bc2) + eps) / bc1``; weight decay is integrated into the Win sequences
    (proximal), or decoupled (``p <- p*(1 - lr*wd) - lr*u``) in mode ``none``.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (default 1e-3).
        betas: ``(beta1, beta2)`` (default (0.9, 0.999)).
        reckless_steps: ``(r1, r2)``, the reckless step sizes as multiples of ``lr`` (default (2.0, 8.0)).
        eps: added to the denominator (default 1e-8).
        weight_decay: decay coefficient (default 1e-2).
        amsgrad: use the AMSGrad maximum of second moments (default False).
        max_grad_norm: clip the global gradient norm inside the optimizer; ``<= 0`` disables (default 0).
            Under the Hugging Face Trainer leave it at 0 and use ``--max_grad_norm``.
        acceleration_mode: ``"win"`` (default), ``"win2"`` or ``"none"``.
        foreach: multi-tensor (True), per-tensor (False) or automatic (None).
        fused: the step as one generated kernel per param group (C on CPU, Triton on CUDA; see
            ``hf_win/optim/kernels``). None (default): that kernel when ``foreach`` is None too and one
            applies, else foreach; True: the kernel, with a warning when it falls back; False: foreach.
        maximize: maximize the objective instead of minimizing it (default False), as in
            ``torch.optim.AdamW``: the step uses ``-grad`` (``p.grad`` itself is not changed).
        capturable, differentiable: accepted at torch's default (False) so that code written for
            ``torch.optim.AdamW`` passes them through; True raises ``ValueError`` (use torch's optimizer
            for CUDA graphs or a differentiable step).
        state_dtype: dtype of every state buffer (moments, the Win sequences ``x``/``y``): None (default:
            the parameter's dtype), ``torch.float32``/``"float32"`` or ``torch.bfloat16``/``"bfloat16"``.
            Arithmetic is always in float32 (float64 for float64 parameters); bfloat16 buffers are written
            with stochastic rounding, so small steps accumulate on average. AdamW-Win2 with bfloat16 state
            keeps 8 bytes per parameter, torch's fp32 AdamW's. Complex parameters keep complex state. With
            bfloat16 state, float32/float64 parameters keep their sequences as differences from the parameter
            (``x_delta = x - p``, ``y_delta``), so the parameters stay float32-precise (``_win.py``).
        bf16_stochastic_round: write bfloat16 *parameters* back with stochastic rounding (default False:
            round to nearest, where an update below half a bfloat16 ulp is lost), so the expected update
            equals the float32 one (torchao's name).
        rounding_seed: an int in [0, 2**31) (default 0) seeding the rounding. The random bits are a
            function of (seed, step, buffer, parameter index, element) (``hf_win/optim/_rounding.py``):
            the same on every path, and a resumed run rounds exactly as the uninterrupted one.

    Compatibility with ``torch.optim.AdamW`` where nothing above says otherwise, as torch does: lr may be
    given in the param groups only; every hyper-parameter may be set per param group (except
    ``max_grad_norm``: one value for all groups); keys it does not know are kept in the groups; complex
    parameters are stepped as their real view (``torch.view_as_real``); ``load_state_dict`` takes the
    checkpoint's hyper-parameters, and converts a ``torch.optim.AdamW`` state dict or one of another
    ``acceleration_mode`` by the rules of ``WinOptimizer.load_state_dict``.
    """

    _integrated_decay = True
    _vanilla_decay = "decoupled"
    _l2_in_grad = "never"
    _torch_sources = ("AdamW",)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        reckless_steps=(2.0, 8.0),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
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
        defaults = dict(
            lr=lr, betas=betas,
            reckless_steps=reckless_steps,
            eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, acceleration_mode=acceleration_mode,
            state_dtype=state_dtype, bf16_stochastic_round=bf16_stochastic_round, rounding_seed=rounding_seed,
        )
        super().__init__(
            params, defaults, max_grad_norm=max_grad_norm, foreach=foreach, fused=fused, maximize=maximize,
            capturable=capturable, differentiable=differentiable,
        )

    @classmethod
    def _state_keys(cls, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group.get("amsgrad") else ("exp_avg", "exp_avg_sq")

    def _direction(self, ops, group, params, grads, states, steps):
        beta1, beta2 = group["betas"]
        exp_avgs, second = adam_moments(ops, group, grads, states)
        denom = ops.sqrt(second)
        ops.div_(denom, [scalar_sqrt(1.0 - beta2**t) for t in steps])
        ops.add_scalar_(denom, group["eps"])
        ops.reciprocal_(denom)
        ops.mul_tensors_(denom, exp_avgs)
        ops.div_(denom, [1.0 - beta1**t for t in steps])
        return denom
