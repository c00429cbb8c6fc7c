"""The acceleration pass of ``Win(base)``, written once over the ``_ops`` vocabulary, so that it runs as one
fused kernel where one applies and on foreach otherwise (``_dispatch`` decides, as for hf_win's own
optimizers; ``kernels.find`` traces :meth:`WinPass.step_tensors`).

Per parameter it reads ``param`` (after the base optimizer's step), ``before`` (the parameter before that
step: the wrapper's one transient copy) and ``x`` (and ``y``). It recovers the step ``lr*u = before - param``
(exact whenever the two are within a factor 2 of each other: Sterbenz's lemma, the usual case), puts the
parameter back to ``before`` and applies ``_win.accelerate`` with that step as the update of a unit learning
rate, the decay per step being ``lr * win_weight_decay`` (every coefficient of ``ALGORITHM.md`` depends on
``lr`` only through ``lr*lam`` and ``lr*u``). In a kernel ``lr*u`` lives in registers; on foreach it is one
more parameter-sized temporary.

The param group it sees is the wrapper's summary of the base's group (:func:`pass_group`): the Win keys,
the learning rate where the decay needs it, and the wrapper's ``fused`` choice.
"""

from __future__ import annotations

from typing import Optional

from ._win import accelerate, extra_state_keys

__all__ = ["WinPass", "WIN_PASS", "pass_group"]


def pass_group(group: dict, fused: Optional[bool]) -> dict:
    """The pass's view of one of the base's param groups (numbers re-read at every call)."""
    wd = group["win_weight_decay"]
    return {"acceleration_mode": group["acceleration_mode"], "reckless_steps": tuple(group["reckless_steps"]),
            "win_weight_decay": float(wd), "lr": float(group["lr"]) if wd else 0.0,
            "fused": fused, "foreach": None}


class WinPass:
    """The ``kernels.Steppable`` of the wrapper's acceleration (no state of its own)."""

    def step_array_names(self, group: dict, param_dtype=None) -> list:
        """The arrays of a parameter (its dtype does not change them: the wrapper keeps ``x``/``y``)."""
        return ["param", "before", *extra_state_keys(group["acceleration_mode"])]

    def step_tensors(self, ops, group, params, grads, states, steps, clip) -> None:
        befores = grads  # the "grad" slot holds the parameters before the base's step (read only)
        steps_taken = ops.sub(befores, params)  # lr*u = before - after
        ops.copy_(params, befores)  # back to before, exactly
        mode = group["acceleration_mode"]
        r1, r2 = group["reckless_steps"]
        xs = [s["x"] for s in states]
        ys = [s["y"] for s in states] if mode == "win2" else None
        accelerate(ops, params, steps_taken, xs, ys, mode=mode, lr=1.0,
                   lam=group["lr"] * group["win_weight_decay"], r1=r1, r2=r2)


WIN_PASS = WinPass()
