"""What is said when an optimizer is built, about settings that would fail later or do nothing: a bad
``HF_WIN_FUSED_BACKEND`` raises (the first ``step()`` would), ``bf16_stochastic_round=True`` over parameters
that are not bfloat16 warns (it rounds bfloat16 parameters only)."""

from __future__ import annotations

import warnings

import torch

from . import kernels


def check_backend_setting() -> None:
    """``ValueError`` naming the allowed values for a bad ``HF_WIN_FUSED_BACKEND``."""
    kernels.backend_setting()


def _inert_rounding(group: dict) -> bool:
    params = group["params"]
    return bool(group.get("bf16_stochastic_round")) and bool(params) and not any(
        p.dtype == torch.bfloat16 for p in params)


def warn_inert_rounding(opt) -> None:
    """After a param group was added: warn if it asks for ``bf16_stochastic_round`` and holds no bfloat16
    parameter, once per optimizer (not again for a later group of the same kind)."""
    *earlier, group = opt.param_groups
    if _inert_rounding(group) and not any(_inert_rounding(g) for g in earlier):
        dtypes = ", ".join(sorted({str(p.dtype).replace("torch.", "") for p in group["params"]}))
        warnings.warn(
            f"{type(opt).__name__}: bf16_stochastic_round=True rounds bfloat16 parameters only, and these parameters "
            f"are {dtypes}: it does nothing here (bfloat16 state is always rounded stochastically)",
            UserWarning, stacklevel=2,
        )
