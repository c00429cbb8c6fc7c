"""What a Win optimizer's state costs in memory: measured (``state_bytes``) and predicted per parameter
(``state_bytes_per_parameter``), the figures the Trainer's summary and the README's tables report."""

from __future__ import annotations

import torch
from torch import Tensor

from ._precision import state_element_size
from ._win import extra_state_keys

__all__ = ["state_bytes", "buffers_per_parameter", "state_bytes_per_parameter", "state_element_size"]


def state_bytes(state) -> int:
    """Bytes held in the state tensors of ``state`` (an optimizer's ``state``: parameter -> dict)."""
    return sum(v.numel() * v.element_size() for s in state.values() for v in s.values() if isinstance(v, Tensor))


def buffers_per_parameter(cls, mode: str, hyper: dict) -> int:
    """Parameter-sized buffers ``cls`` keeps per parameter in ``mode`` with the hyper-parameters ``hyper``."""
    return len(cls._state_keys(hyper)) + len(extra_state_keys(mode))


def state_bytes_per_parameter(cls, mode: str, param_dtype: torch.dtype, hyper: dict) -> int:
    """State bytes per parameter element: the buffers times the size of the state dtype
    (``hyper["state_dtype"]``, else ``param_dtype``; complex parameters keep complex state)."""
    return buffers_per_parameter(cls, mode, hyper) * state_element_size(hyper.get("state_dtype"), param_dtype)
