"""Param groups from older hf_win versions (or torch): the keys they lack.

``WinOptimizer.__setstate__`` runs this on an unpickled optimizer and, through torch's
``Optimizer.load_state_dict`` (which ends with ``__setstate__``), after every load, so groups of
checkpoints older than a key get its default, as torch does for its own keys.
"""

from __future__ import annotations

__all__ = ["upgrade_groups"]

#: Group keys added over time, with the value that means "as before".
_GROUP_DEFAULTS = {"foreach": None, "fused": None, "maximize": False, "capturable": False, "differentiable": False}


def upgrade_groups(defaults: dict, param_groups: list) -> None:
    """Give ``defaults`` and every param group the keys they lack, in place."""
    for key in ("maximize", "capturable", "differentiable"):
        defaults.setdefault(key, False)
    for group in param_groups:
        for key, value in _GROUP_DEFAULTS.items():
            group.setdefault(key, value)
        group.setdefault("max_grad_norm", defaults.get("max_grad_norm", 0.0))
