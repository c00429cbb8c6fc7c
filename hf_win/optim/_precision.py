"""The dtype rules every path shares: which dtype the state is kept in, which dtype the arithmetic runs in,
and which arrays are stored with stochastic rounding.

The eager paths (``_dispatch``/``_base``) and both kernel emitters (``kernels/c.py``, ``kernels/triton.py``)
import these rules from here, so a kernel and foreach always compute in the same precision and round the
same arrays.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

__all__ = ["STATE_DTYPES", "as_dtype", "state_dtype", "state_dtype_for", "state_element_size", "compute_dtype",
           "exact_arrays", "stochastic_arrays"]

#: ``state_dtype`` values: None (the parameter's dtype), float32, bfloat16 (names or torch dtypes).
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def as_dtype(value) -> torch.dtype:
    """The torch dtype of a ``state_dtype`` value (a name or a dtype); ``ValueError`` for any other."""
    if isinstance(value, str):
        value = STATE_DTYPES.get(value.replace("torch.", ""), value)
    if value not in STATE_DTYPES.values():
        raise ValueError(f"state_dtype must be None, 'float32' or 'bfloat16' (or the torch dtypes), got {value!r}")
    return value


def state_dtype(group: dict, p: torch.Tensor) -> torch.dtype:
    """The dtype of ``p``'s state buffers: the group's ``state_dtype``, else the parameter's (complex
    parameters keep complex state: it is stepped through its real view)."""
    return state_dtype_for(group, p.dtype)


def state_dtype_for(group: dict, param_dtype: torch.dtype) -> torch.dtype:
    """``state_dtype`` for a parameter of ``param_dtype``."""
    dtype = group.get("state_dtype")
    return param_dtype if dtype is None or param_dtype.is_complex else as_dtype(dtype)


def state_element_size(state_dtype, param_dtype: torch.dtype) -> int:
    """Bytes of one state element for a parameter of ``param_dtype`` under ``state_dtype`` (None: the
    parameter's dtype, as for complex parameters)."""
    if state_dtype is None or param_dtype.is_complex:
        return param_dtype.itemsize
    return as_dtype(state_dtype).itemsize


def compute_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The arithmetic's dtype for one parameter's arrays (``dtypes[0]`` is the parameter's): float64 for
    float64 parameters, else float32 (low-precision tensors are upcast, results rounded back)."""
    return torch.float64 if dtypes[0] == torch.float64 else torch.float32


def exact_arrays(dtypes: Sequence[torch.dtype]) -> List[int]:
    """The arrays stored in the compute dtype (a reload gives a stored value back exactly)."""
    ct = compute_dtype(dtypes)
    return [a for a, d in enumerate(dtypes) if d == ct]


def stochastic_arrays(group: dict, dtypes: Sequence[torch.dtype]) -> List[bool]:
    """Per array (``param``, ``grad``, the state buffers): stored with stochastic rounding? bfloat16 state
    always; a bfloat16 parameter with ``bf16_stochastic_round``; never the gradient (it is only read)."""
    sr_param = bool(group.get("bf16_stochastic_round", False))
    return [d == torch.bfloat16 and (a > 1 or (a == 0 and sr_param)) for a, d in enumerate(dtypes)]
