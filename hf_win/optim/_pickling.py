"""Optimizers and param groups from older hf_win versions: the attributes and group keys they lack.

``WinOptimizer.__setstate__`` runs this on an unpickled optimizer and, through torch's
``Optimizer.load_state_dict`` (which ends with ``__setstate__``), after every load, so groups of
checkpoints older than a key get its default, as torch does for its own keys.
"""

from __future__ import annotations

__all__ = ["upgrade"]

#: Group keys added over time, with the value that means "as before".
_GROUP_DEFAULTS = {"foreach": None, "fused": None, "maximize": False, "capturable": False, "differentiable": False}


def upgrade(opt) -> None:
    """Fill in what ``opt`` (a ``WinOptimizer`` just given its ``__dict__``) lacks."""
    state = opt.__dict__
    state.setdefault("_paths_taken", {})
    if "_registered_ids" not in state:  # unpickled; load_state_dict() keeps the live set, so flattened
        # partitions (DeepSpeed loads ZeRO checkpoints this way) stay recognised as such
        state["_registered_ids"] = {id(p) for g in opt.param_groups for p in g["params"]}
    state.setdefault("last_load_report", None)
    for key in ("maximize", "capturable", "differentiable"):
        opt.defaults.setdefault(key, False)
    for group in opt.param_groups:
        for key, value in _GROUP_DEFAULTS.items():
            group.setdefault(key, value)
        group.setdefault("max_grad_norm", opt.defaults.get("max_grad_norm", 0.0))
