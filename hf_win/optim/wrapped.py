"""Registry optimizers built as ``Win(base)``: Adafactor, NAdam, RAdam (``torch.optim``) and Muon with
AdamW (``muon.MuonAdamW``), each with the constructor shape of hf_win's own optimizers (``params`` first,
``acceleration_mode`` and ``reckless_steps`` beside the base's hyper-parameters), so that the registry,
the Trainer, ``create_optimizer`` and timm build them by name.

Weight decay follows hf_win's rule: with ``win`` / ``win2`` it is integrated by Win (each param group's
``weight_decay`` becomes its ``win_weight_decay``, the base decays nothing); with ``none`` it is the base's
own decoupled decay (``p <- p*(1 - lr*wd)``: NAdam and RAdam with ``decoupled_weight_decay=True``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._win import extra_state_keys
from .muon import MuonAdamW, muon_param_groups
from .wrapper import Win

__all__ = ["AdafactorWin", "NAdamWin", "RAdamWin", "MuonWin"]


def _groups(params) -> list:
    groups = [params] if isinstance(params, dict) else list(params)
    if not groups:
        raise ValueError("optimizer got an empty parameter list")
    return [dict(g) for g in groups] if isinstance(groups[0], dict) else [{"params": groups}]


class _RegistryWin(Win):
    """``Win`` around a base built from ``params`` by ``_build_base(groups, weight_decay)``."""

    #: parameter-sized buffers the base keeps for a matrix parameter (the registry's table)
    _base_buffers: int = 0
    #: the base optimizer, as the registry's table names it
    base_name: str = ""
    #: how many betas ``betas`` holds (the Trainer's ``--adam_beta1/2``), where the class takes betas
    _n_betas: int = 2

    def __init__(self, params, weight_decay: float, acceleration_mode: str, reckless_steps, **base_kwargs):
        accelerated = acceleration_mode != "none"
        groups = [self._route_decay(g, weight_decay, accelerated) for g in _groups(params)]
        base = self._build_base(groups, weight_decay=0.0 if accelerated else weight_decay, **base_kwargs)
        super().__init__(base, acceleration_mode=acceleration_mode, reckless_steps=reckless_steps,
                         weight_decay=weight_decay if accelerated else 0.0)

    @staticmethod
    def _route_decay(group: dict, weight_decay, accelerated: bool) -> dict:
        """A group's ``weight_decay`` is Win's (``win_weight_decay``) when accelerated, the base's otherwise."""
        group = dict(group)
        wd = group.pop("weight_decay", weight_decay)
        if accelerated:
            group.setdefault("win_weight_decay", wd)
            group["weight_decay"] = 0.0
        else:
            group["weight_decay"] = wd
        return group

    def add_param_group(self, param_group: dict) -> None:
        accelerated = param_group.get("acceleration_mode", self._win_defaults["acceleration_mode"]) != "none"
        default = self._win_defaults["win_weight_decay"] if accelerated else self.base_optimizer.defaults["weight_decay"]
        super().add_param_group(self._route_decay(param_group, default, accelerated))

    @classmethod
    def buffers_per_parameter(cls, mode: str = "win", **hyper) -> int:
        """Parameter-sized buffers per (matrix) parameter in ``mode``: the base's and Win's."""
        return cls._base_buffers + len(extra_state_keys(mode))

    @classmethod
    def state_bytes_per_parameter(cls, mode: str = "win", param_dtype: torch.dtype = torch.float32, **hyper) -> int:
        """State bytes per parameter element in ``mode`` (the state is in the parameter's dtype)."""
        return cls.buffers_per_parameter(mode) * param_dtype.itemsize


