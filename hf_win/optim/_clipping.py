"""Clipping inside the optimizer (``max_grad_norm > 0``): one coefficient for every gradient, from the
global norm over all param groups, as ``torch.nn.utils.clip_grad_norm_`` computes it."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["CLIP_STYLES", "clip_coefficient"]

#: ``"standard"``: ``min(1, max_norm / (norm + eps))`` (torch's clip_grad_norm_); ``"lamb"``:
#: ``max_norm / norm`` when the norm is above ``max_norm``, else 1 (LAMB's own clipping).
CLIP_STYLES = ("standard", "lamb")


def clip_coefficient(param_groups, max_norm: float, style: str, eps: float = 1e-8) -> Optional[Tensor]:
    """Multiplier for every gradient (a 0-dim tensor), or None when clipping is off or nothing has a
    gradient."""
    if max_norm <= 0.0:
        return None
    grads = [p.grad for g in param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return None
    device = grads[0].device
    if all(type(g) is Tensor and g.layout == torch.strided and g.device == device for g in grads):
        norms = list(torch._foreach_norm([g.detach() for g in grads], 2.0))  # one call, as clip_grad_norm_
    else:  # DTensor (FSDP2) gradients: their norms are reduced over the processes
        norms = [torch.linalg.vector_norm(g.detach(), 2.0) for g in grads]
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)
    if style == "lamb":
        return torch.where(total > max_norm, max_norm / total, torch.ones_like(total))
    return torch.clamp(max_norm / (total + eps), max=1.0)
