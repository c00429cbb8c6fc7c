"""Muon for the hidden matrices, AdamW for the rest, as one ``torch.optim.Optimizer`` (the base of
``muon_win``).

Muon's authors prescribe it for the 2-D weight matrices of hidden layers only; embeddings, the output
head, norms and biases take AdamW. :class:`MuonAdamW` holds both as one optimizer whose param groups carry
``use_muon`` (the key of Keller Jordan's ``MuonWithAuxAdam``; timm's ``use_fallback=True`` means
``use_muon=False``), so one scheduler and one state dict cover both. The arithmetic is torch's own:
``torch.optim.Muon`` steps the Muon groups and ``torch.optim.AdamW`` the others, over this optimizer's
groups and state.

How a parameter is assigned, first rule that applies:

1. its group's ``use_muon`` (or ``use_fallback``);
2. from a module (:func:`muon_param_groups`): the weights of ``nn.Embedding`` layers and of the output
   head (``get_output_embeddings()`` of Hugging Face models, ``get_classifier()`` of timm models) take
   AdamW;
3. otherwise Muon for 2-D tensors with both sides > 1, AdamW for everything else.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

__all__ = ["MuonAdamW", "muon_param_groups", "is_muon_shape"]

#: torch.optim.Muon's epsilon of the Newton-Schulz normalisation (the ``eps`` of the Muon groups; the
#: constructor's ``eps`` is AdamW's).
MUON_EPS = 1e-7


def is_muon_shape(p: torch.Tensor) -> bool:
    """The shape rule: a 2-D tensor with both sides > 1."""
    return p.ndim == 2 and min(p.shape) > 1


def _use_muon(group: dict):
    if "use_muon" in group:
        return group["use_muon"]
    if "use_fallback" in group:
        return not group["use_fallback"]
    return None


def muon_param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Param groups of ``model``'s trainable parameters, split by the rules of this module: Muon (with
    decay), AdamW with decay (2-D embeddings and heads) and AdamW without decay (tensors of fewer than 2
    dimensions: biases, norms)."""
    aux = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            aux.add(id(m.weight))
    for getter in ("get_output_embeddings", "get_classifier"):
        head = getattr(model, getter, None)
        head = head() if callable(head) else None
        if isinstance(head, nn.Module):
            aux.update(id(p) for p in head.parameters())
    muon, adamw, no_decay = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            no_decay.append(p)
        elif id(p) in aux or not is_muon_shape(p):
            adamw.append(p)
        else:
            muon.append(p)
    groups = [{"params": muon, "use_muon": True, "weight_decay": weight_decay},
              {"params": adamw, "use_muon": False, "weight_decay": weight_decay},
              {"params": no_decay, "use_muon": False, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class MuonAdamW(torch.optim.Optimizer):
    r"""``torch.optim.Muon`` on the groups with ``use_muon=True``, ``torch.optim.AdamW`` on the others.

    Args:
        params: parameters or param groups (a group may set ``use_muon``; a group without it is split by
            the shape rule into a Muon part and an AdamW part).
        lr, weight_decay: both parts (decoupled decay, as torch's Muon and AdamW).
        betas, eps: AdamW's.
        momentum, nesterov, ns_steps: Muon's.
        match_rms_adamw: Muon's ``adjust_lr_fn="match_rms_adamw"`` (default True: Moonshot's scaling, so
            that one ``lr`` and one ``weight_decay`` serve both parts); False: ``"original"`` (Keller
            Jordan's ``sqrt(max(1, rows/cols))``).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5, match_rms_adamw: bool = True):
        if not isinstance(match_rms_adamw, bool):
            raise ValueError(f"MuonAdamW: match_rms_adamw must be True or False, got {match_rms_adamw!r}")
        self._muon_kwargs = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                 ns_steps=ns_steps, eps=MUON_EPS,
                                 adjust_lr_fn="match_rms_adamw" if match_rms_adamw else "original")
        self._adamw_kwargs = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self._inner = {}
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    def __getstate__(self):
        return {**super().__getstate__(), "_inner": self._inner, "_muon_kwargs": self._muon_kwargs,
                "_adamw_kwargs": self._adamw_kwargs}

    def add_param_group(self, param_group: dict) -> None:
        """Add ``param_group``; without ``use_muon`` it is split by the shape rule into up to two groups."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        flag = _use_muon(param_group)
        if flag is None:
            rest = {k: v for k, v in param_group.items() if k not in ("params", "use_fallback")}
            parts = [dict(rest, params=[p for p in params if is_muon_shape(p)], use_muon=True),
                     dict(rest, params=[p for p in params if not is_muon_shape(p)], use_muon=False)]
            parts = [g for g in parts if g["params"]] or [dict(rest, params=[], use_muon=False)]
        else:
            if not isinstance(flag, bool):
                raise ValueError(f"MuonAdamW: use_muon must be True or False, got {flag!r}")
            bad = [tuple(p.shape) for p in params if flag and not is_muon_shape(p)]
            if bad:
                raise ValueError(f"MuonAdamW: use_muon=True for parameters of shapes {bad}; Muon steps 2-D "
                                 "matrices with both sides > 1 only")
            parts = [dict({k: v for k, v in param_group.items() if k != "use_fallback"}, params=params, use_muon=flag)]
        for part in parts:
            kind = "muon" if part["use_muon"] else "adamw"
            kwargs = self._muon_kwargs if kind == "muon" else self._adamw_kwargs
            for k, v in kwargs.items():
                part.setdefault(k, v)
            super().add_param_group(part)
            inner = self._inner.get(kind)
            if inner is None:
                cls = torch.optim.Muon if kind == "muon" else torch.optim.AdamW
                self._inner[kind] = cls([part], **kwargs)
            else:
                inner.add_param_group(part)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for kind, inner in self._inner.items():
            # this optimizer's groups and state (load_state_dict replaces both objects)
            inner.param_groups = [g for g in self.param_groups if g["use_muon"] == (kind == "muon")]
            inner.state = self.state
            if inner.param_groups:
                inner.step()
        return loss
