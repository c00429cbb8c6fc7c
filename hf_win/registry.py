"""The one registry of optimizer names.

The Trainer flags (``--optim``), ``create_optimizer``, the examples and the benchmarks all read
``OPTIMIZERS``; nothing else lists the names.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from .optim import LAMB, SGD, AdafactorWin, Adam, AdamW, Adan, MuonWin, NAdamWin, RAdamWin, Win

__all__ = ["OptimizerSpec", "OPTIMIZERS", "available_optimizers", "get_optimizer_spec", "create_optimizer"]


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    cls: type
    summary: str

    @property
    def hyperparameters(self) -> Dict[str, object]:
        """Constructor keywords (besides ``params``) with their defaults (``inspect._empty`` if required)."""
        sig = inspect.signature(self.cls.__init__)
        return {k: p.default for k, p in sig.parameters.items() if k not in ("self", "params")}

    @property
    def accepted_keys(self) -> Tuple[str, ...]:
        return tuple(self.hyperparameters)

    @property
    def wraps_base(self) -> bool:
        """Built as ``hf_win.Win`` around an optimizer written elsewhere (torch.optim's): its execution paths,
        state layout and checkpoint conversions are that optimizer's, not those of hf_win's own optimizers."""
        return issubclass(self.cls, Win)


OPTIMIZERS: Dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("adamw_win", AdamW, "AdamW (decoupled decay, integrated into Win)"),
        OptimizerSpec("adam_win", Adam, "Adam (L2 decay in the gradient)"),
        OptimizerSpec("lamb_win", LAMB, "LAMB (layer-wise trust ratio)"),
        OptimizerSpec("sgd_win", SGD, "SGD with (Nesterov) momentum"),
        OptimizerSpec("adan_win", Adan, "Adan (Nesterov momentum estimation)"),
        OptimizerSpec("adafactor_win", AdafactorWin, "torch.optim.Adafactor (factored second moment), as Win(base)"),
        OptimizerSpec("nadam_win", NAdamWin, "torch.optim.NAdam (Nesterov Adam), as Win(base)"),
        OptimizerSpec("radam_win", RAdamWin, "torch.optim.RAdam (rectified Adam), as Win(base)"),
        OptimizerSpec("muon_win", MuonWin, "torch.optim.Muon on hidden matrices, AdamW on the rest, as Win(base)"),
    )
}


def available_optimizers() -> List[str]:
    """The registry's optimizer names, e.g. ``['adamw_win', 'adam_win', ...]``."""
    return list(OPTIMIZERS)


def get_optimizer_spec(name: str) -> OptimizerSpec:
    key = str(name).lower() if name is not None else name
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[key]


def create_optimizer(name: str, params, **kwargs) -> torch.optim.Optimizer:
    """Build the registry optimizer ``name`` over ``params`` with constructor keywords ``kwargs``.

    Unknown keywords raise ``ValueError`` naming the accepted ones.
    """
    spec = get_optimizer_spec(name)
    unknown = sorted(set(kwargs) - set(spec.accepted_keys))
    if unknown:
        raise ValueError(
            f"{spec.name} does not take {', '.join(unknown)}; accepted keywords: {', '.join(spec.accepted_keys)}"
        )
    return spec.cls(params, **kwargs)