class AdafactorWin(_RegistryWin):
    r"""``torch.optim.Adafactor`` with Win / Win2 (``acceleration_mode="none"``: Adafactor itself).

    ``lr`` is Adafactor's (the largest relative step, default 1e-2), ``beta2_decay``, ``d`` and ``eps2``
    (the second of torch's ``eps``; the first stays torch's default) are Adafactor's. Adafactor's second
    moment of a matrix is factored (a row and a column vector), so its state is about Win's ``x`` (and
    ``y``) alone for matrices, one buffer more for vectors.
    """

    _base_buffers = 0
    base_name = "torch.optim.Adafactor"

    def __init__(self, params, lr: float = 1e-2, beta2_decay: float = -0.8, d: float = 1.0, eps2: float = 1e-3,
                 weight_decay: float = 0.0, reckless_steps=(2.0, 8.0), acceleration_mode: str = "win",
                 foreach: Optional[bool] = None, maximize: bool = False):
        super().__init__(params, weight_decay, acceleration_mode, reckless_steps, lr=lr, beta2_decay=beta2_decay,
                         d=d, eps=(None, eps2), foreach=foreach, maximize=maximize)

    @staticmethod
    def _build_base(groups, **kwargs):
        return torch.optim.Adafactor(groups, **kwargs)


class NAdamWin(_RegistryWin):
    r"""``torch.optim.NAdam`` with Win / Win2 (``acceleration_mode="none"``: NAdam with decoupled decay)."""

    _base_buffers = 2
    base_name = "torch.optim.NAdam"

    def __init__(self, params, lr: float = 2e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum_decay: float = 4e-3, reckless_steps=(2.0, 8.0), acceleration_mode: str = "win",
                 foreach: Optional[bool] = None, maximize: bool = False):
        super().__init__(params, weight_decay, acceleration_mode, reckless_steps, lr=lr, betas=tuple(betas), eps=eps,
                         momentum_decay=momentum_decay, decoupled_weight_decay=True, foreach=foreach,
                         maximize=maximize)

    @staticmethod
    def _build_base(groups, **kwargs):
        return torch.optim.NAdam(groups, **kwargs)


class RAdamWin(_RegistryWin):
    r"""``torch.optim.RAdam`` with Win / Win2 (``acceleration_mode="none"``: RAdam with decoupled decay)."""

    _base_buffers = 2
    base_name = "torch.optim.RAdam"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 reckless_steps=(2.0, 8.0), acceleration_mode: str = "win", foreach: Optional[bool] = None,
                 maximize: bool = False):
        super().__init__(params, weight_decay, acceleration_mode, reckless_steps, lr=lr, betas=tuple(betas), eps=eps,
                         decoupled_weight_decay=True, foreach=foreach, maximize=maximize)

    @staticmethod
    def _build_base(groups, **kwargs):
        return torch.optim.RAdam(groups, **kwargs)


class MuonWin(_RegistryWin):
    r"""Muon on the hidden matrices and AdamW on the rest (:class:`~hf_win.optim.muon.MuonAdamW`), with
    Win / Win2 on both (``acceleration_mode="none"``: the two optimizers themselves).

    ``params`` may be a module: it is split by :func:`~hf_win.optim.muon.muon_param_groups` (embeddings
    and the output head to AdamW, decay on tensors of 2 or more dimensions). Param groups may say
    ``use_muon``; otherwise the shape rule of ``muon.py`` applies. Under the Trainer the module is given
    (``WinTrainer`` passes the model). The AdamW part with Win equals ``hf_win.AdamW`` with Win.
    """

    _base_buffers = 1
    base_name = "MuonAdamW"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5, match_rms_adamw: bool = True,
                 reckless_steps=(2.0, 8.0), acceleration_mode: str = "win"):
        if isinstance(params, nn.Module):
            params = muon_param_groups(params, weight_decay)
        super().__init__(params, weight_decay, acceleration_mode, reckless_steps, lr=lr, betas=betas, eps=eps,
                         momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, match_rms_adamw=match_rms_adamw)

    @staticmethod
    def _build_base(groups, **kwargs):
        return MuonAdamW(groups, **kwargs)
